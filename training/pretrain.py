"""Pretraining: next-token prediction on every token of fixed-length samples of the shards (with
data.document_mask=true, attention stays inside each document of a sample). The stage: stages/pretrain.py.

    python -m training.pretrain --config configs/pretrain/tiny.yaml [key.sub=value ...]
    torchrun --nproc_per_node N -m training.pretrain --config ... [key.sub=value ...]
"""

import sys

from .cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("pretrain"))
