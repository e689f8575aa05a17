#!/usr/bin/env bash
# Train one stage with DeepSpeed's launcher, on this machine or on the hosts of a hostfile:
#
#   launch/deepspeed.sh pretrain configs/pretrain/1b.yaml dist.backend=deepspeed dist.zero_stage=3
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh pretrain configs/pretrain/1b.yaml dist.backend=deepspeed
#
# NUM_GPUS per node (default: all), MASTER_PORT (default 29500; pick another when two jobs share a machine).
# The launcher adds --local_rank=N to our arguments, which the entry points accept and ignore: ranks come from
# the environment it sets. dist.backend=deepspeed selects the ZeRO engine (dist.zero_stage, dist.offload_*).
set -euo pipefail
stage=$1 config=$2
shift 2
args=(--master_port "${MASTER_PORT:-29500}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
exec "${DEEPSPEED:-deepspeed}" "${args[@]}" --module "training.$stage" --config "$config" "$@"
