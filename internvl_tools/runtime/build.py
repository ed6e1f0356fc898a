"""Native transformers modules built from an original-layout checkpoint stream.

Modules are created with their parameters on the meta device (no memory), then every
parameter is assigned from the stream; a parameter left on meta (missing key) or a tensor
with no parameter (left-over key) is an error, never a silent random weight.

A sparse layer's experts are stored one tensor per expert linear but live in memory fused per
layer (transformers 5: `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I];
models/dialects.Experts): the fused parameter is allocated once, when its first expert arrives,
and each expert's tensor is copied into its rows as it is read, so no expert is held twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.layout import Layout
from ..models.native_map import links
from ..errors import LayoutError
from ..io.reader import CheckpointReader
from ..transforms.stream import Output, SourceCache, compute, to_native_outputs
from ..models import native_config as nc


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create modules with parameters on the meta device (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(module._parameters[name].to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def native_outputs(reader: CheckpointReader, config: dict, layout: Layout) -> list[Output]:
    """The stream of native tensors for an original checkpoint (no v1 adaptation: the runtime
    shuffles pixels itself in the checkpoint's own version)."""
    return to_native_outputs(links(config, layout, adapt_v1=False))


FusedSlot = tuple[str, int, int, int]  # (fused parameter, expert, chunk of its rows, chunks)


def expert_slots(record) -> Callable[[str], FusedSlot | None] | None:
    """For a sparse dialect (models/dialects.Experts), the function that places a native
    per-expert name ("...mlp.experts.5.up_proj.weight") in its fused in-memory parameter:
    ("...mlp.experts.gate_up_proj", 5, 1, 2) = expert 5, second half of the rows. None for a dense one."""
    experts = record.experts
    if experts is None:
        return None
    names = "|".join(re.escape(item.name) for item in experts.linears)
    pattern = re.compile(rf"(?P<stem>(?:.*\.)?{re.escape(experts.prefix)})\.(?P<expert>\d+)\.(?P<linear>{names})\.weight")

    def slot(name: str) -> FusedSlot | None:
        match = pattern.fullmatch(name)
        if match is None:
            return None
        param, chunk, chunks = experts.fused_slot(match.group("linear"))
        return f"{match.group('stem')}.{param}", int(match.group("expert")), chunk, chunks

    return slot


def load_into(module: nn.Module, outputs: list[Output], reader: CheckpointReader, prefix: str,
              dtype: torch.dtype | None, rename=None, placement=None, fused=None) -> nn.Module:
    """Assign every output whose native name starts with `prefix` to `module`; check coverage.

    `placement(original_key)` gives the device of each tensor (default: CPU). `fused(name)`
    (`expert_slots`) places a tensor with no parameter of its own in rows of a fused one."""
    params = dict(module.named_parameters())
    cache = SourceCache(reader)
    filled: dict[str, set[tuple[int, int]]] = {}
    for out in outputs:
        if not out.name.startswith(prefix):
            continue
        name = out.name[len(prefix):]
        name = rename(name) if rename else name
        if name is None:
            continue
        slot = fused(name) if fused is not None and name not in params else None
        if slot is not None and slot[0] in params:
            _fill(module, params[slot[0]], slot, compute(cache, out), out, dtype, placement, filled)
            continue
        if name not in params:
            raise LayoutError(f"tensor {out.sources[0]!r} (native {out.name!r}) has no place in the {type(module).__name__}; the checkpoint does not match its config")
        tensor = compute(cache, out)
        target = params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise LayoutError(f"tensor {out.sources[0]!r} is {list(tensor.shape)} but the config needs {list(target.shape)}; config.json does not match the weights")
        tensor = tensor.to(dtype) if dtype is not None else tensor.clone()
        _assign(module, name, tensor.to(placement(out.sources[0])) if placement else tensor)
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LayoutError(f"{type(module).__name__}: no tensor for {missing[0]!r} ({len(missing)} missing); the checkpoint is incomplete")
    for name, seen in filled.items():
        shape = params[name].shape
        chunks = len({chunk for _, chunk in seen}) or 1
        if len(seen) != shape[0] * chunks:
            lacking = sorted({e for e in range(shape[0])} - {e for e, _ in seen})
            raise LayoutError(f"{type(module).__name__}: {name!r} holds {shape[0]} experts but only {len(seen)} of its "
                              f"{shape[0] * chunks} expert tensors are in the checkpoint (expert {lacking[0] if lacking else '?'}); "
                              "the checkpoint is incomplete or config.json's num_experts does not match it")
    return module.eval()


def _fill(module: nn.Module, meta: nn.Parameter, slot: FusedSlot, tensor: torch.Tensor, out: Output, dtype, placement,
          filled: dict[str, set[tuple[int, int]]]) -> None:
    """Copy one expert's tensor into its rows of a fused parameter (allocated on first use)."""
    name, expert, chunk, chunks = slot
    experts, rows, cols = meta.shape
    part = rows // chunks
    if tuple(tensor.shape) != (part, cols) or expert >= experts:
        raise LayoutError(f"tensor {out.sources[0]!r} is {list(tensor.shape)} (expert {expert}) but the config needs "
                          f"{[part, cols]} for expert < {experts}; config.json does not match the weights")
    if name not in filled:
        device = placement(out.sources[0]) if placement else torch.device("cpu")
        _assign(module, name, torch.empty(tuple(meta.shape), dtype=dtype or tensor.dtype, device=device))
        filled[name] = set()
    target = module.get_parameter(name)
    with torch.no_grad():
        target[expert, chunk * part:(chunk + 1) * part].copy_(tensor)
    filled[name].add((expert, chunk))


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def vision_layers_needed(config: dict, layout: Layout) -> int:
    """Layers the image features depend on: select_layer -k keeps L + 1 - k of L layers."""
    select = config.get("select_layer", -1)
    return layout.vision_layers + 1 + select if select < 0 else select


class VisionParts:
    """The vision tower's pieces built from the stream: the whole tower (only the layers
    select_layer needs), or one piece at a time (embeddings, layer i) for layer-by-layer work
    whose whole tower would not fit in memory; and the mlp1 projector."""

    def __init__(self, reader: CheckpointReader, config: dict, layout: Layout, dtype: torch.dtype | None = None, placement=None):
        from transformers import InternVLConfig

        self.keep = vision_layers_needed(config, layout)
        self.full = InternVLConfig(vision_config=nc.vision_config(config, self.keep), text_config=nc.text_config(config, layout.dialect),
                                   downsample_ratio=config.get("downsample_ratio", 0.5))
        self.full.vision_config._attn_implementation = "eager"
        self.outputs = native_outputs(reader, config, layout)
        self.reader, self.dtype, self.placement = reader, dtype, placement

    def _load(self, module: nn.Module, prefix: str, rename=None) -> nn.Module:
        return load_into(module, self.outputs, self.reader, prefix, self.dtype, rename, self.placement)

    def tower(self) -> nn.Module:
        from transformers.models.internvl.modeling_internvl import InternVLVisionModel

        def drop_unused(name: str) -> str | None:
            parts = name.split(".")
            return None if parts[:2] == ["encoder", "layer"] and int(parts[2]) >= self.keep else name

        with params_on_meta():
            module = InternVLVisionModel(self.full.vision_config)
        return self._load(module, "model.vision_tower.", drop_unused)

    def embeddings(self) -> nn.Module:
        from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings

        with params_on_meta():
            module = InternVLVisionEmbeddings(self.full.vision_config)
        return self._load(module, "model.vision_tower.embeddings.")

    def layer(self, index: int) -> nn.Module:
        from transformers.models.internvl.modeling_internvl import InternVLVisionLayer

        with params_on_meta():
            module = InternVLVisionLayer(self.full.vision_config)
        return self._load(module, f"model.vision_tower.encoder.layer.{index}.")

    def projector(self) -> nn.Module:
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        with params_on_meta():
            module = InternVLMultiModalProjector(self.full)
        return self._load(module, "model.multi_modal_projector.")


def build_vision(reader: CheckpointReader, config: dict, layout: Layout, dtype: torch.dtype | None = None, placement=None,
                 with_projector: bool = True):
    """InternViT (only the layers select_layer needs) and the mlp1 projector (None without
    `with_projector`) as native modules."""
    parts = VisionParts(reader, config, layout, dtype, placement)
    return parts.tower(), parts.projector() if with_projector else None


def build_llm(reader: CheckpointReader, config: dict, layout: Layout, dtype: torch.dtype | None = None, placement=None):
    """The whole LLM as a native causal LM (InternLM2 becomes Llama)."""
    from transformers import AutoModelForCausalLM

    text_cfg = _text_config(config, layout)
    kwargs = {"experts_implementation": "eager"} if layout.record.experts is not None else {}
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(text_cfg, attn_implementation="eager", **kwargs)
    outputs = [
        Output(o.name.replace("model.language_model.", "model.", 1), o.sources, o.fn)
        for o in native_outputs(reader, config, layout)
        if o.name.startswith(("model.language_model.", "lm_head."))
    ]
    return load_into(model, outputs, reader, "", dtype, placement=placement, fused=expert_slots(layout.record))


def _text_config(config: dict, layout: Layout, attention: str = "eager"):
    """The LLM's transformers config (`attention`: "eager" by default, "sdpa" for the calibration
    layers; a sparse layer's experts looped in eager mode, expert by expert, as the reference and
    the calibration hooks compute them)."""
    from transformers import AutoConfig

    text = dict(nc.text_config(config, layout.dialect))
    text_cfg = AutoConfig.for_model(text.pop("model_type"), **text)
    text_cfg._attn_implementation = attention
    if layout.record.experts is not None:
        text_cfg._experts_implementation = "eager"
    return text_cfg


def build_decoder_layer(reader: CheckpointReader, config: dict, layout: Layout, index: int, dtype: torch.dtype | None = None,
                        attention: str = "eager"):
    """One decoder layer alone (what layer-by-layer GPTQ needs), plus its rotary embedding;
    `attention` is transformers' attention implementation ("eager" or "sdpa": with sdpa and no
    mask the layer attends causally)."""
    import importlib

    module_name, layer_cls, rotary_cls = layout.record.decoder_layer  # models/dialects.py
    module = importlib.import_module(module_name)
    text_cfg = _text_config(config, layout, attention)
    with params_on_meta():
        layer = getattr(module, layer_cls)(text_cfg, index)
    prefix = f"model.language_model.layers.{index}."
    load_into(layer, native_outputs(reader, config, layout), reader, prefix, dtype, fused=expert_slots(layout.record))
    return layer, getattr(module, rotary_cls)(text_cfg)
