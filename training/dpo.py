"""Preference optimisation from pairs (dpo.loss: sigmoid, robust, hinge, ipo with a reference; simpo, orpo
without), starting from an SFT run whose weights are pinned as the reference. The stage: stages/dpo.py.

    python -m training.dpo --config configs/dpo/tiny.yaml init_from=SFT_RUN [dpo.loss=sigmoid] [dpo.beta=0.1]
                           [dpo.precompute_ref=true]

With dpo.precompute_ref=true the reference log-probs are computed once, by all ranks, and kept in
ref_logps-<weights sha>-L<seq_len>-<precision>.npy next to the shards: training then runs no reference forward.
"""

import sys

from .cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("dpo"))
