"""config.json of the transformers-native InternVLForConditionalGeneration for an original config."""

from __future__ import annotations

from .dialects import get_dialect, layer_dims

TEXT_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "hidden_act",
    "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "sliding_window", "original_max_position_embeddings",
    "partial_rotary_factor", "use_sliding_window", "max_window_layers",
    # a sparse LLM's experts and routing (Qwen3-MoE)
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
    "mlp_only_layers", "router_aux_loss_coef", "output_router_logits",
)


def text_config(config: dict, dialect: str) -> dict:
    """The LLM's native config, of the dialect record's native model type: Llama, Qwen2, Phi-3 and
    Qwen3 as they are; InternLM2 and InternLM3 as Llama. A dialect with an explicit head_dim gets it
    written (the native class's default, e.g. Qwen3's 128, must not decide it)."""
    llm = config["llm_config"]
    record = get_dialect(dialect)
    out = {key: llm[key] for key in TEXT_KEYS if llm.get(key) is not None}
    out["model_type"] = record.native_model_type
    if record.explicit_head_dim:
        out["head_dim"] = layer_dims(llm)["head_dim"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = out.get(key)
        if not isinstance(value, int) or not 0 <= value < llm["vocab_size"]:
            out[key] = None  # class defaults (e.g. Phi-3's pad 32000) may lie outside the vocabulary
    out["tie_word_embeddings"] = False
    if dialect == "internlm2":
        out["attention_bias"] = bool(llm.get("bias", False))
        out["mlp_bias"] = False
        scaling = llm.get("rope_scaling")
        if scaling:
            out["rope_scaling"] = {"rope_type": scaling.get("type", scaling.get("rope_type")), "factor": scaling["factor"]}
    if record.native_model_type == "llama":
        out.setdefault("attention_bias", False)
    return out


def vision_config(config: dict, num_layers: int | None = None) -> dict:
    """InternViT as InternVLVisionConfig (mean pooling off the head: no extra norm)."""
    vision = config["vision_config"]
    size = config.get("force_image_size") or vision["image_size"]
    return {
        "model_type": "internvl_vision",
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": num_layers if num_layers is not None else vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "attention_bias": bool(vision.get("qkv_bias", False)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "image_size": [size, size],
        "patch_size": [vision["patch_size"], vision["patch_size"]],
        "num_channels": vision.get("num_channels", 3),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
        "layer_scale_init_value": 0.1,
    }


def image_tokens_per_tile(config: dict) -> int:
    """(image_size / patch)^2 x downsample_ratio^2: 256 for a 448 px tile."""
    vision = config["vision_config"]
    size = config.get("force_image_size") or vision["image_size"]
    return int((size // vision["patch_size"]) ** 2 * config.get("downsample_ratio", 0.5) ** 2)


def native_config(config: dict, dialect: str, image_token_id: int) -> dict:
    """The whole native config.json."""
    out = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": vision_config(config),
        "text_config": text_config(config, dialect),
        "image_token_id": image_token_id,
        "image_seq_length": image_tokens_per_tile(config),
        "downsample_ratio": config.get("downsample_ratio", 0.5),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "dtype": config.get("torch_dtype", "bfloat16"),
    }
    if config.get("ps_version", "v1") == "v1":
        out["internvl_tools"] = {
            "source_ps_version": "v1",
            "note": "pass pixel_values.transpose(-1, -2): the weights are adapted so that the v2 pixel shuffle on the transposed tile equals v1",
        }
    return out
