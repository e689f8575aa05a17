#!/usr/bin/env bash
# Train one stage with torchrun: one node with N processes, or several nodes meeting at a c10d rendezvous.
#
#   launch/torchrun.sh pretrain configs/pretrain/tiny.yaml train.max_steps=100              # this machine, all GPUs
#   NNODES=2 RDZV_ENDPOINT=node1:29500 launch/torchrun.sh pretrain configs/pretrain/350m.yaml   # on each node
#
# NPROC_PER_NODE defaults to the number of GPUs (1 without any). RDZV_ID names the job (any string, the same
# on every node). Where host names do not resolve to the addresses the nodes talk over, set LOCAL_ADDR to this
# node's address and RDZV_CONF=is_host=true on the rendezvous node (false elsewhere). Launchers hold no
# training logic: stage, config and overrides are passed through.
set -euo pipefail
stage=$1 config=$2
shift 2
python=${PYTHON:-python}
nproc=${NPROC_PER_NODE:-$("$python" -c "import torch; print(max(1, torch.cuda.device_count()))")}
extra=()
[ -n "${LOCAL_ADDR:-}" ] && extra+=(--local_addr "$LOCAL_ADDR")
[ -n "${RDZV_CONF:-}" ] && extra+=(--rdzv_conf "$RDZV_CONF")
exec "$python" -m torch.distributed.run --nnodes "${NNODES:-1}" --nproc_per_node "$nproc" \
    --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:-localhost:29500}" --rdzv_id "${RDZV_ID:-shardlm}" \
    "${extra[@]}" -m "training.$stage" --config "$config" "$@"
