"""dist.backend=fsdp2: PyTorch's fully sharded data parallelism (torch.distributed.fsdp.fully_shard, parameters as
DTensors). Each block, and the root with the embedding, final norm and output layer, is sharded over the ranks:
every rank holds 1/N of each parameter, its gradient and its optimizer state; a block's parameters are gathered
for its forward and its backward and released after (dist.reshard_after_forward), its gradients reduce-scattered
once per optimizer step. Under train.precision=bf16 the gathered parameters compute in bf16 and the gradients are
reduced in fp32 (MixedPrecisionPolicy): the sharded fp32 parameters are the optimizer's master weights.
torch.distributed's FSDP, DTensor and DCP modules are imported where they are used: their start-up cost
(docs/architecture.md, with the command that measures it) is not paid by commands that never shard.

A checkpoint is a torch.distributed.checkpoint (DCP) directory: each rank writes its shards, rank 0 the metadata;
it loads on any number of processes, each rank reading the pieces of its own shards (no conversion step).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from preprocess.errors import UserError

from ..checkpoint.store import write_failure
from ..config import Config
from .base import Backend
from .ddp import clip_and_apply
from .env import first_line, on_every_rank

METADATA = ".metadata"  # DCP's index of a checkpoint: what it holds, in which file at which offset


@contextlib.contextmanager
def writing(directory: str, needed: int):
    """DCP's failure to write a checkpoint (every rank's failures, on every rank; a BaseException) as the store
    reports a failed write (write_error)."""
    from torch.distributed.checkpoint.api import CheckpointException  # (start-up: the module's docstring)

    try:
        yield
    except CheckpointException as e:
        raise write_error(e, directory, needed) from None


def write_error(e, directory: str, needed: int) -> Exception:
    """DCP's failure to write, as the store reports a failed write: the first rank's failed write as an OSError
    naming the checkpoint directory (checkpoint.store.write_failure), else the first rank's error."""
    for exc, _ in e.failures.values():
        failure = write_failure(exc, directory, needed)
        if failure is not None:
            return failure
    rank, (first, _) = next(iter(e.failures.items()))
    return RuntimeError(f"rank {rank} failed to write its part of the checkpoint ({type(first).__name__}: {first})")


def local_bytes(state) -> int:
    """The bytes of this rank's shards in a (nested) state dict: what it writes of a checkpoint."""
    if isinstance(state, dict):
        return sum(local_bytes(v) for v in state.values())
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


