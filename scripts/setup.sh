#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch, then this package.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first, the CPU build: an unpinned torch from PyPI is a multi-GB CUDA build. PyTorch's own
# CPU index is tried first (a plain machine); where it is unreachable (package registries only,
# as on this project's machines), PyPI's torch==2.13.0, which there resolves to a local CPU wheel.
# TORCH_INDEX_URL overrides the first choice (e.g. a mirror of https://download.pytorch.org/whl/cpu).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if ! .venv/bin/pip install --quiet --timeout 15 --retries 0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
       "torch==2.13.0" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
  fi
fi
.venv/bin/pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import internvl_tools, torch, transformers; print('ready: internvl-tools', internvl_tools.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
