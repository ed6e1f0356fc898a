"""Per-model facts of the InternVL families this tool supports.

Data only: widths, depths, LLM dialect, pixel-shuffle version, chat template. `make-tiny`
builds checkpoints from these, and `inspect` names a checkpoint's family from them.

Sources: the seed model cards (InternVL-Chat-V1-x, InternVL2); for InternVL2.5 / 3 / 3.5 the
model cards' "vision part / language part" tables and the language models' own config.json
(Qwen2.5, Qwen3, InternLM2.5, InternLM3), see the comments at each record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace


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
class MoEFacts:
    """The routed experts of a sparse LLM (every decoder layer sparse, no shared expert)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = True


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
    head_dim: int | None = None  # explicit config field (Qwen3, InternLM3); may differ from hidden / heads
    rope_scaling: dict | None = field(default=None, hash=False)  # as llm_config writes it (e.g. dynamic NTK)
    moe: MoEFacts | None = None  # a sparse dialect's experts (qwen3_moe)


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
# InternVL2.5 / 3 / 3.5 (DESIGN.md §2b; the V2_5 towers keep their predecessors' shapes)
VIT_6B_V2_5 = VisionFacts("InternViT-6B-448px-V2_5", 3200, 45, 25, 12800, "rms_norm", True, False)
VIT_300M_V2_5 = VisionFacts("InternViT-300M-448px-V2_5", 1024, 24, 16, 4096, "layer_norm", False, True)

