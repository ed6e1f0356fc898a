"""Per-model facts of the InternVL families this tool supports (the seed model cards).

Data only: widths, depths, LLM dialect, pixel-shuffle version, chat template. `make-tiny`
builds checkpoints from these, and `inspect` names a checkpoint's family from them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VisionFacts:
    """An InternViT tower."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    norm_type: str  # "rms_norm" (6B) or "layer_norm" (300M)
    qk_normalization: bool
    qkv_bias: bool
    layer_norm_eps: float = 1e-6
    image_size: int = 448
    patch_size: int = 14


@dataclass(frozen=True)
class LLMFacts:
    """A language model, in the dialect its checkpoint keys use."""

    name: str
    dialect: str  # a key of models.dialects.DIALECTS
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    head_dim: int | None = None  # explicit where it differs from hidden / heads (Qwen3, InternLM3)


@dataclass(frozen=True)
class Family:
    """One InternVL model: vision tower, LLM and the glue settings of its config.json."""

    name: str
    vision: VisionFacts
    llm: LLMFacts
    ps_version: str
    template: str
    select_layer: int = -1
    dynamic_image_size: bool = True
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    downsample_ratio: float = 0.5


VIT_6B_V1_0 = VisionFacts("InternViT-6B-448px-V1-0", 3200, 48, 25, 12800, "rms_norm", True, False)
VIT_6B_V1_2 = VisionFacts("InternViT-6B-448px-V1-2", 3200, 45, 25, 12800, "rms_norm", True, False)
VIT_6B_V1_5 = VisionFacts("InternViT-6B-448px-V1-5", 3200, 45, 25, 12800, "rms_norm", True, False)
VIT_300M = VisionFacts("InternViT-300M-448px", 1024, 24, 16, 4096, "layer_norm", False, True)

LLAMA2_13B = LLMFacts("LLaMA2-13B", "llama", 5120, 40, 40, 40, 13824, 32000)
YI_34B = LLMFacts("Nous-Hermes-2-Yi-34B", "llama", 7168, 60, 56, 8, 20480, 64000, rope_theta=5e6, max_position_embeddings=4096)
QWEN2_05B = LLMFacts("Qwen2-0.5B-Instruct", "qwen2", 896, 24, 14, 2, 4864, 151655, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
INTERNLM2_18B = LLMFacts("internlm2-chat-1_8b", "internlm2", 2048, 24, 16, 8, 8192, 92553, rope_theta=1e6, max_position_embeddings=32768)
PHI3_MINI = LLMFacts("Phi-3-mini-128k-instruct", "phi3", 3072, 32, 32, 32, 8192, 32020, max_position_embeddings=131072)
INTERNLM25_7B = LLMFacts("internlm2_5-7b-chat", "internlm2", 4096, 32, 32, 8, 14336, 92553, rope_theta=1e6, max_position_embeddings=32768)
INTERNLM2_20B = LLMFacts("internlm2-chat-20b", "internlm2", 6144, 48, 48, 8, 16384, 92553, rope_theta=1e6, max_position_embeddings=32768)
LLAMA3_70B = LLMFacts("Hermes-2-Theta-Llama-3-70B", "llama", 8192, 80, 64, 8, 28672, 128265, rope_theta=5e5, max_position_embeddings=8192)

_V1 = dict(ps_version="v1", dynamic_image_size=False, use_thumbnail=False, max_dynamic_patch=6)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("InternVL-Chat-V1-1", VIT_6B_V1_0, LLAMA2_13B, template="vicuna_v1.1", select_layer=-4, **_V1),
        Family("InternVL-Chat-V1-2", VIT_6B_V1_2, YI_34B, template="Hermes-2", **_V1),
        Family("InternVL-Chat-V1-2-Plus", VIT_6B_V1_2, YI_34B, template="Hermes-2", **_V1),
        Family("InternVL2-1B", VIT_300M, QWEN2_05B, "v2", "Hermes-2"),
        Family("InternVL2-2B", VIT_300M, INTERNLM2_18B, "v2", "internlm2-chat"),
        Family("InternVL2-4B", VIT_300M, PHI3_MINI, "v2", "phi3-chat"),
        Family("InternVL2-8B", VIT_300M, INTERNLM25_7B, "v2", "internlm2-chat"),
        Family("InternVL2-26B", VIT_6B_V1_5, INTERNLM2_20B, "v2", "internlm2-chat"),
        Family("InternVL2-40B", VIT_6B_V1_5, YI_34B, "v2", "Hermes-2"),
        Family("InternVL2-Llama3-76B", VIT_6B_V1_5, LLAMA3_70B, "v2", "Hermes-2"),
    ]
}

def get_family(name: str) -> Family:
    """Look a family up by name, case-insensitively."""
    for key, family in FAMILIES.items():
        if key.lower() == name.lower():
            return family
    from ..errors import InputError

    raise InputError(f"unknown family {name!r}; choose one of: {', '.join(FAMILIES)}")


def tiny_family(family: Family, *, vocab_size: int, image_size: int = 56) -> Family:
    """The same family at toy size: same styles and dialect, few layers, narrow widths.

    Group-query attention is kept where the family has it (kv heads < heads).
    """
    gqa = family.llm.num_key_value_heads < family.llm.num_attention_heads
    vision = replace(family.vision, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, image_size=image_size)
    llm = replace(family.llm, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, intermediate_size=96, vocab_size=vocab_size,
                  max_position_embeddings=2048)
    return replace(family, vision=vision, llm=llm, select_layer=-1 if family.select_layer == -1 else -2)


def wide_family(family: Family, *, vision_layers: int = 2, llm_layers: int = 2) -> Family:
    """The family's true widths with few layers: for memory and speed benchmarks."""
    return replace(
        family,
        vision=replace(family.vision, num_hidden_layers=vision_layers),
        llm=replace(family.llm, num_hidden_layers=llm_layers),
        select_layer=-1,
    )


def identify(vision_style: str, dialect: str, ps_version: str, llm_hidden: int, template: str | None, name_hint: str = "") -> str:
    """Name the seed family a checkpoint belongs to, or describe it when no family matches.

    Matches on the structural signature (ViT style, LLM dialect, pixel-shuffle version),
    then on the LLM width, then on the config's `_name_or_path` when several families share
    a signature.
    """
    candidates = [
        f for f in FAMILIES.values()
        if f.vision.norm_type == vision_style and f.llm.dialect == dialect and f.ps_version == ps_version
    ]
    if template:
        by_template = [f for f in candidates if f.template == template]
        candidates = by_template or candidates
    exact = [f for f in candidates if f.llm.hidden_size == llm_hidden]
    hinted = [f for f in candidates if name_hint and f.name.lower() == name_hint.rstrip("/").rsplit("/", 1)[-1].lower()]
    if hinted and not exact:
        return f"{hinted[0].name} (reduced size)"
    if hinted:
        return hinted[0].name
    if exact:
        names = [f.name for f in exact]
        return " / ".join(names)
    if len(candidates) == 1:
        return f"{candidates[0].name} (reduced size)"
    if candidates:
        return " or ".join(f.name for f in candidates) + " (reduced size)"
    style = "InternViT-6B" if vision_style == "rms_norm" else "InternViT-300M"
    return f"unlisted InternVL ({style} + {dialect}, pixel shuffle {ps_version})"
