"""Native transformers modules built from an original-layout checkpoint stream.

Modules are created with their parameters on the meta device (no memory), then every
parameter is assigned from the stream; a parameter left on meta (missing key) or a tensor
with no parameter (left-over key) is an error, never a silent random weight.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def load_into(module: nn.Module, outputs: list[Output], reader: CheckpointReader, prefix: str,
              dtype: torch.dtype | None, rename=None, placement=None) -> nn.Module:
    """Assign every output whose native name starts with `prefix` to `module`; check coverage.

    `placement(original_key)` gives the device of each tensor (default: CPU)."""
    params = dict(module.named_parameters())
    cache = SourceCache(reader)
    for out in outputs:
        if not out.name.startswith(prefix):
            continue
        name = out.name[len(prefix):]
        name = rename(name) if rename else name
        if name is None:
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
    return module.eval()


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
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(nc.text_config(config, layout.dialect))
    text_cfg = AutoConfig.for_model(text.pop("model_type"), **text)
    text_cfg._attn_implementation = "eager"
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(text_cfg, attn_implementation="eager")
    outputs = [
        Output(o.name.replace("model.language_model.", "model.", 1), o.sources, o.fn)
        for o in native_outputs(reader, config, layout)
        if o.name.startswith(("model.language_model.", "lm_head."))
    ]
    return load_into(model, outputs, reader, "", dtype, placement=placement)


def build_decoder_layer(reader: CheckpointReader, config: dict, layout: Layout, index: int, dtype: torch.dtype | None = None):
    """One decoder layer alone (what layer-by-layer GPTQ needs), plus its rotary embedding."""
    import importlib

    from transformers import AutoConfig

    module_name, layer_cls, rotary_cls = layout.record.decoder_layer  # models/dialects.py
    module = importlib.import_module(module_name)
    text = dict(nc.text_config(config, layout.dialect))
    text_cfg = AutoConfig.for_model(text.pop("model_type"), **text)
    text_cfg._attn_implementation = "eager"
    with params_on_meta():
        layer = getattr(module, layer_cls)(text_cfg, index)
    prefix = f"model.language_model.layers.{index}."
    load_into(layer, native_outputs(reader, config, layout), reader, prefix, dtype)
    return layer, getattr(module, rotary_cls)(text_cfg)
