"""LLM dialects as data: one record per key dialect an InternVL checkpoint's language model uses.

A dialect record says everything the rest of the toolkit needs to know about a decoder-only
LLM's checkpoint keys, with no code paths of its own:

- the keys outside the decoder layers (embedding table, final norm, head), original layout;
- the linears of one decoder layer in execution order, their weight shapes in symbolic
  dimensions, which of them carry a bias, how a fused one splits into the native (transformers)
  modules, and the groups of linears that read the same input (what GPTQ shares a Hessian
  over and what AWQ scales together, with the module whose output feeds the group);
- the norms of a decoder layer and their native names;
- the native config's `model_type` and the transformers decoder-layer / rotary classes.

Sources: the architectures' transformers implementations (`models/llama`, `models/qwen2`,
`models/phi3`, `models/qwen3`, `models/internlm3`: a config-only module that runs InternLM3 as
Llama), InternLM2's remote code (`modeling_internlm2.py`: fused, GQA-interleaved `wqkv`), and
InternVL's checkpoints (../shared/DESIGN.md §2, §2b).

A sparse (mixture-of-experts) dialect adds an `Experts` record: the per-expert linears, how
transformers fuses them in memory, the router and the routing settings' config keys.

Adding a dialect = one `Dialect(...)` in `DIALECTS`; a split rule for a new kind of fused
tensor is the only code that may come with it (models/native_map.py `SPLITS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import LayoutError


@dataclass(frozen=True)
class Linear:
    """One linear of a decoder layer (original layout).

    `name` is the module path inside the layer (e.g. "self_attn.q_proj"); `shape` the weight's
    [out, in] in symbolic dimensions ("hidden", "q" = heads x head_dim, "kv" = kv_heads x
    head_dim, "inter" = intermediate_size, sums like "q+2kv" and multiples like "2inter");
    `native` the native module(s) it becomes (several when the tensor is fused and `split`
    names the rule in native_map.SPLITS that cuts it, e.g. "internlm2_wqkv").
    """

    name: str
    shape: tuple[str, str]
    native: tuple[str, ...] = ()
    split: str | None = None
    bias: bool = False

    @property
    def natives(self) -> tuple[str, ...]:
        return self.native or (self.name,)


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input, in execution order of the layer.

    `hook` is the native module whose input is the group's input (a forward pre-hook there
    sees it); `after` is the module (norm or linear, original layout) whose output is that
    input, so a per-channel input scale can be folded into it (AWQ; Lin et al. 2023), or None
    where no such fold is exact. `after_rows` names the rule in FUSED_ROWS that picks the rows
    of a fused `after` producing the input (the v rows of a fused qkv tensor, the up half of a
    fused gate/up tensor); None when all of `after`'s outputs are the input."""

    linears: tuple[str, ...]
    hook: str
    after: str | None
    after_rows: str | None = None


