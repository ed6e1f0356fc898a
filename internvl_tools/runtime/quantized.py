"""A read-only view of a quantized checkpoint as the float checkpoint it approximates.

The runtime runs int8 checkpoints of this toolkit by dequantizing each weight as it streams
in (W = q x SCB / 127): weight-only simulation of the stored weights, in float. Keys of the
quantization state (SCB, weight_format) are hidden; everything else passes through.
"""

from __future__ import annotations

from ..io.reader import CheckpointReader
from ..io.safetensors_format import TensorSpec

STATE_SUFFIXES = (".SCB", ".weight_format")


class DequantizedView:
    """Duck-types the parts of CheckpointReader the runtime uses."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.folder = reader.folder
        names = set(reader.keys())
        self._scales = {k: k.removesuffix(".weight") + ".SCB" for k in names if k.endswith(".weight") and k.removesuffix(".weight") + ".SCB" in names}
        self._keys = [k for k in reader.keys() if not k.endswith(STATE_SUFFIXES)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def spec(self, name: str) -> TensorSpec:
        spec = self.reader.spec(name)
        return TensorSpec(name, "F32", spec.shape) if name in self._scales else spec

    def specs(self) -> list[TensorSpec]:
        return [self.spec(k) for k in self._keys]

    def get(self, name: str):
        if name not in self._scales:
            return self.reader.get(name)
        from ..quant.int8 import dequantize_rowwise

        return dequantize_rowwise(self.reader.get(name), self.reader.get(self._scales[name]))

    def config(self) -> dict:
        return self.reader.config()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reader.close()
