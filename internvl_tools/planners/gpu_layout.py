"""Glue between a checkpoint and the pure device planner: sizes from headers, grouped output order."""

from __future__ import annotations

import math
from dataclasses import replace

from ..models.layout import Layout
from ..models.native_map import native_module
from ..models.views import stored_names
from ..io.reader import CheckpointReader
from .device_map import DevicePlan, ModelSizes, plan_devices

PART_ORDER = ("embeddings", "final_norm", "head")


def model_sizes(reader: CheckpointReader, config: dict, layout: Layout) -> ModelSizes:
    """Byte sizes per placement unit, from tensor headers (real sizes, quantized or not)."""
    totals = {"vision": 0, "projector": 0, "embeddings": 0, "final_norm": 0, "head": 0}
    layers = [0] * layout.llm_layers
    modules: dict[str, str] = {"vision": "vision_model", "projector": "mlp1"}
    layer_prefix = "language_model.model.layers."
    for name, info in layout.keys.items():
        nbytes = reader.spec(name).nbytes
        if info.family in ("vision", "projector"):
            totals[info.family] += nbytes
        elif info.part == "layer":
            layers[info.layer] += nbytes
            layer_prefix = name[: name.index(f"layers.{info.layer}.")] + "layers."
        else:
            totals[info.part] += nbytes
            modules[info.part] = name[: -(len(info.param) + 1)] if info.param else name
    return ModelSizes(
        vision_bytes=totals["vision"],
        projector_bytes=totals["projector"],
        embed_bytes=totals["embeddings"],
        norm_bytes=totals["final_norm"],
        head_bytes=totals["head"],
        layer_bytes=tuple(layers),
        kv_bytes_per_token_per_layer=kv_bytes_per_token(config),
        vision_activation_bytes=vision_activation_bytes(config),
        logits_bytes_per_token=config["llm_config"].get("vocab_size", 0) * 4,
        module_names={k: modules[k] for k in ("vision", "projector", *PART_ORDER) if k in modules},
        layer_prefix=layer_prefix,
    )


def kv_bytes_per_token(config: dict) -> int:
    """K and V of one decoder layer for one token in bf16."""
    llm = config["llm_config"]
    heads = llm.get("num_attention_heads", 1)
    head_dim = llm.get("head_dim") or llm["hidden_size"] // heads
    return 2 * llm.get("num_key_value_heads", heads) * head_dim * 2


def vision_activation_bytes(config: dict) -> int:
    """Peak vision-tower activations for one image at the config's tile count (see device_map)."""
    vision = config["vision_config"]
    size = config.get("force_image_size") or vision.get("image_size", 448)
    tokens = (size // vision.get("patch_size", 14)) ** 2 + 1
    tiles = (config.get("max_dynamic_patch", 12) + (1 if config.get("use_thumbnail") else 0)) if config.get("dynamic_image_size") else 1
    hidden_states = tiles * tokens * vision["hidden_size"] * 2 * 8
    attention = tiles * vision.get("num_attention_heads", 1) * tokens * tokens * 2
    return hidden_states + attention


def quantized_sizes(sizes: ModelSizes, reader: CheckpointReader, layout: Layout, method: str) -> ModelSizes:
    """The same model with its decoder linears in int8 (bitsandbytes) or GPTQ int4 g128."""
    layers = list(sizes.layer_bytes)
    for name, info in layout.keys.items():
        spec = reader.spec(name)
        if info.family != "llm" or info.part != "layer" or not info.is_linear or info.param != "weight" or len(spec.shape) != 2:
            continue
        rows, cols = spec.shape
        if method == "int8":
            new = rows * cols + rows * 4
        else:
            groups = rows * math.ceil(cols / 128)
            new = rows * cols // 2 + groups * 2 + groups // 2 + cols * 4
        layers[info.layer] += new - spec.nbytes
    return replace(sizes, layer_bytes=tuple(layers))


def order_by_gpu(layout: Layout, plan: DevicePlan, view=None) -> list[list[str]]:
    """Checkpoint keys grouped by the GPU that holds them (GPU 0 first), for shard grouping.

    With a native-layout `view` (models.views.NativeView) the keys are its stored native keys."""
    owner: dict[int, int] = {layer: gpu.gpu for gpu in plan.gpus for layer in gpu.layers}
    groups: list[list[str]] = [[] for _ in plan.gpus]
    for name, info in layout.keys.items():
        gpu = owner[info.layer] if (info.family == "llm" and info.part == "layer") else 0
        groups[gpu].extend(stored_names(view, name) if view is not None else [name])
    return groups


def native_device_map(plan: DevicePlan, layout: Layout) -> DevicePlan:
    """The plan with its device map in native module names (InternVLForConditionalGeneration)."""
    device_map = {native_module(module, layout.record): gpu for module, gpu in plan.device_map.items()}
    return replace(plan, device_map=device_map)


def plan_for_checkpoint(reader: CheckpointReader, config: dict, layout: Layout, num_gpus: int, gpu_bytes: int,
                        **options) -> tuple[DevicePlan, ModelSizes, dict[str, DevicePlan]]:
    """Plan a checkpoint, and when it does not fit, plan its int8 and int4 versions too."""
    sizes = model_sizes(reader, config, layout)
    plan = plan_devices(sizes, num_gpus, gpu_bytes, **options)
    alternatives: dict[str, DevicePlan] = {}
    if not plan.fits and not config.get("quantization_config"):
        for method in ("int8", "int4"):
            alternatives[method] = plan_devices(quantized_sizes(sizes, reader, layout, method), num_gpus, gpu_bytes, **options)
    return plan, sizes, alternatives
