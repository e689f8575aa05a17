"""The reference of the preference stages (DPO, KTO): the starting weights, pinned when the run starts, whose
log-probs each example's loss compares with — computed by a forward of the frozen model with each step's batches
(live), or once before training into an array next to the shards (precomputed).

The reference is pinned before the model is built (ReferenceStage.pin): out_dir/reference/ holds the starting
weights, linked or copied, and a fresh run's policy loads them from there too, so the policy and its reference
start from the same weights even if the starting run saves again meanwhile; a resumed run optimises against the
same reference after the starting run has written newer checkpoints or pruned that one. With LoRA the reference
is the policy with its adapters switched off, and nothing is pinned.

The reference runs in Stage.prepare, not in collation: its forward is the step's compute, not data wait, and
collation stays free to move to a loader. Every rank runs as many reference forwards as the others (fillers
included): with LoRA under ZeRO-3 the reference is the sharded policy with its adapters off.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.fileio import atomic_write

from ..checkpoint.weights import fill, pin, weights_fingerprint
from ..data.batch import Batch, ExampleBatches
from ..models import lora
from ..models.transformer import Transformer
from ..parallel import env as D
from .base import Stage
from .losses import sequence_logps


@dataclass
class ReferencedBatch(Batch):
    """Examples whose loss compares the policy with the reference: the reference's log-probs of each example's two
    sequences (DPO: every chosen one, then every rejected one; KTO: every completion, then every KL sequence)."""
    picks: list[tuple[int, int]] | None = None  # (source, example) of each example; None: a filler
    counted: torch.Tensor | None = None         # 1 per example, 0 for a filler
    reference: torch.Tensor | None = None       # filled by the stage's prepare()

    def examples(self) -> int:
        return len(self.counted)


class LiveReference:
    """Reference log-probs from the frozen starting model, computed for each batch. With LoRA the model is the
    policy itself, run with its adapters switched off. `columns(batch)`: the stage's (rows, sequences) whose
    log-probs, concatenated, are the batch's two columns."""

    def __init__(self, model: Transformer, device: torch.device, autocast, columns: Callable[[Batch], list],
                 adapters_off: bool = False):
        self.model, self.device, self.autocast, self.columns = model, device, autocast, columns
        self.adapters_off = adapters_off

    @torch.no_grad()
    def __call__(self, batch: ReferencedBatch) -> torch.Tensor:
        base = lora.adapters_disabled(self.model) if self.adapters_off else contextlib.nullcontext()
        values = []
        with base:
            for rows, sequences in self.columns(batch):
                rows = rows.to(self.device)
                with self.autocast:
                    values.append(sequence_logps(self.model, rows, sequences))
        return torch.cat(values)


class PrecomputedReference:
    """Reference log-probs looked up in arrays of shape (examples, 2), one per source."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def __call__(self, batch: ReferencedBatch) -> torch.Tensor:
        if batch.picks is None:  # a filler
            return torch.zeros(2)
        rows = np.stack([self.arrays[s][j] for s, j in batch.picks])
        return torch.from_numpy(np.concatenate([rows[:, 0], rows[:, 1]]))


class ReferenceStage(Stage):
    """A stage whose loss compares the policy with its starting weights (DPO, KTO): its examples' batches carry
    the reference's log-probs, which prepare() fills in."""
    chat = True
    batch_class: type[ExampleBatches]
    uses_reference = True  # False for the losses without one (simpo, orpo): no reference model, no forward

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.init_from:
            raise UserError(f"{self.name.upper()} starts from a fine-tuned model: set init_from=RUN_OR_CKPT_DIR "
                            "(the SFT run)")
        self.pinned: str | None = None
        self.reference = None

    def pin(self, start, env: D.DistEnv) -> str | None:
        if self.uses_reference and not lora.enabled(self.cfg.lora):
            self.pinned = pinned_reference(self.cfg.out_dir, start.init_from, env, fresh=start.saved is None)
        return self.pinned

    def batches(self, run, pack_window: int = 0) -> ExampleBatches:
        return self.batch_class(run.sources, run.mixture, self.cfg.seed, run.plan, run.model.cfg.vocab_size,
                                seq_len=self.cfg.data.seq_len, pack_window=pack_window)

    def make_data(self, run) -> ExampleBatches:
        if self.uses_reference:
            self.reference = make_reference(self, run)
        return self.batches(run, self.cfg.data.packing_window())

    def reference_columns(self, batch: ReferencedBatch) -> list:
        """The (rows, sequences) whose log-probs, concatenated, are the batch's two columns."""
        raise NotImplementedError

    def reference_cache_tag(self) -> str:
        """What else than the weights, the shards and the row length a precomputed reference depends on."""
        return ""

    def units(self, batch: ReferencedBatch) -> int:
        return int(batch.counted.sum())


