"""Direct preference optimisation: the policy starts from an SFT checkpoint (init_from), a frozen copy of the
same weights is the reference, and the loss per pair is −log σ(β·[(π_c − r_c) − (π_r − r_r)]) over the summed
log-probs of the completion tokens, averaged over the pairs of the global batch.

    python -m training.dpo --config configs/dpo/tiny.yaml init_from=SFT_RUN [dpo.beta=0.1] [dpo.precompute_ref=true]

With dpo.precompute_ref=true the reference log-probs are computed once, by all ranks, and kept in
ref_logps-<weights sha>-L<seq_len>.npy next to the shards: training then runs no reference forward at all.
"""

from __future__ import annotations

import contextlib
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
from .data import DPOData, pad_sequences
from .loop import Stage, resolve_precision
from .losses import dpo_losses, sequence_logps
from .model import Transformer
from .sft import pad_id


class LiveReference:
    """Reference log-probs from the frozen starting model, computed with each batch. With LoRA the model is the
    policy itself, run with its adapters switched off."""

    def __init__(self, model: Transformer, device: torch.device, autocast, adapters_off: bool = False):
        self.model, self.device, self.autocast, self.adapters_off = model, device, autocast, adapters_off

    @torch.no_grad()
    def __call__(self, picks, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        base = lora.adapters_disabled(self.model) if self.adapters_off else contextlib.nullcontext()
        with base, self.autocast:
            logits = self.model(inputs.to(self.device))
        return sequence_logps(logits, targets.to(self.device))


class PrecomputedReference:
    """Reference log-probs looked up in arrays of shape (examples, 2): chosen, rejected."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def __call__(self, picks, inputs, targets) -> torch.Tensor:
        rows = np.stack([self.arrays[s][j] for s, j in picks])
        return torch.from_numpy(np.concatenate([rows[:, 0], rows[:, 1]]))


def reference_model(cfg, env) -> Transformer:
    model = Transformer(cfg.model)
    ckpt.load_weights(ckpt.resolve(cfg.init_from), model)
    return model.to(env.device).eval().requires_grad_(False)


def precompute(sources, reference: LiveReference, cfg, env) -> list[np.ndarray]:
    """Each rank computes its share of every source's examples; the sum over ranks is the full array."""
    key = f"{ckpt.weights_fingerprint(ckpt.resolve(cfg.init_from))}-L{cfg.data.seq_len}"
    arrays = []
    for source in sources:
        path = os.path.join(source.path, f"ref_logps-{key}.npy")
        n = source.n_train + source.n_val
        if os.path.isfile(path) and np.load(path, mmap_mode="r").shape == (n, 2):
            arrays.append(np.load(path))
            continue
        values = torch.zeros(n, 2, dtype=torch.float64, device=env.device)
        mine = list(range(env.rank, n, env.world_size))
        for i in range(0, len(mine), cfg.train.micro_batch_size):
            chunk = mine[i:i + cfg.train.micro_batch_size]
            pairs = [source.example(j) for j in chunk]
            inputs, targets = pad_sequences([p[0] for p in pairs] + [p[1] for p in pairs], pad_id(sources))
            logps = reference(None, inputs, targets).double()
            values[chunk] = torch.stack([logps[:len(chunk)], logps[len(chunk):]], dim=1)
        array = D.all_reduce_sum(env, values).cpu().numpy().astype(np.float32)
        if env.is_main:
            buffer = io.BytesIO()
            np.save(buffer, array)
            atomic_write(path, buffer.getvalue())
            print(f"dpo: reference log-probs of {n:,} pairs saved to {path}", flush=True)
        arrays.append(array)
    D.barrier(env)
    return arrays


def make_data(sources, weights, cfg, env, model):
    precision = resolve_precision(cfg.train.precision, env.device)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    if not cfg.init_from:
        raise UserError("DPO starts from a fine-tuned model: set init_from=RUN_OR_CKPT_DIR (the SFT run)")
    if lora.enabled(cfg.lora):  # the policy's base weights are the starting model's: no copy needed
        reference = LiveReference(model, env.device, autocast, adapters_off=True)
    else:
        reference = LiveReference(reference_model(cfg, env), env.device, autocast)
    if cfg.dpo.precompute_ref:  # no reference forward during training: a separate reference model is freed
        reference = PrecomputedReference(precompute(sources, reference, cfg, env))
    return DPOData(sources, weights, cfg.seed, cfg.train.micro_batch_size, cfg.train.grad_accum, env.rank,
                   env.world_size, model.cfg.vocab_size, pad_id=pad_id(sources), reference=reference)


def make_stage(cfg) -> Stage:
    beta = cfg.dpo.beta

    def loss(model, batch):
        inputs, targets, ref = batch
        logps = sequence_logps(model(inputs), targets)
        n = len(logps) // 2
        losses, metrics = dpo_losses(logps[:n], logps[n:], ref[:n].to(logps), ref[n:].to(logps), beta)
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}

    return Stage(name="dpo", data_kind="dpo", make_data=make_data, loss=loss,
                 units=lambda batch: batch[0].shape[0] // 2, tokens=lambda batch: batch[0].numel(), chat=True)


if __name__ == "__main__":
    sys.exit(main("dpo", make_stage))
