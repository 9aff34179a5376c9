#!/usr/bin/env bash
# Create or reuse the project venv (.venv) and install the project with its extras.
# torch is pinned through constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
# Usage: bash launch/setup.sh [EXTRAS]   (default extras: dev,hf)
# MMPT_WITH_SLURM=1 also installs Debian's slurm-wlm and munge (root, apt) when missing: the
# SLURM launcher test runs a real one-node cluster (tests/run.sh sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,hf}"
venv="${MMPT_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.mmpt-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing mmpt[$extras] into $venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -c constraints.txt "torch==2.13.0"
  "$venv/bin/pip" install -q -c constraints.txt -e ".[$extras]"
  echo "$want" > "$stamp"
fi
if [ "${MMPT_WITH_SLURM:-0}" = 1 ] && ! command -v slurmctld >/dev/null; then
  echo "[setup] installing slurm-wlm and munge (MMPT_WITH_SLURM=1)"
  bash launch/slurm/local_cluster.sh install \
    || echo "[setup] warning: could not install slurm-wlm/munge; tests/test_launch.py's SLURM test will fail" >&2
fi
