"""KTO: preference optimisation from completions labelled desirable or undesirable, no pairs needed; the reference
point is estimated over the whole global batch. The stage: stages/kto.py.

    python -m preprocess shards --kind kto --input FILE.jsonl ...   # {"prompt", "completion", "label"} or pairs
    python -m training.kto --config configs/kto/tiny.yaml init_from=SFT_RUN [dpo.beta=0.1]
                           [dpo.desirable_weight=1.0] [dpo.undesirable_weight=1.0] [dpo.precompute_ref=true]
"""

import sys

from .cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("kto"))
