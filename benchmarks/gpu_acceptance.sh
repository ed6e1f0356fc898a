#!/usr/bin/env bash
# One-shot GPU acceptance run (issue 21); the README's "GPU acceptance run" section says what it measures.
#
#   bash benchmarks/gpu_acceptance.sh                 # on the GPU machine: installs, then every step; 340 s at most
#   bash benchmarks/gpu_acceptance.sh --cpu           # dry run here: tiny checkpoints, no installs, CPU as the device
#   bash benchmarks/gpu_acceptance.sh --only gptq,export --budget 240    # a rerun of some steps
#
# Results go to $OUT (default ./gpu-acceptance-out): gpu_acceptance.md, gpu_acceptance.json and
# gpu_acceptance.log; checkpoints go to a work folder under the temp dir (--work DIR), never to $OUT.
# The python: $GPU_ACCEPTANCE_PYTHON, else .venv/bin/python for --cpu when it exists, else python3
# (on the GPU machine the image's python, the one that holds its CUDA torch).
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu-acceptance-out}"
export PYTHONUNBUFFERED=1
python="${GPU_ACCEPTANCE_PYTHON:-}"
if [ -z "$python" ]; then
  python=python3
  for arg in "$@"; do
    if { [ "$arg" = "--cpu" ] || [ "$arg" = "--dry-run" ]; } && [ -x .venv/bin/python ]; then
      python=.venv/bin/python
    fi
  done
fi
exec "$python" benchmarks/gpu_acceptance.py "$@"
