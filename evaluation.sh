#!/usr/bin/env bash
# Run the three benchmarks of one checkpoint (SPEC §7); resumable: rerun the same command after a crash.
#   bash evaluation.sh CHECKPOINT DATA_ROOT OUT [--tasks ...] [--flow per_finding] [--limit N] [--device cpu] ...
# Score an existing predictions file instead: python -m evaluation score PREDICTIONS DATA_ROOT OUT
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: bash evaluation.sh CHECKPOINT DATA_ROOT OUT [options]  (python -m evaluation run --help)" >&2
  exit 2
fi
# Paths stay relative to where the user is; the repository only goes on the import path.
REPO="$(cd "$(dirname "$0")" && pwd)"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m evaluation run "$@"
