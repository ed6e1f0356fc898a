#!/usr/bin/env bash
# A second environment, .venv-gptq, with GPTQModel + optimum next to the same CPU torch: what
# transformers needs to load GPTQ checkpoints. gptqmodel declares torch>=2.14.1 (a CUDA build
# of several GB), so it goes in with --no-deps beside torch 2.13 and the dependencies it lists.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv-gptq/bin/python -c "import gptqmodel, optimum" 2>/dev/null; then
  echo "ready: .venv-gptq"; exit 0
fi
python3 -m venv .venv-gptq
.venv-gptq/bin/pip install --quiet torch==2.13.0
tmp=$(mktemp -d)
.venv-gptq/bin/pip download --quiet --no-deps -d "$tmp" "gptqmodel==7.7.0"
tar xzf "$tmp"/gptqmodel-7.7.0.tar.gz -C "$tmp"
grep -v '^torch' "$tmp"/gptqmodel-7.7.0/requirements.txt > "$tmp"/requirements.txt
echo "torch==2.13.0" > "$tmp"/constraints.txt
.venv-gptq/bin/pip install --quiet -c "$tmp"/constraints.txt -r "$tmp"/requirements.txt optimum gguf 2>&1 | grep -v "^WARNING: Location" || true
.venv-gptq/bin/pip install --quiet --no-deps --no-build-isolation "$tmp"/gptqmodel-7.7.0.tar.gz 2>&1 | grep -v "^WARNING: Location" || true
.venv-gptq/bin/pip install --quiet --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv-gptq/bin/python -c "import gptqmodel, optimum; print('ready: .venv-gptq with gptqmodel', gptqmodel.__version__)"
