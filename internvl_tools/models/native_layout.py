"""The transformers-native layout read back: its original config and original key names.

A native checkpoint (`model_type: internvl`, `InternVLForConditionalGeneration`) is what
`convert --to hf` writes and what OpenGVLab publishes as "-hf" for InternVL3 / 3.5. Every
command works on original key names (models/layout.py), so a native checkpoint is seen through
the inverse of the links in models/native_map.py:

- written by this toolkit: `internvl_original.json` holds the original config and key order
  (exact, including InternLM2 converted to Llama);
- from elsewhere: the original config is derived from the native one (vision_config,
  text_config, vision_feature_layer, downsample_ratio; the chat template from the dialect's
  InternVL release that ships -hf checkpoints) and each native key maps back to its original
  key. Checkpoints saved before transformers' key refactor (`vision_tower.*`,
  `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`) are read
  too, as transformers' own `_checkpoint_conversion_mapping` reads them.

Source: transformers' `models/internvl/configuration_internvl.py`, `modeling_internvl.py`
and `convert_internvl_weights_to_hf.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LayoutError
from .dialects import Dialect, dialect_of_native_model_type
from .layout import PS_VERSIONS
from .native_map import PROJECTOR_RENAMES, VISION_EMBEDDINGS, VISION_RENAMES
from .vision import LLM_PREFIX, NATIVE_HEAD, NATIVE_LLM_PREFIX, PROJECTOR, VISION

NATIVE_MODEL_TYPE = "internvl"
NATIVE_ARCHITECTURE = "InternVLForConditionalGeneration"
LEGACY_PREFIXES = (  # transformers' _checkpoint_conversion_mapping for InternVL
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
# the chat template of the InternVL releases published in the native layout, by LLM dialect
DEFAULT_TEMPLATE = "internvl2_5"
TEXT_KEYS_TO_ORIGINAL = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "hidden_act",
                         "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "sliding_window", "use_sliding_window",
                         "max_window_layers", "attention_bias", "partial_rotary_factor", "original_max_position_embeddings",
                         "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                         "mlp_only_layers", "router_aux_loss_coef", "output_router_logits")


def is_native(config: dict) -> bool:
    """True for a transformers-native InternVL config.json."""
    return config.get("model_type") == NATIVE_MODEL_TYPE or NATIVE_ARCHITECTURE in (config.get("architectures") or [])


def modern_key(key: str) -> str:
    """A native key under transformers' current prefixes (legacy -hf prefixes renamed)."""
    for old, new in LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def original_config(native: dict, folder: Path | None = None) -> dict:
    """The original-layout config.json equivalent to a native config (no sidecar).

    Raises LayoutError when vision_config / text_config are missing or name an LLM this
    toolkit does not support."""
    vision, text = native.get("vision_config"), native.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise LayoutError("config.json: a native InternVL config needs vision_config and text_config objects")
    dialect = dialect_of_native_model_type(text.get("model_type"), "config.json: text_config.model_type")
    size = _first(vision.get("image_size", 448))
    llm = {key: text[key] for key in TEXT_KEYS_TO_ORIGINAL if text.get(key) is not None}
    llm.update({"architectures": [dialect.architectures[0]], "model_type": dialect.model_type, "tie_word_embeddings": False})
    processor = _processor_settings(folder)
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": DEFAULT_TEMPLATE,
        "ps_version": source_ps_version(native),
        "downsample_ratio": native.get("downsample_ratio", 0.5),
        "select_layer": native.get("vision_feature_layer", -1),
        "force_image_size": size,
        "dynamic_image_size": processor.get("crop_to_patches", True),
        "min_dynamic_patch": processor.get("min_patches", 1),
        "max_dynamic_patch": processor.get("max_patches", 12),
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": native.get("dtype") or native.get("torch_dtype") or "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"],
            "intermediate_size": vision["intermediate_size"],
            "qkv_bias": bool(vision.get("attention_bias", False)),
            "qk_normalization": bool(vision.get("use_qk_norm", False)),
            "norm_type": vision.get("norm_type", "layer_norm"),
            "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
            "image_size": size,
            "patch_size": _first(vision.get("patch_size", 14)),
            "num_channels": vision.get("num_channels", 3),
            "hidden_act": vision.get("hidden_act", "gelu"),
        },
        "llm_config": llm,
        **({"quantization_config": native["quantization_config"]} if native.get("quantization_config") else {}),
    }


