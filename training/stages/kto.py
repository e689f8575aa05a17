"""KTO: preference optimisation from completions labelled desirable or undesirable, no pairs needed. The policy
and a frozen reference start from an SFT checkpoint (init_from), as in DPO; each completion's loss is
1 − σ(β(r − z₀)) when desirable and 1 − σ(β(z₀ − r)) when not, r its log-ratio to the reference and z₀ the
reference point: the policy's mean log-ratio on mismatched sequences (each example's prompt with another
example's completion), over the whole global batch, so that 1 process x 4 micro-steps and 4 processes x 1 see
the same z₀ (TRL estimates it per device batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from preprocess.errors import UserError

from ..data.batch import IGNORE, Batch, ExampleBatches
from ..parallel import env as D
from .losses import filler_stand_in, kl_estimate, kto_loss, kto_summary, sequence_logps
from .reference import ReferencedBatch, ReferenceStage


@dataclass
class LabelledBatch(ReferencedBatch):
    """Labelled completions, one per row, and each one's KL sequence laid out apart."""
    labels: torch.Tensor | None = None   # 1 for a desirable completion, 0 for an undesirable one
    kl_rows: Batch | None = None         # each completion's KL sequence (moved by its user)
    kl: torch.Tensor | None = None       # the KL estimate z₀ of the whole global batch (prepare)


class LabelledBatches(ExampleBatches):
    """Labelled completions (KTO), one per row, and for each its KL sequence: the example's prompt followed by the
    completion of its partner, a fixed other example of the same split, half the split away (so that the two
    halves of a preference pair, written side by side, are not partners). A split of fewer than MIN_SPLIT
    examples has no partners: its KL rows hold no target and count for nothing. The completions and the KL
    sequences are laid out apart, each as wide as its longest; the reference's log-probs (live or precomputed) are
    every completion's, then every KL sequence's, as a DPO pair's chosen then rejected."""

    MIN_SPLIT = 4
    batch_type = LabelledBatch

    def partner(self, s: int, j: int) -> int | None:
        source = self.sources[s]
        first, n = (0, source.n_train) if j < source.n_train else (source.n_train, source.n_val)
        return first + (j - first + n // 2) % n if n >= self.MIN_SPLIT else None

    def kl_sequence(self, s: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, mask = self.sources[s].example(j)[0]
        prompt = int(np.argmax(mask > 0))
        partner = self.partner(s, j)
        if partner is None:  # the prompt alone, nothing learned: no KL term from it
            return tokens[: max(2, prompt)], np.zeros(max(2, prompt), np.uint8)
        other, other_mask = self.sources[s].example(partner)[0]
        completion = int(np.argmax(other_mask > 0))
        ids = np.concatenate([tokens[:prompt], other[completion:]])[: self.seq_len + 1]  # at most seq_len positions
        learned = np.concatenate([np.zeros(prompt, np.uint8), (other_mask[completion:] > 0).astype(np.uint8)])
        return ids, learned[: len(ids)]

    def collate(self, rows):
        if not rows:  # a filler example and its KL row: it runs its forwards as every other rank does
            kl = self.lay_out([[(*self.filler(), 1)]], batch_type=Batch)
            return self.lay_out([[(*self.filler(), 0)]], counted=torch.zeros(1), labels=torch.zeros(1), kl_rows=kl)
        picks = [p for row in rows for p in row]
        docs = [self.sources[s].example(j)[0] for s, j in picks]
        kl_docs = [self.kl_sequence(s, j) for s, j in picks]
        self.check_vocab([t for t, _ in docs] + [t for t, _ in kl_docs], picks + picks)
        labels = torch.tensor([float(m.max() == 1) for _, m in docs])  # mask 1: desirable, 2: undesirable
        kl = self.lay_out([[(t, m, i)] for i, (t, m) in enumerate(kl_docs)], batch_type=Batch)
        return self.lay_out([[(t, (m > 0).astype(np.uint8), i)] for i, (t, m) in enumerate(docs)], picks=picks,
                            counted=torch.ones(len(picks)), labels=labels, kl_rows=kl)


class KTO(ReferenceStage):
    name = data_kind = "kto"
    documents = 1
    unit = "labelled completions"
    batch_class = LabelledBatches

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.dpo.loss != "sigmoid" or cfg.dpo.options() != {"label_smoothing": 0.0, "rpo_alpha": 0.0}:
            raise UserError("dpo.loss and its options are for preference pairs (python -m training.dpo); KTO reads "
                            "dpo.beta, dpo.desirable_weight, dpo.undesirable_weight and dpo.precompute_ref")

    def identity(self) -> dict:
        dpo = self.cfg.dpo
        return {"dpo.beta": dpo.beta, "dpo.desirable_weight": dpo.desirable_weight,
                "dpo.undesirable_weight": dpo.undesirable_weight}

    @staticmethod
    def reference_columns(batch: LabelledBatch) -> list:
        """The completions, then the KL sequences: a forward of each layout."""
        return [(batch, batch.examples()), (batch.kl_rows, batch.examples())]

    def reference_cache_tag(self) -> str:
        return f"-kl{self.cfg.data.val_fraction}"  # the partners lie within the split

    def prepare(self, model, batches: list, env: D.DistEnv, autocast) -> list:
        """The reference's log-probs of each batch, then z₀ of the global batch: every rank's KL sequences through
        the policy (no gradient), summed over ranks."""
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # policy, reference, sequences
        for batch in batches:
            batch.reference = self.reference(batch)
        with torch.no_grad(), autocast:
            for batch in batches:
                n = batch.examples()
                kl = batch.kl_rows.to(env.device)
                logps = sequence_logps(model, kl)
                # a filler, or an example of a split too small to have partners, has no KL sequence to count
                real = batch.counted.to(env.device).bool() & (kl.targets != IGNORE).any(dim=-1)
                reference = batch.reference[n:].to(logps)
                counted = filler_stand_in(real.double(), 0.0)
                sums += torch.stack([counted(logps.double()).sum(), counted(reference.double()).sum(),
                                     real.sum().double()])
        policy, reference, count = D.all_reduce_sum(env, sums)
        z0 = kl_estimate(policy, reference, count).float()
        for batch in batches:
            batch.kl = z0
        return batches

    def loss(self, model, batch):
        n = batch.examples()
        logps = sequence_logps(model, batch)
        real = batch.counted.to(logps)  # 1 per completion, 0 for a filler: masked arithmetic, as DPO's
        stand_in = filler_stand_in(real)
        dpo = self.cfg.dpo
        losses, metrics = kto_loss(stand_in(logps), stand_in(batch.reference[:n].to(logps)),
                                   batch.labels.to(logps.device), batch.kl.to(logps), counted=real, beta=dpo.beta,
                                   desirable_weight=dpo.desirable_weight, undesirable_weight=dpo.undesirable_weight)
        return (losses * real).sum(), metrics

    def summarise(self, means: dict[str, float]) -> dict[str, float]:
        return kto_summary(means)
