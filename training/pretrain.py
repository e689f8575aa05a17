"""Pretraining: next-token prediction on every token of fixed-length samples of the shards (with
data.document_mask=true, attention stays inside each document of a sample).

    python -m training.pretrain --config configs/pretrain/tiny.yaml [key.sub=value ...]
    torchrun --nproc_per_node N -m training.pretrain --config ... [key.sub=value ...]
"""

from __future__ import annotations

import sys

from .cli import main
from .data import PretrainData
from .loop import Stage, target_tokens
from .losses import lm_loss_sum


def make_data(run):
    return PretrainData(run.sources, run.weights, run.cfg.seed, run.plan, run.model.cfg.vocab_size,
                        document_mask=run.cfg.data.document_mask)


def loss(model, batch):
    total, _ = lm_loss_sum(model(batch.inputs, segments=batch.segments), batch.targets)
    return total, {}


def make_stage(cfg) -> Stage:
    # every target counts; only the filler rows of an evaluation (ranks with less to evaluate) hold IGNORE
    return Stage(name="pretrain", data_kind="pretrain", make_data=make_data, loss=loss, units=target_tokens,
                 token_loss=True)


if __name__ == "__main__":
    sys.exit(main("pretrain", make_stage))
