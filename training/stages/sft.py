"""Supervised fine-tuning: the loss on assistant tokens only, normalised by the number of those tokens in the
whole global batch. Conversations are padded one per row, or packed (data.packing=true) several per row of
data.seq_len positions; either way no conversation attends to another."""

from __future__ import annotations

from ..data.batch import ExampleBatches
from .base import Stage
from .losses import next_token_loss


class SFT(Stage):
    name = data_kind = "sft"
    documents = 1
    unit = "conversations"
    chat = True
    token_loss = True
    packs = True

    def make_data(self, run) -> ExampleBatches:
        data = self.cfg.data
        return ExampleBatches(run.sources, run.mixture, self.cfg.seed, run.plan, run.model.cfg.vocab_size,
                              seq_len=data.seq_len, pack_window=data.packing_window())

    def loss(self, model, batch):
        return next_token_loss(model, batch)
