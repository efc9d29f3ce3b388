#!/usr/bin/env bash
# Set up sdlora in ./.venv on a fresh machine: `bash scripts/setup.sh` (use), `bash scripts/setup.sh --test`
# (also the test tools and Debian's Chromium for the browser tests).
# Without CUDA this installs PyTorch's CPU build; with an NVIDIA GPU install the CUDA build of torch into
# .venv first (see README), and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
else
  .venv/bin/pip install -q -e .
fi