def pinned_reference(out_dir: str, init_from: dict, env: D.DistEnv, fresh: bool) -> str:
    """out_dir/reference: the starting weights, pinned by rank 0 when a fresh run starts and checked to be those
    resolved a moment before (their run may have saved that step again since); on a resume, checked against the
    fingerprint recorded then."""
    dest = os.path.join(out_dir, "reference")

    def pin_or_check() -> None:
        if fresh:
            pin(init_from["path"], dest)
        try:
            found = weights_fingerprint(dest)
        except (OSError, UserError):
            found = None
        if found != init_from["fingerprint"] and fresh:
            raise UserError(f"{init_from['path']}: its weights changed while this run started (weights "
                            f"{init_from['fingerprint']} when resolved, {found} when pinned); run the same command again")
        if found != init_from["fingerprint"]:
            raise UserError(f"{dest}: the reference this run started from ({init_from['path']}, weights "
                            f"{init_from['fingerprint']}) is {'changed' if found else 'missing'}; resuming would "
                            "optimise against another reference — start a new out_dir")

    D.from_rank0(env, pin_or_check)
    return dest


def reference_model(run, weights_dir: str) -> Transformer:
    """The pinned starting weights, in the policy's dtype (DeepSpeed bf16 casts the policy's parameters, not its
    buffers, the rotary tables, to bf16), held as the backend holds the policy (FSDP2: sharded)."""
    policy = run.model

    def build() -> Transformer:
        model = Transformer(policy.cfg)
        model.attention_impl = policy.attention_impl
        return model

    return run.backend.frozen_model(build, lambda model, storage: fill(model, weights_dir, run.cfg.seed, storage),
                                    next(policy.parameters()).dtype)


def make_reference(stage: ReferenceStage, run):
    """The reference of a run: the pinned starting model (with LoRA: the policy with adapters off), or its
    log-probs precomputed (dpo.precompute_ref); a separate reference model is then freed."""
    cfg, env = run.cfg, run.env
    if stage.pinned is None:  # LoRA: the base weights are the start's
        live = LiveReference(run.model, env.device, run.autocast, stage.reference_columns, adapters_off=True)
    else:
        live = LiveReference(reference_model(run, stage.pinned), env.device, run.autocast, stage.reference_columns)
    if cfg.dpo.precompute_ref:  # no reference forward during training
        return PrecomputedReference(precompute(stage, run, live))
    return live


def precompute(stage: ReferenceStage, run, live: LiveReference) -> list[np.ndarray]:
    """Each rank computes its share of every source's examples (every rank the same number of forwards); the
    sum over ranks is the full array. Whether a cache file is there is decided by all ranks together: with
    node-local copies of the shards, one node may have it and another not."""
    env, cfg = run.env, run.cfg
    # the array's rows are the examples that fit, which packing counts differently (a pair shares one row)
    key = (f"{run.state.init_from['fingerprint']}-L{cfg.data.seq_len}{'-packed' if cfg.data.packing else ''}"
           f"{stage.reference_cache_tag()}-{run.compute_precision}")
    padded: ExampleBatches = stage.batches(run, pack_window=0)  # the values do not depend on the layout
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
            logps = live(padded.collate([[(s, j)] for j in chunk]))  # a filler too: every rank as many forwards
            if chunk:
                values[chunk] = torch.stack([logps[:len(chunk)], logps[len(chunk):]], dim=1).double()
        array = D.all_reduce_sum(env, values).cpu().numpy().astype(np.float32)
        if env.local_rank == 0:  # one writer per machine: the shards may be a node-local copy
            buffer = io.BytesIO()
            np.save(buffer, array)
            atomic_write(path, buffer.getvalue())
            if env.is_main:
                print(f"{stage.name}: reference log-probs of {n:,} {stage.unit} saved to {path}", flush=True)
        arrays.append(array)
    D.barrier(env)
    return arrays
