"""How the processes of one preprocessing job share its units. Which process writes a unit never changes its bytes,
so every way gives the same output.

- `StaticGroup` (one process, srun, Slurm arrays, torchrun-style variables): unit i belongs to rank i % world;
  the ranks meet only through the shared output directory, and the last one to finish writes the manifest.
- `MPIGroup` (mpirun with mpi4py importable): rank 0 hands units out, largest first, to whichever rank has a
  free worker, so one large file does not hold up the job; a barrier before the manifest, which rank 0 writes
  and then shares.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

from .errors import UserError
from .ranks import ranks_from_env

POLL_S = 1.0
SERVE_POLL_S = 0.005
_REQUEST, _REPLY = 11, 12


class StaticGroup:
    dynamic = False

    def __init__(self, rank: int = 0, world: int = 1, launcher: str = "none"):
        self.rank, self.world, self.launcher = rank, world, launcher

    def tasks(self, tasks: list, position: dict, phase: str):
        """This rank's share of `tasks` (items of the plan; position[name] is its index in the plan)."""
        return [t for t in tasks if position[t[0]] % self.world == self.rank]

    def wait_for(self, ready, what: str) -> None:
        """Until ready() holds on the shared directory: other ranks may still be at work."""
        if self.world == 1 or ready():
            return
        said = time.monotonic()
        print(f"rank {self.rank}: waiting for the {what} of other ranks", file=sys.stderr)
        while not ready():
            time.sleep(POLL_S)
            if time.monotonic() - said > 300:
                print(f"rank {self.rank}: still waiting for the {what} of other ranks", file=sys.stderr)
                said = time.monotonic()

    def barrier(self) -> None:
        pass

    def share(self, value):
        return value

    def gather(self, value) -> list:
        return [value]


class MPIGroup:
    dynamic = True

    def __init__(self, comm):
        self.comm, self.rank, self.world, self.launcher = comm, comm.Get_rank(), comm.Get_size(), "mpi4py"

    def tasks(self, tasks: list, position: dict, phase: str):
        """Units pulled one at a time from rank 0's queue (`tasks` come largest first) as this rank's workers
        free up. Every rank plans the same job, so only names travel."""
        by_name = {t[0]: t for t in tasks}
        if self.rank == 0:
            queue = collections.deque(t[0] for t in tasks)
            lock = threading.Lock()

            def take():
                with lock:
                    return queue.popleft() if queue else None

            # run_units forks its worker processes before it asks for the first task, so none inherits the thread
            server = threading.Thread(target=self._serve, args=(take,), daemon=True)
            server.start()
            while (name := take()) is not None:
                yield by_name[name]
            server.join()  # (after an error the job is aborted instead: see preprocess.__main__)
        else:
            while True:
                self.comm.send(phase, dest=0, tag=_REQUEST)
                name = self.comm.recv(source=0, tag=_REPLY)
                if name is None:
                    return
                yield by_name[name]

    def _serve(self, take) -> None:
        MPI = _mpi()
        finished = 0  # ranks told that nothing is left
        status = MPI.Status()
        while finished < self.world - 1:
            # a blocking receive spins a core in most MPI libraries, taking it from rank 0's own encoding
            while not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_REQUEST, status=status):
                time.sleep(SERVE_POLL_S)
            self.comm.recv(source=status.Get_source(), tag=_REQUEST)
            name = take()
            self.comm.send(name, dest=status.Get_source(), tag=_REPLY)
            finished += name is None

    def wait_for(self, ready, what: str) -> None:
        self.comm.Barrier()
        if not ready():  # every rank has finished its part, so this is a filesystem that does not share
            raise UserError(f"the {what} of other ranks are not visible here after they finished: is the output "
                            "directory on a filesystem every rank shares?")

    def barrier(self) -> None:
        self.comm.Barrier()

    def share(self, value):
        """rank 0's value, on every rank."""
        return self.comm.bcast(value, root=0)

    def gather(self, value) -> list | None:
        return self.comm.gather(value, root=0)

    def abort(self, code: int) -> None:
        self.comm.Abort(code)


def _mpi():
    from mpi4py import MPI
    return MPI


def job_group(rank: int | None = None, world: int | None = None):
    """The group this process belongs to: explicit --rank/--world, else MPI when launched by mpirun and mpi4py
    imports, else the launcher's environment variables (srun, Slurm arrays), else a group of one."""
    env_rank, env_world, _, launcher = ranks_from_env(arrays=True)
    if rank is not None or world is not None:
        rank, world = rank or 0, world or 1
        if not 0 <= rank < world:
            raise UserError(f"--rank {rank} is not in 0..{world - 1} (--world {world})")
        return StaticGroup(rank, world, "explicit")
    if launcher in ("Open MPI", "MPICH") and os.environ.get("SHARDLM_MPI", "1") != "0":
        try:
            from mpi4py import MPI
        except ImportError:
            pass
        else:
            comm = MPI.COMM_WORLD
            if comm.Get_size() != env_world:  # mpi4py built for another MPI than the one that launched us
                raise UserError(f"mpi4py sees {comm.Get_size()} process(es) but {launcher}'s mpirun started "
                                f"{env_world}: mpi4py was built for another MPI library; install the matching one, "
                                "or set SHARDLM_MPI=0 to split the units without MPI")
            if MPI.Query_thread() < MPI.THREAD_SERIALIZED:  # rank 0 serves units from a second thread
                raise UserError("this MPI library gives mpi4py no thread support; set SHARDLM_MPI=0 to split the "
                                "units without MPI")
            return MPIGroup(comm)
    return StaticGroup(env_rank, env_world, launcher)