LLAMA2_13B = LLMFacts("LLaMA2-13B", "llama", 5120, 40, 40, 40, 13824, 32000)
YI_34B = LLMFacts("Nous-Hermes-2-Yi-34B", "llama", 7168, 60, 56, 8, 20480, 64000, rope_theta=5e6, max_position_embeddings=4096)
QWEN2_05B = LLMFacts("Qwen2-0.5B-Instruct", "qwen2", 896, 24, 14, 2, 4864, 151655, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
INTERNLM2_18B = LLMFacts("internlm2-chat-1_8b", "internlm2", 2048, 24, 16, 8, 8192, 92553, rope_theta=1e6, max_position_embeddings=32768)
PHI3_MINI = LLMFacts("Phi-3-mini-128k-instruct", "phi3", 3072, 32, 32, 32, 8192, 32020, max_position_embeddings=131072)
INTERNLM25_7B = LLMFacts("internlm2_5-7b-chat", "internlm2", 4096, 32, 32, 8, 14336, 92553, rope_theta=1e6, max_position_embeddings=32768)
INTERNLM2_20B = LLMFacts("internlm2-chat-20b", "internlm2", 6144, 48, 48, 8, 16384, 92553, rope_theta=1e6, max_position_embeddings=32768)
LLAMA3_70B = LLMFacts("Hermes-2-Theta-Llama-3-70B", "llama", 8192, 80, 64, 8, 28672, 128265, rope_theta=5e5, max_position_embeddings=8192)

# InternLM2.5 (InternVL2.5-2B / 26B): the shapes of their InternLM2 predecessors; 92553 = 92544 + InternVL's 9 tokens
INTERNLM25_18B = replace(INTERNLM2_18B, name="internlm2_5-1_8b-chat")
INTERNLM25_20B = replace(INTERNLM2_20B, name="internlm2_5-20b-chat")

# Qwen2.5 (Qwen2 keys, q/k/v bias): the models' config.json; vocab 151674 = Qwen2.5's 151665 tokens + InternVL's 9
# (the llm_config of InternVL3-8B / 78B, MindSpeed-MM's examples/internvl3/model_{8B,78B}.json; <IMG_CONTEXT> = 151667)
_QWEN25 = dict(vocab_size=151674, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
QWEN25_05B = LLMFacts("Qwen2.5-0.5B-Instruct", "qwen2", 896, 24, 14, 2, 4864, **_QWEN25)
QWEN25_15B = LLMFacts("Qwen2.5-1.5B-Instruct", "qwen2", 1536, 28, 12, 2, 8960, **_QWEN25)
QWEN25_3B = LLMFacts("Qwen2.5-3B-Instruct", "qwen2", 2048, 36, 16, 2, 11008, **_QWEN25)
QWEN25_7B = LLMFacts("Qwen2.5-7B-Instruct", "qwen2", 3584, 28, 28, 4, 18944, **_QWEN25)
QWEN25_14B = LLMFacts("Qwen2.5-14B-Instruct", "qwen2", 5120, 48, 40, 8, 13824, **{**_QWEN25, "rms_norm_eps": 1e-5})
QWEN25_32B = LLMFacts("Qwen2.5-32B-Instruct", "qwen2", 5120, 64, 40, 8, 27648, **{**_QWEN25, "rms_norm_eps": 1e-5})
QWEN25_72B = LLMFacts("Qwen2.5-72B-Instruct", "qwen2", 8192, 80, 64, 8, 29568, **_QWEN25)


def _internvl3(llm: LLMFacts) -> LLMFacts:
    """InternVL3's Qwen2.5 llm_config adds dynamic NTK RoPE x2 (documented for InternVL3-8B and -78B in
    MindSpeed-MM's examples/internvl3/model_{8B,78B}.json; the other sizes are assumed to share the recipe)."""
    return replace(llm, rope_scaling={"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"})


# InternLM3-8B-Instruct (internlm/internlm3-8b-instruct config.json; transformers' InternLM3Config defaults agree):
# head_dim 128, 2 KV heads, no bias, RoPE theta 5e7 with dynamic NTK x6. OpenGVLab's InternVL3-9B ships it in
# InternLM2 keys (modeling_internlm2.py, fused GQA-interleaved wqkv; InternVL issue #1267, and transformers'
# convert_internvl_weights_to_hf.py maps InternVL3-9B with its InternLM2 renames), so its family uses the
# internlm2 dialect, with head_dim derived (4096 / 32 = 128, what InternLM2's code computes). Its llm_config
# vocab_size is not documented offline: InternLM3's 128512 is used.
INTERNLM3_8B = LLMFacts("internlm3-8b-instruct", "internlm3", 4096, 48, 32, 2, 10240, 128512, rope_theta=5e7, rms_norm_eps=1e-5,
                        max_position_embeddings=32768, head_dim=128, rope_scaling={"factor": 6.0, "rope_type": "dynamic"})
INTERNLM3_8B_AS_INTERNLM2 = replace(INTERNLM3_8B, dialect="internlm2", head_dim=None,
                                    rope_scaling={"factor": 6.0, "type": "dynamic"})

# Qwen3 (InternVL3.5 dense): Qwen/Qwen3-*/config.json. head_dim 128 throughout, so q = heads x 128 differs from the
# width for 0.6B (16 x 128 = 2048 vs 1024), 4B (4096 vs 2560) and 32B (8192 vs 5120). The InternVL3.5 llm_config
# vocab_size is not documented offline: Qwen3's 151936 rows already hold InternVL's tokens (<IMG_CONTEXT> = 151671).
_QWEN3 = dict(vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, head_dim=128)
QWEN3_06B = LLMFacts("Qwen3-0.6B", "qwen3", 1024, 28, 16, 8, 3072, **_QWEN3)
QWEN3_17B = LLMFacts("Qwen3-1.7B", "qwen3", 2048, 28, 16, 8, 6144, **_QWEN3)
QWEN3_4B = LLMFacts("Qwen3-4B", "qwen3", 2560, 36, 32, 8, 9728, **_QWEN3)
QWEN3_8B = LLMFacts("Qwen3-8B", "qwen3", 4096, 36, 32, 8, 12288, **_QWEN3)
QWEN3_14B = LLMFacts("Qwen3-14B", "qwen3", 5120, 40, 40, 8, 17408, **_QWEN3)
QWEN3_32B = LLMFacts("Qwen3-32B", "qwen3", 5120, 64, 64, 8, 25600, **_QWEN3)

# Qwen3-30B-A3B (InternVL3.5-30B-A3B's LLM; Qwen/Qwen3-30B-A3B config.json): 48 layers, width 2048, 32 heads / 4 KV
# heads of 128, every layer sparse: 128 experts of width 768, top-8 renormalised, no shared expert; intermediate_size
# 6144 is the dense MLP width no layer uses (mlp_only_layers is empty). 30.5B parameters, 3.3B active per token.
QWEN3_30B_A3B = LLMFacts("Qwen3-30B-A3B", "qwen3_moe", 2048, 48, 32, 4, 6144, **_QWEN3,
                         moe=MoEFacts(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768))

_V1 = dict(ps_version="v1", dynamic_image_size=False, use_thumbnail=False, max_dynamic_patch=6)
# InternVL2.5 / 3 / 3.5: ChatML template `internvl2_5`, pixel shuffle v2, select_layer -1, downsample 0.5,
# 1-12 dynamic tiles + thumbnail (the Family defaults)
_V25 = dict(ps_version="v2", template="internvl2_5")

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
        # InternVL2.5 (model cards of OpenGVLab/InternVL2_5-*)
        Family("InternVL2.5-1B", VIT_300M_V2_5, QWEN25_05B, **_V25),
        Family("InternVL2.5-2B", VIT_300M_V2_5, INTERNLM25_18B, **_V25),
        Family("InternVL2.5-4B", VIT_300M_V2_5, QWEN25_3B, **_V25),
        Family("InternVL2.5-8B", VIT_300M_V2_5, INTERNLM25_7B, **_V25),
        Family("InternVL2.5-26B", VIT_6B_V2_5, INTERNLM25_20B, **_V25),
        Family("InternVL2.5-38B", VIT_6B_V2_5, QWEN25_32B, **_V25),
        Family("InternVL2.5-78B", VIT_6B_V2_5, QWEN25_72B, **_V25),
        # InternVL3 (OpenGVLab/InternVL3-*)
        Family("InternVL3-1B", VIT_300M_V2_5, _internvl3(QWEN25_05B), **_V25),
        Family("InternVL3-2B", VIT_300M_V2_5, _internvl3(QWEN25_15B), **_V25),
        Family("InternVL3-8B", VIT_300M_V2_5, _internvl3(QWEN25_7B), **_V25),
        Family("InternVL3-9B", VIT_300M_V2_5, INTERNLM3_8B_AS_INTERNLM2, **_V25),
        Family("InternVL3-14B", VIT_300M_V2_5, _internvl3(QWEN25_14B), **_V25),
        Family("InternVL3-38B", VIT_6B_V2_5, _internvl3(QWEN25_32B), **_V25),
        Family("InternVL3-78B", VIT_6B_V2_5, _internvl3(QWEN25_72B), **_V25),
        # InternVL3-9B with its LLM under InternLM3's own key names (InternLM3ForCausalLM), as a checkpoint assembled
        # from the standalone internlm3-8b-instruct holds it: not a separate release, the internlm3 dialect's family
        Family("InternVL3-9B-InternLM3", VIT_300M_V2_5, INTERNLM3_8B, **_V25),
        # InternVL3.5 (OpenGVLab/InternVL3_5-*); 241B-A28B and the GPT-OSS 20B-A4B are in dialects.NOT_SUPPORTED
        Family("InternVL3.5-1B", VIT_300M_V2_5, QWEN3_06B, **_V25),
        Family("InternVL3.5-2B", VIT_300M_V2_5, QWEN3_17B, **_V25),
        Family("InternVL3.5-4B", VIT_300M_V2_5, QWEN3_4B, **_V25),
        Family("InternVL3.5-8B", VIT_300M_V2_5, QWEN3_8B, **_V25),
        Family("InternVL3.5-14B", VIT_300M_V2_5, QWEN3_14B, **_V25),
        Family("InternVL3.5-38B", VIT_6B_V2_5, QWEN3_32B, **_V25),
        Family("InternVL3.5-30B-A3B", VIT_300M_V2_5, QWEN3_30B_A3B, **_V25),
    ]
}

