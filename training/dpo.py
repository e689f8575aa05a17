"""Preference optimisation: the policy starts from an SFT checkpoint (init_from), a frozen copy of the same
weights is the reference, and the loss per pair (dpo.loss, training/losses.py) is by default DPO's
−log σ(β·[(π_c − r_c) − (π_r − r_r)]) over the summed log-probs of the completion tokens, averaged over the pairs
of the global batch; simpo and orpo have no reference at all. With data.packing=true a pair's chosen and rejected
sequences share a row of data.seq_len positions with other pairs, each attending only to itself.

    python -m training.dpo --config configs/dpo/tiny.yaml init_from=SFT_RUN [dpo.loss=sigmoid] [dpo.beta=0.1]
                           [dpo.precompute_ref=true]

The reference is pinned when the run starts: its weights are linked (or copied) into out_dir/reference/, so a
resumed run optimises against the same reference even after the SFT run has written newer checkpoints or pruned
that one. It computes in the policy's precision (bf16 weights under DeepSpeed bf16, autocast otherwise), so at
step 0 every log-ratio is 0 (exactly with the live reference; a precomputed one pads its batches differently).
With LoRA the reference is the policy with its adapters switched off.

With dpo.precompute_ref=true the reference log-probs are computed once, by all ranks, and kept in
ref_logps-<weights sha>-L<seq_len>-<precision>.npy next to the shards: training then runs no reference forward.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.fileio import atomic_write

from . import checkpoint as ckpt
from . import distributed as D
from . import lora
from .cli import main
from .data import Batch, DPOData
from .loop import Stage
from .losses import PREFERENCE_LOSSES, preference_loss, sequence_logps, sequence_tokens
from .model import Transformer
from .sft import pad_id


class LiveReference:
    """Reference log-probs from the frozen starting model, computed with each batch (of each row, or with packed
    rows of each slot). With LoRA the model is the policy itself, run with its adapters switched off."""

    per_row = True  # computes what the batch it is given holds (a precomputed one looks its values up)

    def __init__(self, model: Transformer, device: torch.device, autocast, adapters_off: bool = False):
        self.model, self.device, self.autocast, self.adapters_off = model, device, autocast, adapters_off

    @torch.no_grad()
    def __call__(self, picks, batch: Batch) -> torch.Tensor:
        base = lora.adapters_disabled(self.model) if self.adapters_off else contextlib.nullcontext()
        batch = batch.to(self.device)
        with base, self.autocast:
            logits = self.model(batch.inputs, segments=batch.segments)
        pairs = len(picks) if picks else 1  # None: a filler pair
        return sequence_logps(logits, batch.targets, batch.segments, 2 * pairs)


class PrecomputedReference:
    """Reference log-probs looked up in arrays of shape (examples, 2): chosen, rejected."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def __call__(self, picks, batch: Batch) -> torch.Tensor:
        if picks is None:  # a filler pair
            return torch.zeros(2)
        rows = np.stack([self.arrays[s][j] for s, j in picks])
        return torch.from_numpy(np.concatenate([rows[:, 0], rows[:, 1]]))


def reference_model(run) -> Transformer:
    """The pinned starting weights, in the policy's dtype: DeepSpeed bf16 casts the policy's parameters (not its
    buffers, the rotary tables) to bf16."""
    model = Transformer(run.model.cfg)
    model.attention_impl = run.model.attention_impl
    ckpt.load_weights(run.reference_dir, model)
    dtype = next(run.model.parameters()).dtype
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.to(run.env.device).eval().requires_grad_(False)


