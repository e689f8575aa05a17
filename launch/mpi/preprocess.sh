#!/usr/bin/env bash
# Write shards with K MPI ranks (on one machine or across a hostfile); the ranks split the work units and the
# result is byte-identical to one process. `pip install 'shardlm[mpi]'` provides mpirun (MPICH).
#
#   RANKS=4 launch/mpi/preprocess.sh --kind pretrain --input 'data/*.jsonl' --tokenizer tok/tokenizer.model --out shards/pretrain
#   RANKS=16 MPIRUN_ARGS="-f hostfile" launch/mpi/preprocess.sh ...
#
# Each rank reads its rank from the launcher's variables; give each its workers with --workers N.
set -euo pipefail
exec mpirun -n "${RANKS:-2}" ${MPIRUN_ARGS:-} "${PYTHON:-python}" -m preprocess shards "$@"
