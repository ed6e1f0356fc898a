"""InternViT and the mlp1 projector as data: key patterns and native (transformers) names.

Both InternViT styles (6B: RMSNorm, qk-norm, no qkv bias; 300M: LayerNorm, qkv bias) use the
same key names; the style only decides which optional tensors exist. Source: InternVL's
`modeling_intern_vit.py` (original layout) and transformers' `models/internvl`
(`InternVLVisionModel`, `InternVLMultiModalProjector`; the mapping its
`convert_internvl_weights_to_hf.py` applies).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionKeys:
    """Key facts of the InternViT tower and the projector (original layout)."""

    prefix: str = "vision_model"
    native_prefix: str = "model.vision_tower"
    linears: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    norms: tuple[str, ...] = ("attn.q_norm", "attn.k_norm", "norm1", "norm2")
    layer_scales: tuple[str, ...] = ("ls1", "ls2")
    fused_qkv: str = "attn.qkv"  # rows [q; k; v], split into attention.{q,k,v}_proj natively
    # original module inside a layer -> native module inside `encoder.layer.N`
    renames: tuple[tuple[str, str], ...] = (
        ("attn.proj", "attention.projection_layer"),
        ("attn.q_norm", "attention.q_norm"),
        ("attn.k_norm", "attention.k_norm"),
        ("norm1", "layernorm_before"),
        ("norm2", "layernorm_after"),
        ("ls1", "lambda_1"),
        ("ls2", "lambda_2"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    )
    embeddings: tuple[tuple[str, str], ...] = (
        ("class_embedding", "embeddings.cls_token"),
        ("position_embedding", "embeddings.position_embeddings"),
        ("patch_embedding", "embeddings.patch_embeddings.projection"),
    )


@dataclass(frozen=True)
class ProjectorKeys:
    """mlp1: LayerNorm(4 x vit width) -> Linear -> GELU (index 2, no weights) -> Linear."""

    prefix: str = "mlp1"
    native_prefix: str = "model.multi_modal_projector"
    norm: str = "0"
    linears: tuple[str, ...] = ("1", "3")
    renames: tuple[tuple[str, str], ...] = (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2"))


VISION = VisionKeys()
PROJECTOR = ProjectorKeys()

# the LLM's place in each layout
LLM_PREFIX = "language_model"
NATIVE_LLM_PREFIX = "model.language_model"
NATIVE_HEAD = "lm_head"