def _internlm2_wqkv_v(rows: int, width: int, head_dim: int) -> list[tuple[int, int]]:
    """InternLM2 wqkv rows per KV head are [q x groups, k, v] (models/native_map.py
    split_internlm2_wqkv): the v rows of KV head j are the last head_dim of its block."""
    heads = width // head_dim
    kv = (rows // head_dim - heads) // 2
    block = (heads // kv + 2) * head_dim
    return [(j * block + block - head_dim, (j + 1) * block) for j in range(kv)]


def _qkv_v(rows: int, width: int, head_dim: int) -> list[tuple[int, int]]:
    """Phi-3 qkv_proj rows are [q (heads x head_dim); k (kv x head_dim); v (kv x head_dim)]."""
    kv_rows = (rows - width) // 2
    return [(rows - kv_rows, rows)]


def _gate_up_up(rows: int, width: int, head_dim: int) -> list[tuple[int, int]]:
    """Phi-3 gate_up_proj rows are [gate; up] (transformers Phi3MLP: gate, up = chunk(2)); the
    down_proj input is up x act(gate), so scaling the up rows scales it."""
    return [(rows // 2, rows)]


# InputGroup.after_rows rules: (rows of the fused `after` weight, the group's input width,
# head_dim) -> [(start, stop), ...] row spans of `after` whose outputs are the group's input
# channels, in the order the input sees them (v rows in KV-head order: the o_proj columns of
# query head h read KV head h // (heads / kv_heads))
FUSED_ROWS: dict[str, Callable[[int, int, int], list[tuple[int, int]]]] = {
    "internlm2_wqkv_v": _internlm2_wqkv_v, "qkv_v": _qkv_v, "gate_up_up": _gate_up_up}


@dataclass(frozen=True)
class Experts:
    """The routed experts of a sparse (mixture-of-experts) decoder layer, and its router.

    On disk every expert is its own set of linears, `{prefix}.{E}.{linear}` for E in
    0..config[count]-1 (original and native layout alike; transformers 5 saves them so), with
    `linears` giving their [out, in] shapes in symbolic dimensions ("moe_inter" =
    config[intermediate], "hidden"). In memory transformers fuses them per layer: `fused` maps each
    expert linear to (parameter of the `{prefix}` module, chunk): the parameter is [E, rows, in]
    and a linear is chunk i of the rows of its parameter, in order (Qwen3-MoE: gate_up_proj
    [E, 2 x moe_inter, hidden] = [gate; up] per expert, down_proj [E, hidden, moe_inter]).

    The router `router` (weight [experts, hidden]) reads the sparse block's input (`block`,
    after the post-attention norm): softmax over its logits, the top config[top_k] experts,
    their weights renormalised to sum to 1 when config[norm_topk]; the block's output is the
    weighted sum of the chosen experts' SwiGLU outputs, down(silu(gate(x)) * up(x)). The router
    is never quantized (every method keeps it in the checkpoint's dtype) but is a linear for
    LoRA: an adapter that carries it is merged into it.

    `groups` are the input groups of ONE expert (names relative to the expert): each expert is
    calibrated on the tokens routed to it (calibrate/pipeline.py)."""

    linears: tuple[Linear, ...]
    groups: tuple[InputGroup, ...]
    fused: dict[str, tuple[str, int]] = field(hash=False, default_factory=dict)
    prefix: str = "mlp.experts"
    router: str = "mlp.gate"
    block: str = "mlp"
    count: str = "num_experts"  # config keys
    top_k: str = "num_experts_per_tok"
    intermediate: str = "moe_intermediate_size"
    norm_topk: str = "norm_topk_prob"

    def module(self, expert: int, linear: str) -> str:
        """The module path of one expert's linear inside a decoder layer ("mlp.experts.5.gate_proj")."""
        return f"{self.prefix}.{expert}.{linear}"

    def parse(self, module: str) -> tuple[int, str] | None:
        """(expert, linear) of an expert module path, None for any other module."""
        head, dot, rest = module.partition(self.prefix + ".")
        if head or not dot:
            return None
        index, _, linear = rest.partition(".")
        if not index.isdigit() or linear not in {item.name for item in self.linears}:
            return None
        return int(index), linear

    def fused_slot(self, linear: str) -> tuple[str, int, int]:
        """(fused parameter, chunk, chunks) of one expert linear in the in-memory layout."""
        param, chunk = self.fused[linear]
        return param, chunk, sum(1 for p, _ in self.fused.values() if p == param)

    def settings(self, llm_config: dict) -> dict:
        """{"experts", "top_k", "intermediate", "norm_topk"} of an LLM config (Qwen3-MoE's defaults where absent)."""
        return {"experts": int(llm_config.get(self.count) or 0), "top_k": int(llm_config.get(self.top_k) or 0),
                "intermediate": int(llm_config.get(self.intermediate) or 0),
                "norm_topk": bool(llm_config.get(self.norm_topk, False))}

    def expert_groups(self, expert: int) -> tuple[InputGroup, ...]:
        """The input groups of one expert with module paths of the decoder layer."""
        return tuple(InputGroup(tuple(self.module(expert, name) for name in group.linears), self.block, None)
                     for group in self.groups)


@dataclass(frozen=True)
class Dialect:
    """The key dialect of one LLM family (see the module docstring)."""

    name: str
    architectures: tuple[str, ...]
    model_type: str
    native_model_type: str
    embed: str
    head: str
    linears: tuple[Linear, ...]
    groups: tuple[InputGroup, ...]
    norms: dict[str, str]  # original norm module -> native norm module (attention norm first, then MLP norm)
    extra_norms: tuple[str, ...] = ()  # per-head norms inside attention (Qwen3 q_norm / k_norm), same name natively
    decoder_layer: tuple[str, str, str] = ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding")
    final_norm: str = "norm"
    native_renames: dict[str, str] = field(default_factory=dict)  # linear name -> native name for unfused renames
    buffers: tuple[str, ...] = ("self_attn.rotary_emb", "attention.rotary_emb")  # non-weight buffers some checkpoints carry
    # head_dim is a config field of its own (Qwen3: 128 even where hidden / heads is 64 or 80): always written
    # into configs, never derived; the native class's own default must not decide it
    explicit_head_dim: bool = False
    # a sparse dialect's routed experts and router (Qwen3-MoE); `linears` / `groups` are then the dense
    # part of the layer (attention), the experts' own linears are `experts.linears`, per expert
    experts: Experts | None = None

    def linear(self, name: str) -> Linear:
        """The record of one linear by its original module path."""
        for item in self.linears:
            if item.name == name:
                return item
        raise LayoutError(f"{self.name}: no linear {name!r}; its linears are {', '.join(l.name for l in self.linears)}")

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(item.name for item in self.linears)

    @property
    def biased(self) -> tuple[str, ...]:
        return tuple(item.name for item in self.linears if item.bias)


_LLAMA_DECODER = ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding")
_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm"}


def _qkvo_mlp(bias: bool = False) -> tuple[Linear, ...]:
    return (
        Linear("self_attn.q_proj", ("q", "hidden"), bias=bias),
        Linear("self_attn.k_proj", ("kv", "hidden"), bias=bias),
        Linear("self_attn.v_proj", ("kv", "hidden"), bias=bias),
        Linear("self_attn.o_proj", ("hidden", "q")),
        Linear("mlp.gate_proj", ("inter", "hidden")),
        Linear("mlp.up_proj", ("inter", "hidden")),
        Linear("mlp.down_proj", ("hidden", "inter")),
    )


_QKVO_GROUPS = (
    InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.q_proj", "input_layernorm"),
    InputGroup(("self_attn.o_proj",), "self_attn.o_proj", "self_attn.v_proj"),
    InputGroup(("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj", "post_attention_layernorm"),
    InputGroup(("mlp.down_proj",), "mlp.down_proj", "mlp.up_proj"),
)

LLAMA = Dialect(
    name="llama", architectures=("LlamaForCausalLM",), model_type="llama", native_model_type="llama",
    embed="embed_tokens", head="lm_head", linears=_qkvo_mlp(), groups=_QKVO_GROUPS, norms=_NORMS,
    decoder_layer=_LLAMA_DECODER,
)

QWEN2 = Dialect(
    name="qwen2", architectures=("Qwen2ForCausalLM",), model_type="qwen2", native_model_type="qwen2",
    embed="embed_tokens", head="lm_head", linears=_qkvo_mlp(bias=True), groups=_QKVO_GROUPS, norms=_NORMS,
    decoder_layer=("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
)

INTERNLM2 = Dialect(
    name="internlm2", architectures=("InternLM2ForCausalLM",), model_type="internlm2", native_model_type="llama",
    embed="tok_embeddings", head="output",
    linears=(
        Linear("attention.wqkv", ("q+2kv", "hidden"), native=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               split="internlm2_wqkv"),
        Linear("attention.wo", ("hidden", "q"), native=("self_attn.o_proj",)),
        Linear("feed_forward.w1", ("inter", "hidden"), native=("mlp.gate_proj",)),
        Linear("feed_forward.w3", ("inter", "hidden"), native=("mlp.up_proj",)),
        Linear("feed_forward.w2", ("hidden", "inter"), native=("mlp.down_proj",)),
    ),
    groups=(
        InputGroup(("attention.wqkv",), "self_attn.q_proj", "attention_norm"),
        InputGroup(("attention.wo",), "self_attn.o_proj", "attention.wqkv", "internlm2_wqkv_v"),
        InputGroup(("feed_forward.w1", "feed_forward.w3"), "mlp.gate_proj", "ffn_norm"),
        InputGroup(("feed_forward.w2",), "mlp.down_proj", "feed_forward.w3"),
    ),
    norms={"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    decoder_layer=_LLAMA_DECODER,
)

PHI3 = Dialect(
    name="phi3", architectures=("Phi3ForCausalLM",), model_type="phi3", native_model_type="phi3",
    embed="embed_tokens", head="lm_head",
    linears=(
        Linear("self_attn.qkv_proj", ("q+2kv", "hidden")),
        Linear("self_attn.o_proj", ("hidden", "q")),
        Linear("mlp.gate_up_proj", ("2inter", "hidden")),
        Linear("mlp.down_proj", ("hidden", "inter")),
    ),
    groups=(
        InputGroup(("self_attn.qkv_proj",), "self_attn.qkv_proj", "input_layernorm"),
        InputGroup(("self_attn.o_proj",), "self_attn.o_proj", "self_attn.qkv_proj", "qkv_v"),
        InputGroup(("mlp.gate_up_proj",), "mlp.gate_up_proj", "post_attention_layernorm"),
        InputGroup(("mlp.down_proj",), "mlp.down_proj", "mlp.gate_up_proj", "gate_up_up"),
    ),
    norms=_NORMS,
    decoder_layer=("transformers.models.phi3.modeling_phi3", "Phi3DecoderLayer", "Phi3RotaryEmbedding"),
)

# Qwen3 (InternVL3.5 dense): Qwen2's key names without q/k/v bias, plus an RMSNorm over head_dim
# applied to every query and key head before RoPE (`self_attn.q_norm` / `k_norm`, weight [head_dim])
QWEN3 = Dialect(
    name="qwen3", architectures=("Qwen3ForCausalLM",), model_type="qwen3", native_model_type="qwen3",
    embed="embed_tokens", head="lm_head", linears=_qkvo_mlp(), groups=_QKVO_GROUPS, norms=_NORMS,
    extra_norms=("self_attn.q_norm", "self_attn.k_norm"),
    decoder_layer=("transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer", "Qwen3RotaryEmbedding"),
    explicit_head_dim=True,
)

# InternLM3 as its own remote code saves it: Llama key names, explicit head_dim, no bias; transformers runs
# it as Llama (its `internlm3` model type maps to LlamaForCausalLM), so the native config is Llama with
# head_dim kept. (OpenGVLab's InternVL3-9B stores its InternLM3 LLM in InternLM2 keys instead: see families.py.)
INTERNLM3 = Dialect(
    name="internlm3", architectures=("InternLM3ForCausalLM",), model_type="internlm3", native_model_type="llama",
    embed="embed_tokens", head="lm_head", linears=_qkvo_mlp(), groups=_QKVO_GROUPS, norms=_NORMS,
    decoder_layer=_LLAMA_DECODER, explicit_head_dim=True,
)

# Qwen3-MoE (InternVL3.5-30B-A3B): Qwen3's attention (no bias, q_norm / k_norm over head_dim) and, in every layer
# (decoder_sparse_step 1, no mlp_only_layers), a sparse block instead of the MLP: router `mlp.gate` [experts, hidden],
# experts `mlp.experts.E.{gate,up,down}_proj`, no shared expert (transformers' models/qwen3_moe; its checkpoint
# conversion fuses the experts on load and splits them again on save)
QWEN3_MOE = Dialect(
    name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_type="qwen3_moe", native_model_type="qwen3_moe",
    embed="embed_tokens", head="lm_head", linears=_qkvo_mlp()[:4], groups=_QKVO_GROUPS[:2], norms=_NORMS,
    extra_norms=("self_attn.q_norm", "self_attn.k_norm"),
    decoder_layer=("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeDecoderLayer", "Qwen3MoeRotaryEmbedding"),
    explicit_head_dim=True,
    experts=Experts(
        linears=(Linear("gate_proj", ("moe_inter", "hidden")), Linear("up_proj", ("moe_inter", "hidden")),
                 Linear("down_proj", ("hidden", "moe_inter"))),
        groups=(InputGroup(("gate_proj", "up_proj"), "mlp", None), InputGroup(("down_proj",), "mlp", None)),
        fused={"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)},
    ),
)

DIALECTS: dict[str, Dialect] = {d.name: d for d in (LLAMA, QWEN2, INTERNLM2, PHI3, QWEN3, INTERNLM3, QWEN3_MOE)}


@dataclass(frozen=True)
class Unsupported:
    """A released InternVL LLM this toolkit refuses, with the reason (never a guess).

    It matches an LLM config whose architecture (original llm_config) or model_type (native
    text_config) is listed, when every field of `signature` has that value or the checkpoint's
    `_name_or_path` contains one of `name_hints`; with neither, every config of that
    architecture matches."""

    model: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    reason: str
    signature: dict = field(default_factory=dict, hash=False)
    name_hints: tuple[str, ...] = ()

    def matches(self, llm_config: dict, name_hint: str = "") -> bool:
        kind = set(llm_config.get("architectures") or []) & set(self.architectures) or llm_config.get("model_type") in self.model_types
        if not kind:
            return False
        if not self.signature and not self.name_hints:
            return True
        by_size = bool(self.signature) and all(llm_config.get(k) == v for k, v in self.signature.items())
        by_name = any(h.lower() in name_hint.lower() for h in self.name_hints)
        return by_size or by_name


# Checked before the dialects, in order. InternVL3.5-241B-A28B's LLM is Qwen3-235B-A22B, the same Qwen3-MoE
# architecture as InternVL3.5-30B-A3B's Qwen3-30B-A3B (the qwen3_moe dialect), so the architecture alone does not
# refuse it: its size signature (width 4096, 94 layers, 128 experts) or its name does.
NOT_SUPPORTED: tuple[Unsupported, ...] = (
    Unsupported("InternVL3.5-20B-A4B, GPT-OSS", ("GptOssForCausalLM",), ("gpt_oss",),
                "its experts are packed MXFP4 blocks, which no format here reads"),
    Unsupported("InternVL3.5-241B-A28B, Qwen3-235B-A22B", ("Qwen3MoeForCausalLM",), ("qwen3_moe",),
                "its 94-layer, 128-expert LLM is not targeted",
                signature={"hidden_size": 4096, "num_hidden_layers": 94, "num_experts": 128}, name_hints=("241B", "235B")),
)


def refuse_unsupported(llm_config: dict, where: str, name_hint: str = "") -> None:
    """Raise LayoutError (one line, naming the model and why) for an LLM in NOT_SUPPORTED."""
    for record in NOT_SUPPORTED:
        if record.matches(llm_config, name_hint):
            kind = (llm_config.get("architectures") or [llm_config.get("model_type")])[0]
            raise LayoutError(f"{where}: {kind} ({record.model}) is not supported yet; {record.reason}")


def get_dialect(name: str) -> Dialect:
    """The record of a dialect by name; LayoutError lists the supported ones."""
    try:
        return DIALECTS[name]
    except KeyError:
        raise LayoutError(f"unknown LLM dialect {name!r}; supported: {', '.join(DIALECTS)}") from None


def dialect_of_architecture(architectures: list[str], where: str) -> Dialect:
    """The dialect whose architectures include one of `architectures` (llm_config.architectures).

    Raises LayoutError naming `where` (the config field) and listing what is supported (models in
    NOT_SUPPORTED are refused first by `refuse_unsupported`, which sees the whole config)."""
    for arch in architectures or []:
        for dialect in DIALECTS.values():
            if arch in dialect.architectures:
                return dialect
    supported = ", ".join(a for d in DIALECTS.values() for a in d.architectures)
    raise LayoutError(f"{where} {list(architectures or [])!r} is not a supported LLM; supported: {supported}")


def dialect_of_native_model_type(model_type: str | None, where: str, text_config: dict | None = None) -> Dialect:
    """The dialect a native text_config.model_type stands for (InternLM2 and InternLM3 convert to
    llama and read back as llama). Models in NOT_SUPPORTED are refused (by size signature too when
    the whole `text_config` is given)."""
    refuse_unsupported(text_config or {"model_type": model_type}, where)
    for dialect in DIALECTS.values():
        if dialect.native_model_type == model_type and dialect.model_type == model_type:
            return dialect
    supported = sorted({d.native_model_type for d in DIALECTS.values()})
    raise LayoutError(f"{where} {model_type!r} is not a supported LLM; supported: {', '.join(supported)}")


def layer_dims(llm_config: dict) -> dict[str, int]:
    """Symbolic dimensions of a decoder layer from an LLM config (head_dim explicit or derived:
    an explicit head_dim may differ from hidden / heads, so "q" need not equal "hidden")."""
    heads = llm_config["num_attention_heads"]
    head_dim = llm_config.get("head_dim") or llm_config["hidden_size"] // heads
    kv_heads = llm_config.get("num_key_value_heads") or heads
    inter = llm_config["intermediate_size"]
    dims = {"hidden": llm_config["hidden_size"], "q": heads * head_dim, "kv": kv_heads * head_dim, "inter": inter,
            "head_dim": head_dim, "q+2kv": (heads + 2 * kv_heads) * head_dim, "2inter": 2 * inter}
    if llm_config.get("moe_intermediate_size"):  # a sparse dialect's experts (Dialect.experts)
        dims.update({"moe_inter": llm_config["moe_intermediate_size"], "experts": llm_config.get("num_experts", 0)})
    return dims


def linear_shape(linear: Linear, dims: dict[str, int]) -> tuple[int, int]:
    """A linear's weight shape [out, in] for concrete dimensions (see `layer_dims`)."""
    return dims[linear.shape[0]], dims[linear.shape[1]]
