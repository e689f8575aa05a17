"""Pretraining: next-token prediction on every token of fixed-length samples of the shards.

    python -m training.pretrain --config configs/pretrain/tiny.yaml [key.sub=value ...]
    torchrun --nproc_per_node N -m training.pretrain --config ... [key.sub=value ...]
"""

from __future__ import annotations

import sys

from .cli import main
from .data import PretrainData
from .loop import Stage
from .losses import IGNORE, lm_loss_sum


def make_data(run):
    return PretrainData(run.sources, run.weights, run.cfg.seed, run.plan, run.model.cfg.vocab_size)


def loss(model, batch):
    inputs, targets = batch
    total, _ = lm_loss_sum(model(inputs), targets)
    return total, {}


def make_stage(cfg) -> Stage:
    # every target counts; only the filler rows of an evaluation (ranks with less to evaluate) hold IGNORE
    return Stage(name="pretrain", data_kind="pretrain", make_data=make_data, loss=loss,
                 units=lambda batch: int((batch[1] != IGNORE).sum()), tokens=lambda batch: batch[0].numel())


if __name__ == "__main__":
    sys.exit(main("pretrain", make_stage))
