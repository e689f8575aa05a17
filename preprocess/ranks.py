"""Which process of a multi-process job this is, from the launcher's environment variables: torchrun, Open MPI
and MPICH (`mpirun`/`mpiexec`), Slurm's `srun`, and — for preprocessing only — Slurm array jobs. No MPI library
is needed: the launchers already say everything."""

from __future__ import annotations

import os

# (name, rank variable, world-size variable, local-rank variable), most specific first
LAUNCHERS = [
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MPICH", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("Slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),  # STEP_: set by srun, not by sbatch alone
]


def ranks_from_env(environ=os.environ, arrays: bool = False) -> tuple[int, int, int, str]:
    """(rank, world size, local rank, launcher); (0, 1, 0, "none") for a lone process.

    arrays=True also reads a Slurm array job's task id and count: independent jobs that split one piece of
    work (preprocessing units), but not a process group (training)."""
    for name, rank, size, local in LAUNCHERS:
        if rank in environ and size in environ and int(environ[size]) > 1:
            return int(environ[rank]), int(environ[size]), int(environ.get(local, 0)), name
    if arrays and "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"]), 0, "Slurm array"
    return 0, 1, 0, "none"
