#!/usr/bin/env bash
# Entrypoint of the mmpt image.
#
#   train ARGS...   one torchrun agent for this node, running `mmpt train ARGS...` on every rank
#   --help, help    this text
#   anything else   run as given (bash, mmpt plot RUN_DIR, ibv_devinfo, python ...)
#
# `train` reads the node layout from the environment:
#   NPROC_PER_NODE  ranks on this node (default: number of visible GPUs, or 1 without GPUs)
#   NNODES          number of nodes (default 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous on the first node; required when NNODES > 1
#                   (default for one node: torchrun --standalone, a free local port)
#   RDZV_ID         rendezvous id shared by all nodes of one job (default: mmpt)
#   MAX_RESTARTS    torchrun restarts of the whole rank group after a failure (default 0); each
#                   restart resumes from the newest complete checkpoint
#   MMPT_NCCL_ENV   file to source before starting (e.g. a copy of launch/slurm/nccl-roce.env)
set -euo pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

case "${1:-help}" in
  help|--help|-h)
    usage
    exit 0
    ;;
  train)
    shift
    ;;
  *)
    exec "$@"
    ;;
esac

if [ -n "${MMPT_NCCL_ENV:-}" ]; then
  if [ ! -r "$MMPT_NCCL_ENV" ]; then
    echo "mmpt-entrypoint: MMPT_NCCL_ENV=$MMPT_NCCL_ENV is not a readable file" >&2
    exit 2
  fi
  set -a
  # shellcheck disable=SC1090
  . "$MMPT_NCCL_ENV"
  set +a
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
nnodes="${NNODES:-1}"

rdzv=()
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=${RDZV_ID:-mmpt}")
elif [ "$nnodes" = "1" ]; then
  rdzv=(--standalone)
else
  echo "mmpt-entrypoint: NNODES=$nnodes needs RDZV_ENDPOINT=host:port of the first node" >&2
  exit 2
fi

# A fresh TCPStore per restart attempt (see launch/slurm/train.sbatch: pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

set -x
exec torchrun --nnodes="$nnodes" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}" \
  --max-restarts="${MAX_RESTARTS:-0}" -m train.cli train "$@"