def get_family(name: str) -> Family:
    """Look a family up by name, case-insensitively; the Hugging Face hub's spelling is accepted too
    ("OpenGVLab/InternVL2_5-8B" is InternVL2.5-8B: an owner prefix dropped, "_" read as ".").
    InputError for an unknown name."""
    wanted = name.rsplit("/", 1)[-1].lower().replace("_", ".")
    for key, family in FAMILIES.items():
        if key.lower() == wanted:
            return family
    from ..errors import InputError

    raise InputError(f"unknown family {name!r}; choose one of: {', '.join(FAMILIES)}")


def tiny_family(family: Family, *, vocab_size: int, image_size: int = 56) -> Family:
    """The same family at toy size: same styles and dialect, few layers, narrow widths.

    Group-query attention is kept where the family has it (kv heads < heads), and so is an
    explicit head_dim: 16 (= 64 / 4 heads) where the real one equals hidden / heads, 32 where it
    departs from it (Qwen3-0.6B / 4B / 32B), so q = heads x head_dim differs from the width there too.
    A sparse LLM keeps its sparsity at toy size: 4 experts of width 32, top-2.
    """
    gqa = family.llm.num_key_value_heads < family.llm.num_attention_heads
    vision = replace(family.vision, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, image_size=image_size)
    head_dim = family.llm.head_dim
    if head_dim is not None:
        head_dim = 16 if head_dim == family.llm.hidden_size // family.llm.num_attention_heads else 32
    llm = replace(family.llm, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, intermediate_size=96, vocab_size=vocab_size,
                  max_position_embeddings=2048, head_dim=head_dim,
                  moe=replace(family.llm.moe, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if family.llm.moe else None)
    return replace(family, vision=vision, llm=llm, select_layer=-1 if family.select_layer == -1 else -2)


def wide_family(family: Family, *, vision_layers: int = 2, llm_layers: int = 2) -> Family:
    """The family's true widths with few layers: for memory and speed benchmarks."""
    return replace(
        family,
        vision=replace(family.vision, num_hidden_layers=vision_layers),
        llm=replace(family.llm, num_hidden_layers=llm_layers),
        select_layer=-1,
    )


def identify(vision_style: str, dialect: str, ps_version: str, llm_hidden: int, template: str | None, name_hint: str = "",
             llm_layers: int | None = None, native: bool = False) -> str:
    """Name the family a checkpoint belongs to, or describe it when no family matches.

    Matches on the structural signature (ViT style, LLM dialect, pixel-shuffle version), then
    on the template, the LLM width and depth, then on the config's `_name_or_path` (its last
    part, "InternVL2_5-8B-MPO" naming InternVL2.5-8B) when several families share a signature.
    `native`: the LLM is read in the transformers-native layout, where a dialect may stand as
    the native class it converts to (a GPTQ / AWQ copy of InternLM2 is Llama there: packed
    q/k/v cannot be fused back into wqkv): unless a family of the dialect itself has the template,
    families whose dialect converts to the same native model type match too, and the template
    (kept from the original config) decides.
    """
    from .dialects import get_dialect

    shaped = [f for f in FAMILIES.values() if f.vision.norm_type == vision_style and f.ps_version == ps_version]
    candidates = [f for f in shaped if f.llm.dialect == dialect]
    if native and not any(f.template == template for f in candidates):
        native_type = get_dialect(dialect).native_model_type
        candidates += [f for f in shaped if f.llm.dialect != dialect and get_dialect(f.llm.dialect).native_model_type == native_type]
    if template:
        by_template = [f for f in candidates if f.template == template]
        candidates = by_template or candidates
    exact = [f for f in candidates if f.llm.hidden_size == llm_hidden]
    if llm_layers:
        exact = [f for f in exact if f.llm.num_hidden_layers == llm_layers] or exact
    hinted = sorted((f for f in candidates if _names(f.name, name_hint)), key=lambda f: -len(f.name))  # V1-2-Plus over V1-2
    if hinted and not any(f in exact for f in hinted):
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


def _names(family: str, name_hint: str) -> bool:
    """Whether a `_name_or_path` names the family: its last part equals the family name, or
    continues it after a dash (-MPO, -Instruct, -hf); "2_5" is read as "2.5" (the repository names)."""
    last = re.sub(r"(\d)_(\d)", r"\1.\2", name_hint.rstrip("/").rsplit("/", 1)[-1]).lower()
    name = family.lower()
    return bool(last) and (last == name or last.startswith(name + "-"))
