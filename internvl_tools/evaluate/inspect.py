"""`inspect`: what a checkpoint is, from its config and tensor headers alone (no tensor bytes)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..formats import Format, check, detect, parameter_count as tensor_parameters
from ..models.families import identify
from ..models.layout import Layout, build_layout
from ..models.templates import get_template
from ..io.reader import CheckpointReader
from ..formats.views import open_view
from ..transforms.adapters import flag_mismatches

GIB = 2**30


def load(folder: str | Path) -> tuple[CheckpointReader, dict, Layout]:
    """Open a checkpoint, read its config, and classify its keys (validates everything, the
    linears' tensor names against the checkpoint's format included: formats/registry.py)."""
    reader = open_view(folder)
    try:
        config = reader.config()
        layout = build_layout(config, reader.specs())
        check(config, layout)
        get_template(config.get("template"))  # refused as chat / verify / convert refuse it
    except BaseException:
        reader.close()
        raise
    return reader, config, layout


def parameter_count(reader: CheckpointReader, layout: Layout, fmt: Format, quant: dict) -> dict[str, int]:
    """Parameters per family as the format counts them: packed quantized weights at their
    unpacked size, quantization state (scales, zeros, SCB, ...) and LoRA factors not at all."""
    counts: dict[str, int] = defaultdict(int)
    for name, info in layout.keys.items():
        counts[info.family] += tensor_parameters(fmt, quant, info, reader.spec(name).shape)
    return dict(counts)


def summarize(folder: str | Path) -> dict:
    """A JSON-able report: family, towers, dtypes, bytes per family and layer, LoRA, memory needs."""
    reader, config, layout = load(folder)
    vision_cfg, llm_cfg = config["vision_config"], config["llm_config"]
    quant = config.get("quantization_config") or {}
    fmt = detect(config)  # validated against the keys by load()
    bytes_by_family: dict[str, int] = defaultdict(int)
    layer_bytes: dict[int, int] = defaultdict(int)
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    linear = {"params": 0, "rows": 0, "groups": 0, "in_features": 0}
    for name, info in layout.keys.items():
        spec = reader.spec(name)
        bytes_by_family[info.family] += spec.nbytes
        if info.family == "llm" and info.part == "layer":
            layer_bytes[info.layer] += spec.nbytes
            if info.is_linear and info.param == "weight" and info.lora is None and len(spec.shape) == 2:
                rows, cols = spec.shape
                linear["params"] += rows * cols
                linear["rows"] += rows
                linear["groups"] += rows * -(-cols // 128)
                linear["in_features"] += cols
    stored = getattr(reader, "reader", reader)  # the tensors as stored (a native checkpoint's q/k/v_proj apart)
    for spec in stored.specs():  # so that the dtype counts add up to "tensors"
        dtypes[spec.dtype]["tensors"] += 1
        dtypes[spec.dtype]["bytes"] += spec.nbytes
    params = parameter_count(reader, layout, fmt, quant)
    total_params = sum(params.values())
    experts = expert_report(reader, layout, fmt, quant, llm_cfg)
    if experts is not None:  # parameters a token runs through: all but the experts the router does not pick
        params["active"] = total_params - experts["params"] + experts["active_params"]
    largest = max(reader.specs(), key=lambda s: s.nbytes)
    image_size = config.get("force_image_size") or vision_cfg.get("image_size", 448)
    patch = vision_cfg.get("patch_size", 14)
    tokens = int((image_size // patch) ** 2 * config.get("downsample_ratio", 0.5) ** 2)
    style = vision_cfg.get("norm_type", "rms_norm")
    return {
        "path": str(Path(folder)),
        "layout": getattr(reader, "layout_name", "original"),
        "family": identify(style, layout.dialect, config.get("ps_version", "v1"), llm_cfg.get("hidden_size", 0),
                           config.get("template"), str(config.get("_name_or_path") or ""), layout.llm_layers,
                           native=getattr(reader, "layout_name", "original") == "native"),
        "template": config.get("template"),
        "ps_version": config.get("ps_version"),
        "vision": {
            "style": "InternViT-6B (RMSNorm, qk-norm)" if style == "rms_norm" else "InternViT-300M (LayerNorm, qkv bias)",
            "hidden_size": vision_cfg.get("hidden_size"),
            "layers": layout.vision_layers,
            "heads": vision_cfg.get("num_attention_heads"),
            "intermediate_size": vision_cfg.get("intermediate_size"),
            "select_layer": config.get("select_layer", -1),
            "image_size": image_size,
            "tokens_per_tile": tokens,
        },
        "llm": {
            "dialect": layout.dialect,
            "architecture": (llm_cfg.get("architectures") or ["?"])[0],
            "hidden_size": llm_cfg.get("hidden_size"),
            "layers": layout.llm_layers,
            "heads": llm_cfg.get("num_attention_heads"),
            "kv_heads": llm_cfg.get("num_key_value_heads", llm_cfg.get("num_attention_heads")),
            "intermediate_size": llm_cfg.get("intermediate_size"),
            "vocab_size": llm_cfg.get("vocab_size"),
            **({"experts": experts} if experts is not None else {}),
        },
        "quantization": quantization_facts(fmt, quant) if quant else None,
        # what a calibrated (GPTQ / AWQ) run was calibrated with, as quantize recorded it (None otherwise)
        "calibration": config.get("quantization_calibration"),
        "shards": len(reader.shards),
        "tensors": len(stored),
        "dtypes": dict(dtypes),
        "bytes": {"total": reader.total_bytes, **dict(bytes_by_family)},
        "params": {"total": total_params, **params},
        "llm_layer_bytes": [layer_bytes[i] for i in sorted(layer_bytes)],
        "largest_tensor": {"name": largest.name, "bytes": largest.nbytes, "shape": list(largest.shape)},
        "lora": {
            family: {"rank": info.rank, "alpha": 2 * info.rank, "targets": list(info.targets), "modules": info.count, "config_flag": info.config_flag}
            for family, info in layout.lora.items()
        },
        "lora_flags": flag_mismatches(config, layout),  # use_llm_lora / use_backbone_lora that disagree with the tensors
        "memory_estimate": memory_estimate(total_params, linear) if not quant else None,
    }


def quantization_facts(fmt: Format, quant: dict) -> dict:
    """The scheme of a quantized checkpoint from its quantization_config: format and quant_method,
    bits, group_size, sym (GPTQ) / zero_point (AWQ) / load_in_8bit (bnb); for compressed-tensors the
    weights' scheme of its config_groups (bits, strategy "group" / "channel" / "tensor", group_size
    for "group", symmetric) and, when activations are quantized too (W8A8), their bits and
    strategy ("dynamic" when computed at run time). Groups with different weight schemes are
    listed per group as "group_0: 4-bit group 128 sym", ..."""
    facts = {"format": fmt.name, **{k: quant[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "zero_point",
                                                           "load_in_8bit") if k in quant}}
    groups = {name: group for name, group in (quant.get("config_groups") or {}).items() if isinstance(group, dict)}
    schemes = {}
    for name, group in groups.items():
        weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
        scheme = {"bits": weights.get("num_bits"), "strategy": weights.get("strategy"),
                  **({"group_size": weights.get("group_size")} if weights.get("strategy") == "group" else {}),
                  "symmetric": weights.get("symmetric")}
        if inputs:
            scheme |= {"activation_bits": inputs.get("num_bits"),
                       "activation_strategy": inputs.get("strategy") + (" dynamic" if inputs.get("dynamic") else "")
                       if inputs.get("strategy") else ("dynamic" if inputs.get("dynamic") else None)}
        schemes[name] = {k: v for k, v in scheme.items() if v is not None}
    distinct = {tuple(sorted(scheme.items())) for scheme in schemes.values()}
    if len(distinct) == 1:
        facts |= next(iter(schemes.values()))
    elif distinct:
        facts["config_groups"] = {name: " ".join(f"{k}={v}" for k, v in scheme.items()) for name, scheme in schemes.items()}
    return facts


def expert_report(reader: CheckpointReader, layout: Layout, fmt: Format, quant: dict, llm_cfg: dict) -> dict | None:
    """A sparse LLM's routed experts (models/dialects.Experts): count, top-k, width, their
    parameters and bytes in all layers, and the parameters of the top-k a token runs through
    (top_k / count of them: every expert of a layer has the same shape). None for a dense LLM."""
    record = layout.record.experts
    if record is None:
        return None
    settings = record.settings(llm_cfg)
    expert_params = expert_bytes = router_params = 0
    for name, info in layout.keys.items():
        if info.family != "llm" or info.part != "layer":
            continue
        if info.expert is not None:
            expert_params += tensor_parameters(fmt, quant, info, reader.spec(name).shape)
            expert_bytes += reader.spec(name).nbytes
        elif info.module == record.router:
            router_params += tensor_parameters(fmt, quant, info, reader.spec(name).shape)
    count = max(settings["experts"], 1)
    return {"count": settings["experts"], "top_k": settings["top_k"], "intermediate_size": settings["intermediate"],
            "norm_topk_prob": settings["norm_topk"], "shared": False, "sparse_layers": layout.llm_layers,
            "params": expert_params, "bytes": expert_bytes, "router_params": router_params,
            "active_params": expert_params * settings["top_k"] // count}


def memory_estimate(total_params: int, linear: dict[str, int]) -> dict[str, int]:
    """Bytes of weights in bf16, with the LLM's decoder linears in int8, and in GPTQ int4 g128.

    int8 adds one fp32 scale per output row (bitsandbytes SCB); int4 adds per group of 128
    inputs an fp16 scale and a packed 4-bit zero, plus an int32 g_idx per input feature.
    The vision tower, projector, embeddings and head stay bf16 in every case.
    """
    rest = (total_params - linear["params"]) * 2
    return {
        "bf16": total_params * 2,
        "int8": rest + linear["params"] + linear["rows"] * 4,
        "int4_g128": rest + linear["params"] // 2 + linear["groups"] * 2 + linear["groups"] // 2 + linear["in_features"] * 4,
    }
