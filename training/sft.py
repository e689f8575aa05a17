"""Supervised fine-tuning: the loss on assistant tokens only, normalised by the number of those tokens in the
whole global batch. Conversations are padded, never packed: no example attends to another.

    python -m training.sft --config configs/sft/tiny.yaml init_from=RUN_OR_CKPT_DIR [key.sub=value ...]
"""

from __future__ import annotations

import sys

from .cli import main
from .data import SFTData
from .loop import Stage
from .losses import IGNORE, lm_loss_sum


def pad_id(sources) -> int:
    special = sources[0].tokenizer["special_ids"]
    return special.get("pad", special["eos"])


def make_data(run):
    return SFTData(run.sources, run.weights, run.cfg.seed, run.plan, run.model.cfg.vocab_size,
                   pad_id=pad_id(run.sources), seq_len=run.cfg.data.seq_len)


def loss(model, batch):
    inputs, targets = batch
    total, _ = lm_loss_sum(model(inputs), targets)
    return total, {}


def make_stage(cfg) -> Stage:
    return Stage(name="sft", data_kind="sft", make_data=make_data, loss=loss,
                 units=lambda batch: int((batch[1] != IGNORE).sum()), tokens=lambda batch: batch[0].numel(), chat=True)


if __name__ == "__main__":
    sys.exit(main("sft", make_stage))
