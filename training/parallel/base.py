"""The Backend interface: one object that owns the wrapped model and the optimizer, the backward and the update, and
what of them a checkpoint holds. The loop, the checkpoint store and the train state call only these methods; none
of them names a backend (parallel/backends.py maps dist.backend to a class).

A backend is made, set up once with the built model and a way to make its optimizer, then used step by step:

    backend = BACKENDS[cfg.dist.backend](cfg, env, plan, precision)
    model = backend.initial_model(build, adapt, fill)          # built on the meta device, held as the backend holds
                                                               # it, each process writing the values it holds
    backend.setup(model, make_optimizer, resume_from, saved)   # wraps; the optimizer is made on what it wraps
    backend.load(resume_from, saved)                           # a resumed run: model and optimizer state
    for each step:
        backend.set_lr(lr)
        for i, batch in enumerate(batches):
            with backend.micro_step(i, len(batches)):          # no gradient reduction but at the last
                loss = stage.loss(backend.train_model, batch)
            backend.backward(scaled)
        norm, applied = backend.step(max_norm, loss)           # clip, apply unless not finite, zero the gradients
                                                               # (on the device: the loop reads them back later)
        backend.save(tmp_dir) -> files this rank wrote         # the store fsyncs and checksums them
        (or backend.start_save(tmp_dir, group) -> wait for them: the state copied now, written while training goes on)
    backend.close()
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..config import Config
from ..data.order import BatchPlan
from .env import DistEnv, on_every_rank


class Backend(ABC):
    name: str                        # as dist.backend names it
    group_always = False             # wants a process group even for one process
    compile_scope = "model"          # what train.compile_scope=auto compiles: the training forward whole (with its
                                     # loss, through the wrapper) or each block in place
    saves_in_background = False      # has start_save (train.async_checkpoint)

    def __init__(self, cfg: Config, env: DistEnv, plan: BatchPlan, precision: str):
        self.cfg, self.env, self.plan, self.precision = cfg, env, plan, precision
        self.model: torch.nn.Module | None = None  # the bare module: evaluation, sampling, reference forwards
        self.train_model: torch.nn.Module | None = None  # what the training forwards run through (a wrapper)
        self.optimizer = None

    @staticmethod
    def check(cfg: Config) -> list[str]:
        """What of the config this backend cannot do, as 'key: message' lines."""
        return []

    @abstractmethod
    def setup(self, model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], object],
              resume_from: str | None = None, saved=None) -> None:
        """Wrap the model initial_model built (on its device, with its starting weights; FSDP2's already sharded)
        and make the optimizer over what it trains. resume_from and saved (its TrainState): the checkpoint load()
        will read, for a backend that must prepare before wrapping (a conversion for another number of processes)."""

    def initial_model(self, build: Callable[[], torch.nn.Module], adapt: Callable[[torch.nn.Module], None],
                      fill: Callable[[torch.nn.Module, Callable], None]) -> torch.nn.Module:
        """The model a run trains, with its starting values, held as this backend holds it: build() makes it without
        values (on the meta device; ZeRO-3: partitioned inside zero.Init), adapt(model) adds what changes its modules
        (LoRA's adapters), fill(model, storage) writes each process's values (checkpoint.weights.fill). A failure on
        one rank stops every rank."""
        model = self.empty_model(build)
        adapt(model)
        on_every_rank(self.env, lambda: fill(model, self.storage))
        return model

    def empty_model(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The model build() makes, with storage for its weights but no values: built on the meta device, then given
        storage on this process's device. A backend that partitions parameters builds it partitioned."""
        with torch.device("meta"):
            model = build()
        return model.materialize(self.env.device)

    @staticmethod
    def storage(param: torch.Tensor) -> tuple[torch.Tensor, int, tuple] | None:
        """Where a parameter's values live in this process when it holds a share of them: (the elements it holds,
        flat; the first one's index in the whole parameter, flattened; the whole parameter's shape). None: all of
        them, as the parameter is."""
        return None

    @property
    def compute_precision(self) -> str:
        """How forwards compute: fp32, bf16 under autocast (fp32 weights), or bf16 weights (DeepSpeed bf16)."""
        if self.precision != "bf16":
            return "fp32"
        return "bf16" if next(self.model.parameters()).dtype == torch.bfloat16 else "bf16-autocast"

    @staticmethod
    def label(cfg: Config) -> str:
        """The backend as describe names it."""
        return "ddp"

    @staticmethod
    def state_bytes(cfg: Config, weights: int, trained: int, optimizer: int, processes: int,
                    precision: str) -> tuple[int, int, int]:
        """Per rank, the bytes of (parameters, gradients, optimizer state) of a model of `weights` parameters, of
        which `trained` train with `optimizer` bytes of optimizer state in all, on `processes` processes: whole on
        every rank, in fp32 (bf16 is autocast's, over fp32 weights)."""
        return 4 * weights, 4 * trained, optimizer

    def frozen_model(self, build: Callable[[], torch.nn.Module], fill: Callable[[torch.nn.Module, Callable], None],
                     dtype: torch.dtype) -> torch.nn.Module:
        """A model that only runs forwards beside the trained one (a DPO, KTO or GRPO reference), its parameters in
        `dtype` (the policy's), held as this backend holds the trained one; whole on every rank by default."""
        with torch.device("meta"):
            model = build()
        model.materialize(self.env.device, dtype)
        on_every_rank(self.env, lambda: fill(model, None))
        return model.eval().requires_grad_(False)

    def compile(self, **options) -> None:
        """train.compile of the whole model: the training forwards (and their loss) through a compiled wrapper of
        train_model (torch.compile's options: tests trace with backend="aot_eager"); evaluation and sampling keep
        the bare model, uncompiled. A backend keeps its own reference to what it wrapped (DDP's no_sync)."""
        self.train_model = torch.compile(self.train_model, **options)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, index: int, count: int):
        """Context for the forward of micro-step `index` of `count`: gradients are reduced once per step."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss`, already scaled for the global batch (the backend averages over ranks)."""

    @abstractmethod
    def step(self, max_norm: float, loss: torch.Tensor) -> tuple:
        """Clip the accumulated gradients to max_norm (0: no clipping) and apply them unless they or the loss (the
        global batch's mean, on the device) are not finite; zero them. (gradient norm before clipping, whether the
        update was applied): 0-dim tensors left on the device where the backend decides there, else numbers."""

    @abstractmethod
    def save(self, directory: str) -> list[str]:
        """Write the model and optimizer state into `directory` (every rank calls it); the files this rank wrote."""

    def start_save(self, directory: str, group) -> Callable[[], list[str]]:
        """save(), but only a copy of the state taken now (every rank calls it); the writing goes on in the background
        while training does, its collectives on `group` (a gloo group of the checkpoints' own, never the training's).
        Returns what waits for the write to end: the files this rank wrote."""
        raise NotImplementedError(f"dist.backend={self.name} writes its checkpoints only in the loop's thread")

    @abstractmethod
    def load(self, directory: str, saved) -> None:
        """Restore the model and optimizer state of a checkpoint this backend wrote (saved: its TrainState)."""

    def identity(self) -> dict:
        """The settings that decide how this backend's checkpoints are laid out: a resume must share them."""
        return {"dist.backend": self.name, "dist.zero_stage": None}

    def close(self) -> None:  # noqa: B027 (most backends hold nothing to release)
        """Release hooks and buffers while every rank is still here (the end of a run that went well)."""

    @staticmethod
    def owns(directory: str) -> bool:
        """Whether `directory` is a checkpoint in this backend's own layout (one plain weights file needs none)."""
        return False

    @staticmethod
    def consolidate(directory: str) -> dict[str, torch.Tensor]:
        """A checkpoint this backend wrote, as one plain fp32 state dict (export, generate, init_from)."""
        raise NotImplementedError
