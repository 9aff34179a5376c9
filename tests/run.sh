#!/usr/bin/env bash
# The test command: set up (or reuse) the venv, then run the whole suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k config -x`; the GPU lane (deselected
# by default) is `bash tests/run.sh -m gpu`: on a machine without CUDA its tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
# The SLURM launcher test needs slurm-wlm and munge; setup installs them when missing.
MMPT_WITH_SLURM="${MMPT_WITH_SLURM:-1}" bash launch/setup.sh dev,hf
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