def precompute(run, reference: LiveReference, data_class=DPOData) -> list[np.ndarray]:
    """Each rank computes its share of every source's examples (every rank the same number of forwards); the
    sum over ranks is the full array. Whether a cache file is there is decided by all ranks together: with
    node-local copies of the shards, one node may have it and another not."""
    env, cfg = run.env, run.cfg
    # the array's rows are the examples that fit, which packing counts differently (a pair shares one row)
    key = (f"{run.state.init_from['fingerprint']}-L{cfg.data.seq_len}{'-packed' if cfg.data.packing else ''}"
           f"{data_class.cache_tag(cfg.data)}-{run.compute_precision}")
    data = data_class(run.sources, run.weights, cfg.seed, run.plan, run.model.cfg.vocab_size,
                      pad_id=pad_id(run.sources), seq_len=cfg.data.seq_len,
                      reference=reference)  # padded: the values do not depend on the layout
    arrays = []
    for s, source in enumerate(run.sources):
        path = os.path.join(source.path, f"ref_logps-{key}.npy")
        n = source.n_train + source.n_val
        have = os.path.isfile(path) and np.load(path, mmap_mode="r").shape == (n, 2)
        if D.all_reduce_min(env, int(have)):
            arrays.append(np.load(path))
            continue
        values = torch.zeros(n, 2, dtype=torch.float64, device=env.device)
        for chunk in run.plan.share(list(range(n))):
            logps = data.collate([[(s, j)] for j in chunk]).reference
            if chunk:
                values[chunk] = torch.stack([logps[:len(chunk)], logps[len(chunk):]], dim=1).double()
        array = D.all_reduce_sum(env, values).cpu().numpy().astype(np.float32)
        if env.local_rank == 0:  # one writer per machine: the shards may be a node-local copy
            buffer = io.BytesIO()
            np.save(buffer, array)
            atomic_write(path, buffer.getvalue())
            if env.is_main:
                print(f"{run.stage.name}: reference log-probs of {n:,} {'pairs' if run.stage.name == 'dpo' else 'examples'} "
                      f"saved to {path}", flush=True)
        arrays.append(array)
    D.barrier(env)
    return arrays


def make_data(run, uses_reference: bool = True, data_class=DPOData):
    """The stage's pairs (or KTO's examples) with the reference's log-probs: from the starting model (with LoRA,
    the policy with adapters off), or precomputed; none for a loss without a reference."""
    cfg, env = run.cfg, run.env
    reference = None  # simpo and orpo: no reference model, no reference forward
    if uses_reference and lora.enabled(cfg.lora):  # the base weights are the start's
        reference = LiveReference(run.model, env.device, run.autocast, adapters_off=True)
    elif uses_reference:
        reference = LiveReference(reference_model(run), env.device, run.autocast)
    if cfg.dpo.precompute_ref:  # no reference forward during training: a separate reference model is freed
        reference = PrecomputedReference(precompute(run, reference, data_class))
    return data_class(run.sources, run.weights, cfg.seed, run.plan, run.model.cfg.vocab_size,
                      pad_id=pad_id(run.sources), seq_len=cfg.data.seq_len, pack_window=cfg.data.packing_window(),
                      reference=reference)


def make_stage(cfg) -> Stage:
    if not cfg.init_from:
        raise UserError("DPO starts from a fine-tuned model: set init_from=RUN_OR_CKPT_DIR (the SFT run)")
    if (cfg.dpo.desirable_weight, cfg.dpo.undesirable_weight) != (1.0, 1.0):
        raise UserError("dpo.desirable_weight, dpo.undesirable_weight: these weigh KTO's labelled completions "
                        "(python -m training.kto); a preference pair has one of each")
    name, beta, options = cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.options()
    uses_reference = PREFERENCE_LOSSES[name].reference

    def loss(model, batch):
        n = len(batch.pairs)
        logits = model(batch.inputs, segments=batch.segments)
        logps = sequence_logps(logits, batch.targets, batch.segments, 2 * n)
        tokens = sequence_tokens(batch.targets, batch.segments, 2 * n)
        ref = batch.reference.to(logps) if uses_reference else torch.zeros_like(logps)
        real = batch.pairs.to(logps.device).bool()  # a filler pair (no tokens) is left out, not multiplied by 0
        losses, metrics = preference_loss(name, logps[:n][real], logps[n:][real], ref[:n][real], ref[n:][real],
                                          beta=beta, chosen_tokens=tokens[:n][real], rejected_tokens=tokens[n:][real],
                                          **options)
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}

    data = functools.partial(make_data, uses_reference=uses_reference)
    return Stage(name="dpo", data_kind="dpo", make_data=data, loss=loss, units=lambda batch: int(batch.pairs.sum()),
                 chat=True, pins_reference=uses_reference and not lora.enabled(cfg.lora), packs=True)


if __name__ == "__main__":
    sys.exit(main("dpo", make_stage))
