"""A read-only view of a quantized checkpoint as the float checkpoint it approximates.

The runtime runs int8 and GPTQ checkpoints of this toolkit by dequantizing each weight as it
streams in (int8: W = q x SCB / 127; GPTQ: W = scale x (q - zero) per group): weight-only
simulation of the stored weights, in float. Keys of the quantization state are hidden (a
GPTQ linear shows as one `.weight`); everything else passes through.
"""

from __future__ import annotations

from ..io.reader import CheckpointReader
from ..io.safetensors_format import TensorSpec

STATE_SUFFIXES = (".SCB", ".weight_format", ".qweight", ".qzeros", ".scales", ".g_idx")


class DequantizedView:
    """Duck-types the parts of CheckpointReader the runtime uses."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.folder = reader.folder
        names = set(reader.keys())
        self._scales = {k: k.removesuffix(".weight") + ".SCB" for k in names if k.endswith(".weight") and k.removesuffix(".weight") + ".SCB" in names}
        self._gptq = {k.removesuffix(".qweight") + ".weight": k.removesuffix(".qweight") for k in names if k.endswith(".qweight")}
        self.bits = (reader.config().get("quantization_config") or {}).get("bits", 4)
        self._keys = []
        for key in reader.keys():
            if key.endswith(".qweight"):
                self._keys.append(key.removesuffix(".qweight") + ".weight")
            elif not key.endswith(STATE_SUFFIXES):
                self._keys.append(key)

    def keys(self) -> list[str]:
        return list(self._keys)

    def spec(self, name: str) -> TensorSpec:
        if name in self._gptq:
            stem = self._gptq[name]
            return TensorSpec(name, "F32", (self.reader.spec(stem + ".scales").shape[1], self.reader.spec(stem + ".g_idx").shape[0]))
        spec = self.reader.spec(name)
        return TensorSpec(name, "F32", spec.shape) if name in self._scales else spec

    def specs(self) -> list[TensorSpec]:
        return [self.spec(k) for k in self._keys]

    def get(self, name: str):
        if name in self._gptq:
            from ..formats.gptq import unpack

            stem = self._gptq[name]
            parts = {part: self.reader.get(f"{stem}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")}
            return unpack(**parts, bits=self.bits)
        if name not in self._scales:
            return self.reader.get(name)
        from ..formats.int8 import dequantize_rowwise

        return dequantize_rowwise(self.reader.get(name), self.reader.get(self._scales[name]))

    def config(self) -> dict:
        return self.reader.config()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reader.close()
