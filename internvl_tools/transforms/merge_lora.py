"""`merge-lora`: merge embedded and PEFT LoRA adapters into the base, tensor by tensor.

Each merged weight is W + sum(scale x B @ A) computed in float32 over blocks of rows and cast
back to W's dtype once; keys lose peft's wrapping; use_llm_lora / use_backbone_lora become 0.
Every adapter is validated (keys, shapes, ranks) before anything is written, and a result
with NaN or Inf stops the run with nothing written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..models.layout import build_layout
from ..errors import InputError
from ..io.reader import CheckpointReader
from ..models.views import open_view
from .adapters import AdapterSet, Delta, embedded_deltas, open_peft_adapter, peft_deltas, plain_key
from .stream import Output, run_transform

ROW_BLOCK = 2048


class TensorSources:
    """Adapter tensors by (source, key): the checkpoint itself or an adapter file, read on demand."""

    def __init__(self, checkpoint: CheckpointReader):
        self.readers: dict[str, object] = {"embedded": checkpoint}

    def _reader(self, source: str):
        if source not in self.readers:
            if source.endswith(".safetensors"):
                self.readers[source] = CheckpointReader(source)
            else:  # a small adapter_model.bin, loaded whole
                import torch

                self.readers[source] = _InMemory(torch.load(source, map_location="cpu", weights_only=True))
        return self.readers[source]

    def get(self, source: str, key: str):
        return self._reader(source).get(key)

    def shape(self, source: str, key: str) -> tuple[int, ...]:
        reader = self._reader(source)
        return tuple(reader.spec(key).shape) if isinstance(reader, CheckpointReader) else tuple(reader.get(key).shape)

    def close(self) -> None:
        for reader in self.readers.values():
            if hasattr(reader, "close"):
                reader.close()


class _InMemory:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get(self, key: str):
        return self.tensors[key]


def delta_shape_error(delta: Delta, base_shape: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> str | None:
    """Why an adapter's A/B cannot update a base weight, or None when they fit."""
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return f"lora_A {list(a)} and lora_B {list(b)} do not share a rank"
    rows, cols = b[0], a[1]
    expected = (cols, rows) if delta.fan_in_fan_out or delta.embedding else (rows, cols)
    if tuple(base_shape) != expected:
        return f"B @ A is {list(expected)} but the base weight is {list(base_shape)}"
    return None


def _non_finite(sources: TensorSources, delta: Delta) -> str | None:
    import torch

    if not abs(delta.scale) < 3.4e38:
        return f"its scale alpha/r = {delta.scale:g} is beyond float32"
    for key in (delta.a, delta.b):
        if not torch.isfinite(sources.get(delta.source, key)).all():
            return f"{key} holds NaN or Inf"
    return None


def merged(weight, deltas: list[Delta], sources: TensorSources, key: str):
    """W + sum of deltas, float32 per block of rows, cast back once; NaN/Inf refused."""
    import torch

    if weight.device.type == "meta":
        return weight
    factors = []
    for delta in deltas:
        a, b = sources.get(delta.source, delta.a).float(), sources.get(delta.source, delta.b).float()
        transposed = delta.fan_in_fan_out or delta.embedding
        factors.append((a, b, delta.scale, transposed))
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], ROW_BLOCK):
        block = weight[start : start + ROW_BLOCK].float()
        stop = start + block.shape[0]
        for a, b, scale, transposed in factors:
            update = (a[:, start:stop].T @ b.T) if transposed else (b[start:stop] @ a)
            block.add_(update, alpha=scale)
        if not torch.isfinite(block).all():
            raise InputError(f"merging LoRA into {key!r} gives NaN or Inf (rows {start}..{stop}); the adapter is broken or its alpha is wrong")
        out[start:stop] = block.to(weight.dtype)
    return out


def plan_merge(reader: CheckpointReader, adapters: list[Path], alpha: float | None) -> tuple[list[Output], AdapterSet, dict, TensorSources]:
    """Validate everything and return the output stream (nothing is written here)."""
    config = reader.config()
    layout = build_layout(config, reader.specs())
    shapes = {spec.name: spec.shape for spec in reader.specs()}
    plan = embedded_deltas(layout, shapes, alpha)
    base_of = {plain_key(k): k for k, info in layout.keys.items() if info.lora is None}
    for folder in adapters:
        peft_deltas(open_peft_adapter(folder), set(base_of), plan)
    if not plan.deltas and not plan.replacements:
        raise InputError(f"{reader.folder}: no embedded LoRA and no --adapter given; nothing to merge")
    sources = TensorSources(reader)
    for base, deltas in plan.deltas.items():
        for delta in deltas:
            a, b = sources.shape(delta.source, delta.a), sources.shape(delta.source, delta.b)
            problem = delta_shape_error(delta, shapes[base_of[base]], a, b) or _non_finite(sources, delta)
            if problem:
                raise InputError(f"{delta.source}: LoRA for {base!r}: {problem}; is this adapter for another model?")
    for base, (source, key) in plan.replacements.items():
        if sources.shape(source, key) != tuple(shapes[base_of[base]]):
            raise InputError(f"{source}: {key!r} is {list(sources.shape(source, key))} but {base!r} is {list(shapes[base_of[base]])}")
    outputs = []
    for plain, key in base_of.items():
        if plain in plan.replacements:
            source, replacement = plan.replacements[plain]
            dtype = reader.spec(key).torch_dtype
            outputs.append(Output(plain, (key,), lambda t, s=source, r=replacement, d=dtype: t if t.device.type == "meta"
                                  else sources.get(s, r).to(d)))
        elif plain in plan.deltas:
            outputs.append(Output(plain, (key,), lambda t, ds=plan.deltas[plain], p=plain: merged(t, ds, sources, p)))
        else:
            outputs.append(Output(plain, (key,)))
    new_config = dict(config, use_llm_lora=0, use_backbone_lora=0)
    return outputs, plan, new_config, sources


def merge_lora(source: Path, out: Path, *, adapters: list[Path] = (), alpha: float | None = None, max_shard_size: int,
               overwrite: bool = False, progress: Callable[[int], None] | None = None) -> tuple[Path, AdapterSet]:
    """Merge and write; returns the output path and what was merged.

    Works on either layout: a native-layout checkpoint is merged through its original-layout
    view (models.views) and written back in the native layout."""
    with open_view(source) as reader:
        outputs, plan, config, sources = plan_merge(reader, list(adapters), alpha)
        native = reader.layout_name == "native"
        try:
            path = run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                                 files={} if native else {"config.json": config}, names="original", progress=progress)
        finally:
            sources.close()
    return path, plan
