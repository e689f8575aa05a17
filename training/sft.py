"""Supervised fine-tuning: the loss on assistant tokens only, conversations padded one per row or packed
(data.packing=true); no conversation attends to another. The stage: stages/sft.py.

    python -m training.sft --config configs/sft/tiny.yaml init_from=RUN_OR_CKPT_DIR [key.sub=value ...]
"""

import sys

from .cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("sft"))
