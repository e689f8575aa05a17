"""Preference optimisation: the policy starts from an SFT checkpoint (init_from), a frozen copy of the same
weights is the reference, and the loss per pair (dpo.loss, stages/losses.py) is by default DPO's
−log σ(β·[(π_c − r_c) − (π_r − r_r)]) over the summed log-probs of the completion tokens, averaged over the pairs
of the global batch; simpo and orpo have no reference at all. With data.packing=true a pair's chosen and rejected
sequences share a row of data.seq_len positions with other pairs, each attending only to itself.

The reference is pinned before the model is built (stages/reference.py): its weights are linked (or copied) into
out_dir/reference/, so a resumed run optimises against the same reference even after the SFT run has written
newer checkpoints or pruned that one. It computes in the policy's precision (bf16 weights under DeepSpeed bf16,
autocast otherwise), so at step 0 every log-ratio is 0 (exactly with the live reference; a precomputed one pads
its batches differently). With LoRA the reference is the policy with its adapters switched off.
"""

from __future__ import annotations

import torch

from preprocess.errors import UserError

from ..data.batch import ExampleBatches, numbered
from .losses import PREFERENCE_LOSSES, filler_stand_in, preference_loss, sequence_logps, sequence_tokens
from .reference import ReferencedBatch, ReferenceStage


class PairBatches(ExampleBatches):
    """Pairs: every chosen sequence of the micro-batch, then every rejected one (slots i and n + i for pair i), in
    one forward pass. Padded: one sequence per row. Packed: a pair's two sequences share a row."""

    batch_type = ReferencedBatch

    def collate(self, rows):
        if not rows:  # a filler pair: it runs its forwards (the reference's too) as every other rank does
            return self.lay_out([[(*self.filler(), 0)], [(*self.filler(), 1)]], counted=torch.zeros(1))
        picks = [p for row in rows for p in row]
        n = len(picks)
        pairs = [self.sources[s].example(j) for s, j in picks]
        self.check_vocab([t for pair in pairs for t, _ in pair], [p for p in picks for _ in range(2)])
        if self.packing is not None:
            laid = [[seq for i in row for seq in ((*pairs[i][0], i), (*pairs[i][1], n + i))] for row in numbered(rows)]
        else:  # chosen rows, then rejected rows
            laid = [[(*pairs[i][0], i)] for i in range(n)] + [[(*pairs[i][1], n + i)] for i in range(n)]
        return self.lay_out(laid, picks=picks, counted=torch.ones(n))


class DPO(ReferenceStage):
    name = data_kind = "dpo"
    documents = 2
    unit = "pairs"
    packs = True
    batch_class = PairBatches

    def __init__(self, cfg):
        super().__init__(cfg)
        if (cfg.dpo.desirable_weight, cfg.dpo.undesirable_weight) != (1.0, 1.0):
            raise UserError("dpo.desirable_weight, dpo.undesirable_weight: these weigh KTO's labelled completions "
                            "(python -m training.kto); a preference pair has one of each")
        self.uses_reference = PREFERENCE_LOSSES[cfg.dpo.loss].reference  # simpo, orpo: none

    def identity(self) -> dict:
        dpo = self.cfg.dpo
        return {"dpo.loss": dpo.loss, "dpo.beta": dpo.beta, **{f"dpo.{k}": v for k, v in dpo.options().items()}}

    @property
    def prepares(self) -> bool:
        return self.uses_reference

    @staticmethod
    def reference_columns(batch: ReferencedBatch) -> list:
        """The rows whose log-probs are the reference's: chosen then rejected, in one forward."""
        return [(batch, 2 * batch.examples())]

    def prepare(self, model, batches, env, autocast):
        if self.reference is not None:
            for batch in batches:
                batch.reference = self.reference(batch)
        return batches

    def loss(self, model, batch):
        n = batch.examples()
        logps = sequence_logps(model, batch, 2 * n)
        tokens = sequence_tokens(batch.targets, batch.segments, 2 * n)
        ref = batch.reference.to(logps) if self.uses_reference else torch.zeros_like(logps)
        # a filler pair (no tokens: 1 in counted, else 0) computes on stand-in values and weighs 0: masked arithmetic,
        # where indexing by a mask would wait for the device to say how many pairs are real
        real = batch.counted.to(logps)
        stand_in = filler_stand_in(real.repeat(2))
        logps, ref = stand_in(logps), stand_in(ref)
        dpo = self.cfg.dpo
        losses, metrics = preference_loss(dpo.loss, logps[:n], logps[n:], ref[:n], ref[n:], beta=dpo.beta,
                                          chosen_tokens=tokens[:n], rejected_tokens=tokens[n:], **dpo.options())
        return (losses * real).sum(), {k: (v * real).sum() for k, v in metrics.items()}
