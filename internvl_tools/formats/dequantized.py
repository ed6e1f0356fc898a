"""A read-only view of a quantized checkpoint as the float checkpoint it approximates.

The runtime runs quantized checkpoints (bitsandbytes int8, GPTQ, compressed-tensors, AWQ) by
dequantizing each weight as it streams in, with the format's own rule (formats/registry.py):
weight-only simulation of the stored weights, in float32. A quantized linear shows as one
`.weight` (its quantization state is hidden); everything else passes through unchanged.
"""

from __future__ import annotations

from ..errors import InputError, LayoutError
from ..io.safetensors_format import TensorSpec
from ..models.layout import build_layout
from .base import split_key
from .registry import check, quantization_config


class DequantizedView:
    """A view (keys / spec / specs / get / stored / config / close, a context manager) over
    another view in original key names, with every quantized linear shown as a float32 weight.

    Raises LayoutError / InputError when the format is unknown, its tensors do not match it, or
    the runtime cannot dequantize it."""

    def __init__(self, view):
        self.view = view
        self.folder = view.folder
        self.layout_name = getattr(view, "layout_name", "original")
        config = view.config()
        self.quant = quantization_config(config)
        self.format = check(config, build_layout(config, view.specs()))
        if self.format.dequantize is None:
            raise InputError(f"{self.folder}: the runtime cannot run {self.format.name} checkpoints yet; run the bf16 checkpoint")
        self._stems: dict[str, list[str]] = {}  # dequantized weight key -> the stored keys it is made of
        self._keys: list[str] = []
        quantized = {split_key(k)[0] for k in view.keys() if split_key(k)[1] == self.format.marker}
        for key in view.keys():
            stem, param = split_key(key)
            if stem not in quantized or param not in self.format.state_params:
                self._keys.append(key)
                continue
            weight = f"{stem}.weight"
            if weight not in self._stems:
                self._stems[weight] = []
                self._keys.append(weight)
            self._stems[weight].append(key)
        self._hidden = {k for parts in self._stems.values() for k in parts}
        self._shapes: dict[str, tuple[int, ...]] = {}

    # -- the view interface --------------------------------------------------------------
    def keys(self) -> list[str]:
        """Keys of the float checkpoint, in stored order (a quantized linear at its first tensor)."""
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._stems or (name in self.view and name not in self._hidden)

    def __len__(self) -> int:
        return len(self._keys)

    def spec(self, name: str) -> TensorSpec:
        """The spec of a key; a dequantized weight is F32 [out, in]."""
        if name not in self._stems:
            return self.view.spec(name)
        if name not in self._shapes:
            specs = {split_key(k)[1]: self.view.spec(k) for k in self._stems[name]}
            read = lambda param: self.view.get(f"{split_key(name)[0]}.{param}")  # noqa: E731 (small tensors only)
            self._shapes[name] = tuple(self.format.weight_shape(specs, self.quant, read))
        return TensorSpec(name, "F32", self._shapes[name])

    def specs(self) -> list[TensorSpec]:
        """The specs of every key, in `keys()` order."""
        return [self.spec(k) for k in self._keys]

    def stored(self, name: str):
        """Byte location of a tensor stored unchanged; None for a dequantized weight."""
        return None if name in self._stems else self.view.stored(name)

    def get(self, name: str):
        """The tensor of a key; a quantized linear's weight dequantized to float32 [out, in]."""
        if name not in self._stems:
            return self.view.get(name)
        tensors = {split_key(k)[1]: self.view.get(k) for k in self._stems[name]}
        try:
            return self.format.dequantize(tensors, self.quant)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise LayoutError(f"{self.folder}: cannot dequantize {name!r} as {self.format.name}: {exc}") from None

    @property
    def total_bytes(self) -> int:
        """Bytes stored on disk (quantized), not of the float view."""
        return self.view.total_bytes

    @property
    def shards(self):
        """The shard files of the underlying checkpoint."""
        return self.view.shards

    def config(self) -> dict:
        """The underlying view's config.json (quantization_config included)."""
        return self.view.config()

    def close(self) -> None:
        """Close the underlying view (closing twice is harmless)."""
        self.view.close()

    def __enter__(self) -> "DequantizedView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