def source_ps_version(native: dict) -> str:
    """The pixel shuffle the weights were trained with: "v1" when `convert --to hf` recorded it
    (config.json `internvl_tools.source_ps_version`; the V1-1 / V1-2 weights are then adapted to
    transposed tiles and map back exactly only as v1), else "v2" (every native release).

    Raises LayoutError for another recorded value."""
    tools = native.get("internvl_tools")
    value = tools.get("source_ps_version", "v2") if isinstance(tools, dict) else "v2"
    if value not in PS_VERSIONS:
        raise LayoutError(f"config.json: internvl_tools.source_ps_version is {value!r}; supported: {', '.join(PS_VERSIONS)} "
                          "(InternVL's pixel shuffle versions)")
    return value


def original_key(native_key: str, dialect: Dialect) -> str:
    """The original key a native key comes from (q/k/v of the ViT map to the fused attn.qkv).

    Raises LayoutError for a key the native InternVL class does not have."""
    key = modern_key(native_key)
    vision = VISION.native_prefix + "."
    if key.startswith(vision):
        return _vision_key(key[len(vision):], native_key)
    projector = PROJECTOR.native_prefix + "."
    if key.startswith(projector):
        module, _, param = key[len(projector):].partition(".")
        inverse = {v: k for k, v in PROJECTOR_RENAMES.items()}
        if module in inverse and param:
            return f"{PROJECTOR.prefix}.{inverse[module]}.{param}"
    if key.startswith(NATIVE_HEAD + "."):
        return f"{LLM_PREFIX}.{dialect.head}.{key[len(NATIVE_HEAD) + 1:]}"
    llm = NATIVE_LLM_PREFIX + "."
    if key.startswith(llm):
        return f"{LLM_PREFIX}.model." + _llm_key(key[len(llm):], dialect)
    raise LayoutError(f"key {native_key!r} is not part of a native InternVL checkpoint (InternVLForConditionalGeneration); "
                      "is this the right checkpoint?")


def original_keys(native_keys: list[str], dialect: Dialect) -> list[str]:
    """Original keys of a native checkpoint, in its key order, each once."""
    seen: dict[str, None] = {}
    for key in native_keys:
        seen.setdefault(original_key(key, dialect), None)
    return list(seen)


def _vision_key(rest: str, native_key: str) -> str:
    for original, native in VISION_EMBEDDINGS.items():
        if rest == native or rest.startswith(native + "."):
            return f"{VISION.prefix}.embeddings.{original}{rest[len(native):]}"
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", rest)
    if match:
        layer, inner = match.groups()
        qkv = re.fullmatch(r"attention\.[qkv]_proj\.(.+)", inner)
        if qkv:
            return f"{VISION.prefix}.encoder.layers.{layer}.{VISION.fused_qkv}.{qkv.group(1)}"
        for original, native in VISION_RENAMES.items():
            if inner == native or inner.startswith(native + "."):
                return f"{VISION.prefix}.encoder.layers.{layer}.{original}{inner[len(native):]}"
    raise LayoutError(f"key {native_key!r} is not part of InternVL's native vision tower; is this the right checkpoint?")


def _llm_key(rest: str, dialect: Dialect) -> str:
    if rest.startswith("embed_tokens."):
        return dialect.embed + rest[len("embed_tokens"):]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if not match:
        return rest  # norm.weight
    layer, inner = match.groups()
    inverse = {native: original for original, native in dialect.norms.items()}
    for linear in dialect.linears:
        for native in linear.natives:
            inverse.setdefault(native, linear.name)
    for native, original in inverse.items():
        if inner.startswith(native + "."):
            return f"layers.{layer}.{original}{inner[len(native):]}"
    return f"layers.{layer}.{inner}"


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _processor_settings(folder: Path | None) -> dict:
    """Tiling settings of the native image processor (GotOcr2: crop_to_patches, min/max patches)."""
    if folder is None:
        return {}
    path = Path(folder) / "preprocessor_config.json"
    if not path.exists():
        return {}
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: value[k] for k in ("crop_to_patches", "min_patches", "max_patches") if k in value}
