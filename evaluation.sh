#!/usr/bin/env bash
# Run the three benchmarks of one checkpoint (SPEC §7); resumable: rerun the same command after a crash.
#   bash evaluation.sh CHECKPOINT DATA_ROOT OUT [--gpus N] [--tasks ...] [--flow per_finding] [--limit N] ...
# --gpus N (default 1) shards the prediction over N processes on this machine with torchrun, one GPU each (gloo
# processes on a machine without CUDA); rank 0 merges the shards and scores. The rest goes to python -m evaluation run.
# Score an existing predictions file instead: python -m evaluation score PREDICTIONS DATA_ROOT OUT
set -euo pipefail
usage="usage: bash evaluation.sh CHECKPOINT DATA_ROOT OUT [--gpus N] [options]  (python -m evaluation run --help)"
gpus=1
args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --gpus) [ "$#" -ge 2 ] || { echo "error: --gpus needs a number of processes; $usage" >&2; exit 2; }
            gpus="$2"; shift 2 ;;
    --gpus=*) gpus="${1#--gpus=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ "${#args[@]}" -lt 3 ]; then
  echo "$usage" >&2
  exit 2
fi
if ! [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --gpus must be a whole number ≥ 1, got '$gpus'" >&2
  exit 2
fi
# Paths stay relative to where the user is; the repository only goes on the import path.
REPO="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$gpus" -eq 1 ]; then
  exec "${PYTHON:-python}" -m evaluation run "${args[@]}"
fi
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m evaluation run "${args[@]}"
