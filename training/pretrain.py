"""Pretraining: next-token prediction on every token of fixed-length samples of the shards.

    python -m training.pretrain --config configs/pretrain/tiny.yaml [key.sub=value ...]
    torchrun --nproc_per_node N -m training.pretrain --config ... [key.sub=value ...]
"""

from __future__ import annotations

import sys

from .cli import main
from .data import PretrainData
from .loop import Stage
from .losses import lm_loss_sum


def make_data(sources, weights, cfg, env, model):
    return PretrainData(sources, weights, cfg.seed, cfg.train.micro_batch_size, cfg.train.grad_accum,
                        env.rank, env.world_size, model.cfg.vocab_size)


def loss(model, batch):
    inputs, targets = batch
    total, _ = lm_loss_sum(model(inputs), targets)
    return total, {}


STAGE = Stage(name="pretrain", data_kind="pretrain", make_data=make_data, loss=loss,
              units=lambda batch: batch[1].numel(), tokens=lambda batch: batch[0].numel())

if __name__ == "__main__":
    sys.exit(main("pretrain", lambda cfg: STAGE))
