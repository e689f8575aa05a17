#!/usr/bin/env bash
# Write shards with K MPI ranks (on one machine or across a hostfile); the result is byte-identical to one
# process. `pip install 'shardlm[mpi]'` provides mpirun (MPICH) and mpi4py: rank 0 then hands the work units
# out, largest first, to whichever rank has a free worker, and writes the manifest after a barrier. Without
# mpi4py (or with SHARDLM_MPI=0) each rank takes every K-th unit, as under srun.
#
#   RANKS=4 launch/mpi/preprocess.sh --kind pretrain --input 'data/*.jsonl' --tokenizer tok/tokenizer.model --out shards/pretrain
#   RANKS=16 MPIRUN_ARGS="-f hostfile" launch/mpi/preprocess.sh ...
#
# Give each rank its workers with --workers N (default: all cores of its machine).
set -euo pipefail
exec mpirun -n "${RANKS:-2}" ${MPIRUN_ARGS:-} "${PYTHON:-python}" -m preprocess shards "$@"