class FSDP2(Backend):
    name = "fsdp2"
    group_always = True  # fully_shard shards over a device mesh, a process group even for one process
    saves_in_background = True  # DCP's async_save
    compile_scope = "blocks"  # each block compiled in place, once sharded; dynamo leaves FSDP2's hooks out

    @staticmethod
    def label(cfg: Config) -> str:
        return "fsdp2"

    @staticmethod
    def check(cfg: Config) -> list[str]:
        if cfg.train.compile and cfg.train.compile_scope == "model":
            return ["train.compile_scope=model: FSDP2 gathers each block's weights in hooks around it, which a "
                    "whole-model graph would trace through; use train.compile_scope=blocks (or auto)"]
        if cfg.train.float8:
            return ["train.float8=true: not with dist.backend=fsdp2 yet (untested together); use dist.backend=ddp"]
        if cfg.dist.offload_optimizer or cfg.dist.offload_params:
            return ["dist.offload_optimizer, dist.offload_params: not under dist.backend=fsdp2, which keeps every shard "
                    "on the run's device"]
        return []

    @staticmethod
    def state_bytes(cfg, weights, trained, optimizer, processes, precision):
        """Each a shard of 1/processes, in fp32 (the sharded weights are the masters; bf16 only while gathered)."""
        return 4 * weights // processes, 4 * trained // processes, optimizer // processes

    @property
    def compute_precision(self) -> str:
        return "bf16-mixed" if self.precision == "bf16" else "fp32"  # bf16 weights gathered from fp32 shards

    def initial_model(self, build, adapt, fill):
        """Built on the meta device (LoRA's adapters too), sharded, then given storage for this rank's shards alone,
        which fill writes: no rank holds the whole model (checkpoint.weights.fill: at most one whole parameter)."""
        return self.sharded(build, adapt, fill, self.cfg.dist.reshard_after_forward)

    def frozen_model(self, build, fill, dtype):
        """Sharded as the trained model is (its fp32 shards gathered in bf16 under train.precision=bf16, as the
        policy's), each block's weights gathered for its forward and released after."""
        return self.sharded(build, lambda model: None, fill, True).eval().requires_grad_(False)

    def sharded(self, build, adapt, fill, reshard_after_forward: bool):
        with torch.device("meta"):
            model = build()
        adapt(model)
        self.shard(model, reshard_after_forward)
        model.materialize(self.env.device)
        on_every_rank(self.env, lambda: fill(model, self.storage))
        return model

    @staticmethod
    def storage(param):
        """A parameter's shard on this rank: FSDP2 splits dim 0 as torch.chunk does, ceil(rows / ranks) rows to each
        rank in turn (the last ones fewer or none); the shard's rows are contiguous in the whole, flattened."""
        if not hasattr(param, "to_local"):
            return None
        local, rows = param.to_local(), param.shape[0]
        first = min(rows, param.device_mesh.get_local_rank() * -(-rows // param.device_mesh.size()))
        return local.view(-1), first * math.prod(param.shape[1:]), tuple(param.shape)

    def setup(self, model, make_optimizer, resume_from=None, saved=None) -> None:
        from torch.distributed.fsdp import FSDPModule  # (start-up: the module's docstring)

        if not isinstance(model, FSDPModule):  # each rank would train a model of its own
            raise TypeError("dist.backend=fsdp2 trains the model its initial_model built and sharded")
        self.model = self.train_model = model
        self.optimizer = make_optimizer(model)

    @functools.cached_property
    def mesh(self):
        """The ranks' 1-D mesh on the run's device (fully_shard's default is the machine's accelerator, even for a
        CPU run)."""
        from torch.distributed.device_mesh import init_device_mesh  # (start-up: see the module's docstring)

        return init_device_mesh(self.env.device.type, (self.env.world_size,))

    def shard(self, model, reshard_after_forward: bool):
        """Each block, then the root (embedding, final norm, output layer), sharded over the ranks in place. The
        blocks' inputs are not cast to bf16 (the rotary tables stay fp32, as under autocast); the root keeps its
        weights gathered from its forward to its backward, FSDP2's own rule for the root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # (start-up: the module's docstring)

        bf16 = self.precision == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
        for layer in model.layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        return fully_shard(model, mesh=self.mesh, mp_policy=policy)

    def backward(self, loss: torch.Tensor) -> None:
        """Each micro-step's gradients are reduce-scattered into the shards as its backward ends, so that no rank
        holds a whole gradient between micro-steps (FSDP2's set_requires_gradient_sync(False) would keep them
        whole until the last: DDP's memory, for fewer collectives)."""
        loss.backward()

    def step(self, max_norm: float, loss: torch.Tensor):
        return clip_and_apply(self.model, self.optimizer, max_norm, loss)

    def optimizers(self) -> tuple:
        """The optimizers DCP's state-dict helpers take: Muon's combined one is two (models/optim.py)."""
        return tuple(getattr(self.optimizer, "optimizers", (self.optimizer,)))

    def state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict  # (start-up: the module's docstring)

        model, optimizer = get_state_dict(self.model, self.optimizers())
        return {"model": model, "optimizer": optimizer}

    def save(self, directory: str) -> list[str]:
        import torch.distributed.checkpoint as dcp  # (start-up: the module's docstring)

        state = self.state()
        with writing(directory, local_bytes(state)):
            dcp.save(state, checkpoint_id=directory)
        return self.files(directory)

    def start_save(self, directory: str, group):
        """DCP's async_save: this rank's shards and its optimizer state copied to host memory now (not pinned), and
        written from there by a thread of DCP's while training goes on."""
        import torch.distributed.checkpoint as dcp  # (start-up: the module's docstring)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        state = self.state()
        needed = local_bytes(state)
        # the copy, made once (the writer's own stager copies a DTensor twice), then written from host memory:
        # per_thread_copy_ahead=0, since DCP's default would, on a GPU machine, copy it again through a CUDA stream
        # taken in its own thread, whose device is GPU 0 on every rank
        stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                              use_async_staging=False, use_non_blocking_copy=False))
        writer = dcp.FileSystemWriter(directory, per_thread_copy_ahead=0)
        try:
            future = dcp.async_save(state, storage_writer=writer, process_group=group, async_stager=stager)
        except BaseException:
            stager.close()  # it keeps what it copied until closed
            raise
        del state  # the copy is DCP's now

        def written() -> list[str]:
            try:
                with writing(directory, needed):
                    future.result()
            finally:
                stager.close()
            return self.files(directory)
        return written

    def files(self, directory: str) -> list[str]:
        """What this rank wrote of a DCP checkpoint: its shard files, and rank 0 the metadata."""
        mine = [n for n in os.listdir(directory) if n.startswith(f"__{self.env.rank}_") and n.endswith(".distcp")]
        return [os.path.join(directory, n) for n in mine + ([METADATA] if self.env.is_main else [])]

    def load(self, directory: str, saved) -> None:
        import torch.distributed.checkpoint as dcp  # (start-up: the module's docstring)
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self.state()
        try:
            dcp.load(state, checkpoint_id=directory)
        except CheckpointException as e:  # a BaseException: one line, the first rank's
            rank, (first, _) = next(iter(e.failures.items()))
            raise UserError(f"{directory}: rank {rank} could not read its part of the checkpoint "
                            f"({type(first).__name__}: {first_line(first)})") from None
        set_state_dict(self.model, self.optimizers(), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(strict=True))

    @staticmethod
    def owns(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, METADATA))

    @staticmethod
    def consolidate(directory: str) -> dict[str, torch.Tensor]:
        """The model's tensors, whole, read in this one process (no process group)."""
        import torch.distributed.checkpoint as dcp  # (start-up: the module's docstring)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = dcp.FileSystemReader(directory).read_metadata()
        model = {key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
                 for key, m in metadata.state_dict_metadata.items()
                 if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        if not model:
            raise UserError(f"{directory}: a DCP checkpoint without model weights")
        dcp.load({"model": model}, checkpoint_id=directory, no_dist=True)
        return {k: v.float() for k, v in model.items()}
