#!/usr/bin/env bash
# A second environment, .venv-proc, with torch 2.14.1 + torchvision 0.29.1 (both from this
# machine's disk; a CUDA build that runs on the CPU, ~5.5 GB): transformers' InternVLProcessor
# needs torchvision for its image processor (GotOcr2ImageProcessorFast), and PyPI's torchvision
# does not import beside the CPU torch 2.13 of .venv. The package goes in with its dependencies,
# held by a constraints file so that nothing replaces that torch. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
check='import torch, torchvision, transformers, internvl_tools; from transformers import GotOcr2ImageProcessor'
if [ -x .venv-proc/bin/python ] && .venv-proc/bin/python -c "$check" 2>/dev/null; then
  echo "ready: .venv-proc"; exit 0
fi
[ -x .venv-proc/bin/python ] || python3 -m venv .venv-proc
.venv-proc/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$tmp"/constraints.txt
# the same transformers as .venv when it is there, so that both environments test one version
if [ -x .venv/bin/python ] && v=$(.venv/bin/python -c "import transformers; print(transformers.__version__)" 2>/dev/null); then
  echo "transformers==$v" >> "$tmp"/constraints.txt
fi
.venv-proc/bin/pip install --quiet -c "$tmp"/constraints.txt -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv-proc/bin/python -c "$check; print('ready: .venv-proc | torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
