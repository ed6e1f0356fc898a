#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch, then this package.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first, pinned to the local CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import internvl_tools, torch, transformers; print('ready: internvl-tools', internvl_tools.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
