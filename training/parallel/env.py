"""Process-group set-up and the few collectives the loop needs. Ranks come from torchrun, Slurm (srun) or MPI
(mpirun/mpiexec) environment variables; one process with none of them is the single-process debug mode.
dist.backend=none is the config's word for one process; which backends need a process group even for one process,
the backend says (Backend.group_always)."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from preprocess.errors import UserError, environment_error
from preprocess.ranks import ranks_from_env

# how long ranks wait for rank 0's one-rank work (resolving and hashing a starting checkpoint, converting one):
# longer than any collective should take; a rank 0 that dies ends the job through its launcher
PATIENCE = timedelta(hours=6)
_from_rank0_calls = itertools.count()

_started_process_group = False
_shared_group = False  # set by shared_process_group(): a run's init and shutdown leave the group to its owner
_host_group = None  # gloo, beside the default group: for the values the host holds (host_sums, host_group)
_timeout: timedelta | None = None  # dist.timeout_s of the group init() made


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


def init(backend: str, device: str, timeout_s: int, group_always: bool = False) -> DistEnv:
    """This process's rank and device, and the process group when there are several processes (or always, for a
    backend that wants one even alone)."""
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
    if _shared_group and dist.is_initialized():
        return env
    if world > 1 or group_always:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # torchrun sets both; MPI and Slurm single-node runs may not
        os.environ.setdefault("MASTER_PORT", "29500")
        global _started_process_group
        _started_process_group = True
        global _timeout
        _timeout = timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world, timeout=_timeout)
    return env


def shutdown(env: DistEnv) -> None:
    global _host_group
    if dist.is_initialized() and not _shared_group:
        dist.destroy_process_group()  # every group, the host's too
        _host_group = None


@contextlib.contextmanager
def shared_process_group(backend: str, device: str, timeout_s: int, group_always: bool = False):
    """One process group for several runs of the loop in this process (training.lr_find's fixed-rate runs): each
    run's init finds it and its shutdown leaves it. A group created again after one was destroyed would meet the
    first one's rendezvous keys in the launcher's store."""
    global _shared_group
    env = init(backend, device, timeout_s, group_always)
    _shared_group = True
    try:
        yield env
    finally:
        _shared_group = False
        shutdown(env)


def exit_process(code: int) -> None:
    """End a process that used a process group, skipping the interpreter's final teardown.

    gloo's worker threads outlive destroy_process_group (torch 2.13), and a worker that releases the last
    reference to a finished collective takes the GIL to drop the Python state captured with it. If that happens
    while the interpreter is finalizing, Python 3.11 exits the thread with pthread_exit, whose unwinding
    through C++ aborts the process ("terminate called without an active exception", exit -6) after all the
    work is done — seen in about 1 run in 10 on some machines. So: what a normal exit does before finalizing
    (wind_down), then os._exit."""
    try:
        wind_down()
    finally:
        os._exit(code)


def wind_down() -> None:
    """What the interpreter does at its end before finalizing: stop thread pools and join Python threads, run the
    atexit handlers, flush stdout and stderr."""
    if threading.current_thread() is threading.main_thread():
        threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


def run_command(action) -> int:
    """action() → an exit code, for a command that may have used a process group: a bug there still prints its
    traceback, and the process ends through exit_process (see there) instead of the interpreter's teardown."""
    try:
        code = action()
    except Exception:
        if not used_process_group():
            raise
        traceback.print_exc()
        code = 1
    if used_process_group():
        exit_process(code)
    return code


def used_process_group() -> bool:
    """Whether this process started a process group (whose threads outlive it: see exit_process)."""
    return _started_process_group


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def raise_if_any(env: DistEnv, problem: str | None, elsewhere: str) -> None:
    """Every rank stops when any had a problem — its own line, or `elsewhere` on a rank that had none — agreed
    before the work that would follow, so that no rank goes on into collectives the others never reach."""
    if int(all_reduce_sum(env, torch.tensor(int(problem is not None), device=env.device))):
        raise UserError(problem or elsewhere)


def host_sums(env: DistEnv, values: list[float]) -> list[float]:
    """Each value summed over the ranks, where the host holds them: through gloo, so neither a copy to the GPU nor
    a read back from it waits for the work queued there."""
    if not env.distributed:
        return list(values)
    buffer = np.array(values, dtype=np.float64)
    dist.all_reduce(torch.from_numpy(buffer), group=host_group())
    return buffer.tolist()


def host_group():
    """The gloo group of host_sums, beside the default group whatever its backend (NCCL on GPUs; on CPUs, where the
    tests run it, gloo too): made at its first use, which every rank reaches at the same point of the loop."""
    global _host_group
    if _host_group is None:
        _host_group = gloo_group("each step's counts and stop flags, summed on the host", _timeout)
    return _host_group


def gloo_group(purpose: str, timeout: timedelta | None = None):
    """A new gloo group of every rank (every rank makes it at the same point of the run), its collectives waiting up
    to `timeout` (dist.timeout_s when None); None without a process group. gloo finds its interface
    by the host's name, not by the default route; where NCCL is told its interface by a plain NCCL_SOCKET_IFNAME,
    gloo takes the same unless GLOO_SOCKET_IFNAME says otherwise."""
    if not dist.is_initialized():
        return None
    nccl = os.environ.get("NCCL_SOCKET_IFNAME", "")
    if nccl and not nccl.startswith(("^", "=")):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", nccl)
    try:
        return dist.new_group(backend="gloo", timeout=timeout or _timeout)
    except RuntimeError as e:  # DistBackendError and gloo's connection errors among them
        raise UserError(f"gloo ({purpose}) could not connect the ranks ({first_line(e)}): set GLOO_SOCKET_IFNAME "
                        f"to the network interface they reach each other on (e.g. ib0, eth1)") from e


def all_reduce_min(env: DistEnv, value: int) -> int:
    """The smallest of every rank's value: e.g. whether every rank has a file (1) or one lacks it (0)."""
    if not env.distributed:
        return value
    t = torch.tensor(value, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def from_rank0(env: DistEnv, work):
    """work() on rank 0 alone (a decision taken once, or a file only one rank may write), its result (JSON
    types) on every rank. An error there stops every rank with rank 0's line, instead of leaving the others in
    a collective. They wait on the process group's store up to PATIENCE, not dist.timeout_s: the work may be
    long (hashing or converting a large checkpoint)."""
    result = error = None
    failure = None
    if env.is_main:
        try:
            result = work()
        except UserError as e:
            error = str(e)
        except OSError as e:
            error = environment_error(e)
        except Exception as e:  # a bug, or a library's own error: its traceback on rank 0, one line elsewhere
            failure = e
            error = f"rank 0 failed ({type(e).__name__}: {first_line(e)}; its traceback is there)"
    if env.distributed:
        store = dist.distributed_c10d._get_default_store()
        key = f"shardlm/from_rank0/{next(_from_rank0_calls)}"
        if env.is_main:
            store.set(key, json.dumps([result, error]))
        else:
            store.wait([key], PATIENCE)
            result, error = json.loads(store.get(key))
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)
    return result


def on_every_rank(env: DistEnv, work, group=None) -> list:
    """work() on every rank (each writing or hashing its share of a checkpoint): every rank's result, on every
    rank, gathered over `group` (the default group's when None). Where it fails on any rank (a full disk, a
    vanished file, a bug), every rank stops at once — the failing one with its own error, the others with the first
    failing rank's line — instead of the others meeting a rank that has left in their next collective ("lost
    contact")."""
    result = failure = error = None
    try:
        result = work()
    except UserError as e:
        failure, error = e, str(e)
    except OSError as e:
        failure, error = e, environment_error(e)
    except Exception as e:  # a bug, or a library's own error: its traceback there, one line elsewhere
        failure, error = e, f"rank {env.rank} failed ({type(e).__name__}: {first_line(e)}; its traceback is there)"
    outcomes = [(result, error)]
    if env.distributed:
        outcomes = [None] * env.world_size
        dist.all_gather_object(outcomes, (result, error), group=group)
    if failure is not None:
        raise failure
    first = next((e for _, e in outcomes if e is not None), None)
    if first is not None:
        raise UserError(first)
    return [r for r, _ in outcomes]


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def barrier(env: DistEnv, group=None) -> None:
    if env.distributed:
        dist.barrier(group=group)
