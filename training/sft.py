"""Supervised fine-tuning: the loss on assistant tokens only, normalised by the number of those tokens in the
whole global batch. Conversations are padded one per row, or packed (data.packing=true) several per row of
data.seq_len positions; either way no conversation attends to another.

    python -m training.sft --config configs/sft/tiny.yaml init_from=RUN_OR_CKPT_DIR [key.sub=value ...]
"""

from __future__ import annotations

import sys

from .cli import main
from .data import SFTData
from .loop import Stage, target_tokens
from .losses import lm_loss_sum


def pad_id(sources) -> int:
    special = sources[0].tokenizer["special_ids"]
    return special.get("pad", special["eos"])


def make_data(run):
    data = run.cfg.data
    return SFTData(run.sources, run.weights, run.cfg.seed, run.plan, run.model.cfg.vocab_size,
                   pad_id=pad_id(run.sources), seq_len=data.seq_len, pack_window=data.packing_window())


def loss(model, batch):
    total, _ = lm_loss_sum(model(batch.inputs, segments=batch.segments), batch.targets)
    return total, {}


def make_stage(cfg) -> Stage:
    return Stage(name="sft", data_kind="sft", make_data=make_data, loss=loss, units=target_tokens, chat=True,
                 token_loss=True, packs=True)


if __name__ == "__main__":
    sys.exit(main("sft", make_stage))
