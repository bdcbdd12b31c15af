#!/usr/bin/env bash
# Creates .venv with plait (editable) and its test tools, from a bare clone.
#
# torch: if the Python that makes the venv can already import torch, the venv
# sees it (--system-site-packages) and nothing is downloaded. Otherwise torch is
# installed pinned, as torch==2.13.0 (override with PLAIT_TORCH=...): on our CPU
# machines that pin resolves to a local CPU build, where an unpinned `torch`
# would pull a CUDA build of several GB. pyproject.toml itself keeps torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "${PLAIT_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
touch .venv/.installed
