"""Process-group set-up and the few collectives the loop needs. Ranks come from torchrun, Slurm (srun) or MPI
(mpirun/mpiexec) environment variables; one process with none of them is the single-process debug mode."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from preprocess.errors import UserError
from preprocess.ranks import ranks_from_env


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(backend: str, device: str, timeout_s: int) -> DistEnv:
    rank, world, local_rank, launcher = ranks_from_env()
    if backend == "none" and world > 1:
        raise UserError(f"launched as {world} processes ({launcher}) but dist.backend=none")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank, world, local_rank, dev, launcher)
    if world > 1 or backend == "deepspeed":  # DeepSpeed wants a process group even for one process
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # torchrun sets both; MPI and Slurm single-node runs may not
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return env


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def wrap(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP when there are several processes; the bare model otherwise."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The model's only buffers are rotary tables, identical everywhere: syncing them before every forward would
    # cost a collective per micro-step (and deadlock ranks that run different numbers of forwards).
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None, forward_sync_buffers=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def no_sync(model: torch.nn.Module, skip_sync: bool):
    """DDP's no_sync on every micro-step but the last: gradients are all-reduced once per optimizer step."""
    return model.no_sync() if skip_sync and hasattr(model, "no_sync") else contextlib.nullcontext()
