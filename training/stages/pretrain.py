"""Pretraining: next-token prediction on every token of fixed-length samples of the shards (with
data.document_mask=true, attention stays inside each document of a sample)."""

from __future__ import annotations

import numpy as np
import torch

from preprocess.errors import UserError

from ..data.batch import IGNORE, Batch, GlobalBatches
from .base import Stage
from .losses import next_token_loss


class PretrainData(GlobalBatches):
    """Samples of seq_len positions: every token is a target. With document_mask, attention stays inside each
    document of a sample (and positions restart at each), from the shards' document offsets."""

    def __init__(self, *args, document_mask: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.document_mask = document_mask

    def collate(self, rows):
        if not rows:  # filler: targets that count nothing
            seq_len = self.sources[0].seq_len
            return Batch(torch.zeros(1, seq_len, dtype=torch.int64), torch.full((1, seq_len), IGNORE, dtype=torch.int64))
        picks = [row[0] for row in rows]
        samples = np.stack([self.sources[s].sample(j) for s, j in picks])
        if samples.size and (top := int(samples.max())) >= self.vocab_size:
            s, j = picks[int(np.argmax(samples.max(axis=1)))]
            src = self.sources[s]
            position = j * src.seq_len + int(np.argmax(src.sample(j)))
            raise UserError(f"token id {top} at {src.locate(position)} is outside the model's vocabulary "
                            f"(model.vocab_size={self.vocab_size})")
        tokens = torch.from_numpy(samples)
        segments = None
        if self.document_mask:
            docs = np.stack([self.sources[s].documents(j) for s, j in picks])
            if (docs[:, -1] != docs[:, 0]).any():  # else every row is one causal sequence: the plain path
                segments = torch.from_numpy(docs)
        return Batch(tokens[:, :-1], tokens[:, 1:], segments, real_tokens=tokens[:, :-1].numel())


class Pretrain(Stage):
    # every target counts; only the filler rows of an evaluation (ranks with less to evaluate) hold IGNORE
    name = data_kind = "pretrain"
    unit = "samples"
    token_loss = True
    masks_documents = True

    def check(self) -> None:
        if self.cfg.data.packing:
            raise UserError("data.packing: pretraining samples are already full rows of data.seq_len tokens; "
                            "data.document_mask=true keeps attention inside each document")
        super().check()

    def make_data(self, run) -> PretrainData:
        return PretrainData(run.sources, run.mixture, self.cfg.seed, run.plan, run.model.cfg.vocab_size,
                            document_mask=self.cfg.data.document_mask)

    def loss(self, model, batch):
        return next_token_loss(model, batch)
