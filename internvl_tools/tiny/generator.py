"""Generate InternVL checkpoints with random weights and the real key layout of each family.

Used by the tests (tiny), the demo and the benchmarks (`wide`: true widths, few layers).
Tensors are generated one at a time and streamed through the checkpoint writer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.dialects import get_dialect, layer_dims, linear_shape
from ..models.families import Family, get_family, tiny_family, wide_family
from ..models.vision import VISION
from ..io.safetensors_format import TensorSpec
from ..errors import InputError
from ..io.writer import CheckpointWriter, plan_shards
from .tokenizer import tokenizer_files

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

VISION_LORA_TARGETS = list(VISION.linears)


@dataclass(frozen=True)
class Planned:
    """One tensor to generate: its spec and how to fill it ("normal", "ones", "zeros", "scale")."""

    spec: TensorSpec
    init: str


def vision_tensors(family: Family) -> list[Planned]:
    """The InternViT keys of a family (original layout)."""
    v = family.vision
    h, i = v.hidden_size, v.intermediate_size
    grid = (v.image_size // v.patch_size) ** 2
    out = [
        _p("vision_model.embeddings.class_embedding", (1, 1, h)),
        _p("vision_model.embeddings.patch_embedding.weight", (h, 3, v.patch_size, v.patch_size)),
        _p("vision_model.embeddings.patch_embedding.bias", (h,), "small"),
        _p("vision_model.embeddings.position_embedding", (1, grid + 1, h)),
    ]
    with_bias = v.norm_type == "layer_norm"
    for n in range(v.num_hidden_layers):
        pre = f"vision_model.encoder.layers.{n}."
        out.append(_p(pre + "attn.qkv.weight", (3 * h, h)))
        if v.qkv_bias:
            out.append(_p(pre + "attn.qkv.bias", (3 * h,), "small"))
        if v.qk_normalization:
            out += [_p(pre + "attn.q_norm.weight", (h,), "ones"), _p(pre + "attn.k_norm.weight", (h,), "ones")]
        out += [_p(pre + "attn.proj.weight", (h, h)), _p(pre + "attn.proj.bias", (h,), "small")]
        out += [_p(pre + "mlp.fc1.weight", (i, h)), _p(pre + "mlp.fc1.bias", (i,), "small")]
        out += [_p(pre + "mlp.fc2.weight", (h, i)), _p(pre + "mlp.fc2.bias", (h,), "small")]
        for norm in ("norm1", "norm2"):
            out.append(_p(pre + f"{norm}.weight", (h,), "ones"))
            if with_bias:
                out.append(_p(pre + f"{norm}.bias", (h,), "small"))
        out += [_p(pre + "ls1", (h,), "scale"), _p(pre + "ls2", (h,), "scale")]
    return out


def projector_tensors(family: Family) -> list[Planned]:
    """mlp1: LayerNorm(4*vit) -> Linear -> GELU -> Linear."""
    width = family.vision.hidden_size * int(1 / family.downsample_ratio) ** 2
    d = family.llm.hidden_size
    return [
        _p("mlp1.0.weight", (width,), "ones"), _p("mlp1.0.bias", (width,), "small"),
        _p("mlp1.1.weight", (d, width)), _p("mlp1.1.bias", (d,), "small"),
        _p("mlp1.3.weight", (d, d)), _p("mlp1.3.bias", (d,), "small"),
    ]


def llm_config_dims(family: Family) -> dict[str, int]:
    """The symbolic decoder-layer dimensions of a family's LLM (models.dialects.layer_dims)."""
    m = family.llm
    return layer_dims({"hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads, "head_dim": m.head_dim,
                       "num_key_value_heads": m.num_key_value_heads, "intermediate_size": m.intermediate_size,
                       **({"moe_intermediate_size": m.moe.moe_intermediate_size, "num_experts": m.moe.num_experts} if m.moe else {})})


def llm_layer_shapes(family: Family) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape for one decoder layer, in the family's dialect (a sparse
    layer: its router and each expert's linears too, "mlp.gate", "mlp.experts.E.gate_proj")."""
    dims = llm_config_dims(family)
    record = get_dialect(family.llm.dialect)
    shapes = {linear.name: linear_shape(linear, dims) for linear in record.linears}
    if record.experts is not None:
        experts = record.experts
        shapes[experts.router] = (family.llm.moe.num_experts, dims["hidden"])
        for expert in range(family.llm.moe.num_experts):
            shapes.update({experts.module(expert, linear.name): linear_shape(linear, dims) for linear in experts.linears})
    return shapes


def lora_targets(dialect: str) -> list[str]:
    """The LLM linears LoRA targets by default: every linear of a layer, a sparse layer's expert
    linears by their name inside an expert ("gate_proj" matches each expert's; never the router)."""
    record = get_dialect(dialect)
    return list(record.linear_names) + ([item.name for item in record.experts.linears] if record.experts else [])


def llm_tensors(family: Family) -> list[Planned]:
    """The language model keys of a family (original layout, its own dialect)."""
    m = family.llm
    record = get_dialect(m.dialect)
    d, head_dim = m.hidden_size, llm_config_dims(family)["head_dim"]
    out = [_p(f"language_model.model.{record.embed}.weight", (m.vocab_size, d))]
    shapes = llm_layer_shapes(family)
    for n in range(m.num_hidden_layers):
        pre = f"language_model.model.layers.{n}."
        for linear in record.linears:
            out.append(_p(pre + linear.name + ".weight", shapes[linear.name]))
            if linear.bias:
                out.append(_p(pre + linear.name + ".bias", shapes[linear.name][:1], "small"))
        if record.experts is not None:  # transformers' order: experts, then the router
            experts = record.experts
            out += [_p(pre + experts.module(e, linear.name) + ".weight", shapes[experts.module(e, linear.name)])
                    for e in range(m.moe.num_experts) for linear in experts.linears]
            out.append(_p(pre + experts.router + ".weight", shapes[experts.router]))
        out += [_p(pre + norm + ".weight", (head_dim,), "ones") for norm in record.extra_norms]
        out += [_p(pre + norm + ".weight", (d,), "ones") for norm in record.norms]
    out.append(_p(f"language_model.model.{record.final_norm}.weight", (d,), "ones"))
    out.append(_p(f"language_model.{record.head}.weight", (m.vocab_size, d)))
    return out


def with_embedded_lora(planned: list[Planned], tower: str, targets: list[str], rank: int) -> list[Planned]:
    """Wrap one tower's keys the way peft does inside InternVL's fine-tuning (alpha = 2r)."""
    out = []
    for item in planned:
        name = item.spec.name
        if not name.startswith(tower + "."):
            out.append(item)
            continue
        wrapped = name.replace(tower + ".", f"{tower}.base_model.model.", 1)
        module = next((t for t in targets if name.endswith(f".{t}.weight") or name.endswith(f".{t}.bias")), None)
        if module is None:
            out.append(Planned(TensorSpec(wrapped, item.spec.dtype, item.spec.shape), item.init))
            continue
        stem, param = wrapped.rsplit(".", 1)
        out.append(Planned(TensorSpec(f"{stem}.base_layer.{param}", item.spec.dtype, item.spec.shape), item.init))
        if param == "weight":
            rows, cols = item.spec.shape
            out.append(_p(f"{stem}.lora_A.default.weight", (rank, cols), "lora"))
            out.append(_p(f"{stem}.lora_B.default.weight", (rows, rank), "lora"))
    return out


def make_config(family: Family, *, use_llm_lora: int = 0, use_backbone_lora: int = 0, name: str = "",
                token_ids: dict[str, int | None] | None = None) -> dict:
    """An original-layout config.json (model_type internvl_chat) for a family."""
    v, m = family.vision, family.llm
    llm = {
        "_name_or_path": m.name,
        "architectures": [get_dialect(m.dialect).architectures[0]],
        "model_type": get_dialect(m.dialect).model_type,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_hidden_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "intermediate_size": m.intermediate_size,
        "vocab_size": m.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if m.head_dim is not None:
        llm["head_dim"] = m.head_dim
    if m.rope_scaling:
        llm["rope_scaling"] = dict(m.rope_scaling)
    if m.moe is not None:  # Qwen3-MoE's config keys: every layer sparse, no shared expert
        llm.update({"num_experts": m.moe.num_experts, "num_experts_per_tok": m.moe.num_experts_per_tok,
                    "moe_intermediate_size": m.moe.moe_intermediate_size, "norm_topk_prob": m.moe.norm_topk_prob,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
                    "output_router_logits": False})
    if m.dialect in ("internlm2", "internlm3"):
        llm["bias"] = False  # InternLM2 / InternLM3 configs name their bias flags `bias` (and InternLM3 `qkv_bias`)
    if m.dialect == "internlm3":
        llm["qkv_bias"] = False
    llm.update(token_ids or {})
    return {
        "_name_or_path": name or family.name,
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": family.template,
        "ps_version": family.ps_version,
        "downsample_ratio": family.downsample_ratio,
        "select_layer": family.select_layer,
        "force_image_size": v.image_size,
        "dynamic_image_size": family.dynamic_image_size,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": family.max_dynamic_patch,
        "use_thumbnail": family.use_thumbnail,
        "use_backbone_lora": use_backbone_lora,
        "use_llm_lora": use_llm_lora,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "qkv_bias": v.qkv_bias,
            "qk_normalization": v.qk_normalization,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": 3,
            "hidden_act": "gelu",
            "use_flash_attn": False,
            "torch_dtype": "bfloat16",
        },
        "llm_config": llm,
    }


def side_files(family: Family) -> dict[str, object]:
    """generation_config.json and preprocessor_config.json for a generated checkpoint."""
    size = family.vision.image_size
    return {
        "generation_config.json": {"do_sample": False, "max_new_tokens": 64},
        "preprocessor_config.json": {
            "crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3, "size": size,
            "feature_extractor_type": "CLIPFeatureExtractor",
        },
    }


def make_checkpoint(
    family_name: str,
    out: Path,
    *,
    lora: str = "none",
    rank: int = 4,
    shards: int = 2,
    wide: bool = False,
    vision_layers: int = 2,
    llm_layers: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    head_dim: int | None = None,
    planned_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Write a random-weight checkpoint of a family: tiny by default, true widths with `wide`.

    `lora` is none, embedded (LLM and vision), embedded-llm, embedded-vision; `vision_layers` and
    `llm_layers` set the depth of a wide checkpoint. `head_dim` (tiny only) widens the LLM to
    heads x head_dim so its attention heads have that size (tiny's default is 16; vLLM's CPU
    attention needs 32, 64, 80, ...). `planned_bytes(n)` is told the bytes of weights to write
    before the first (a progress bar's total); `progress(n)` each tensor's as it is written.
    """
    base = get_family(family_name)
    files, vocab = tokenizer_files(base.template)
    family = wide_family(base, vision_layers=vision_layers, llm_layers=llm_layers) if wide else tiny_family(base, vocab_size=_round_up(vocab, 64))
    if head_dim is not None and not wide:
        family = with_head_dim(family, head_dim)
    planned = vision_tensors(family) + llm_tensors(family) + projector_tensors(family)
    llm_rank = rank if lora in ("embedded", "embedded-llm") else 0
    vision_rank = rank if lora in ("embedded", "embedded-vision") else 0
    if llm_rank:
        planned = with_embedded_lora(planned, "language_model", lora_targets(family.llm.dialect), llm_rank)
    if vision_rank:
        planned = with_embedded_lora(planned, "vision_model", VISION_LORA_TARGETS, vision_rank)
    specs = [item.spec for item in planned]
    config = make_config(family, use_llm_lora=llm_rank, use_backbone_lora=vision_rank, name=base.name, token_ids=special_ids(files))
    files.update(side_files(family))
    files["config.json"] = config
    if shards > len(specs):
        raise InputError(f"--shards {shards}: {base.name}{' (wide)' if wide else ''} has {len(specs)} tensors, and a shard holds "
                         f"at least one; pass --shards {len(specs)} at most")
    limit = shard_limit_for(specs, shards)
    groups = None if len(plan_shards(specs, limit)) == shards else shard_groups(specs, shards)  # exactly `shards` files
    generator = torch.Generator().manual_seed(seed)
    if planned_bytes:
        planned_bytes(sum(s.nbytes for s in specs))
    with CheckpointWriter(out, specs, max_shard_size=limit if groups is None else sum(s.nbytes for s in specs),
                          groups=groups, overwrite=overwrite) as writer:
        for item in planned:
            writer.write(item.spec.name, _fill(item, generator))
            if progress:
                progress(item.spec.nbytes)
        return writer.finalize(files=files)


def with_head_dim(family: Family, head_dim: int) -> Family:
    """A tiny family whose LLM heads have `head_dim` channels: the width becomes heads x head_dim
    (head and KV-head counts, so GQA, stay); an explicit config head_dim follows.

    Raises ValueError for a head_dim that is not a positive even number (rotary halves it)."""
    from dataclasses import replace

    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    m = family.llm
    llm = replace(m, hidden_size=m.num_attention_heads * head_dim, head_dim=head_dim if m.head_dim is not None else None)
    return replace(family, llm=llm)


CONFIG_MODULE = "configuration_internvl_chat"  # tiny/configuration_internvl_chat.py: test use only


def add_config_module(folder: Path) -> Path:
    """Make a generated original-layout checkpoint readable by vLLM (tests only): copy the minimal
    InternVLChatConfig module into `folder` and point config.json's `auto_map` at it (loaders then
    need trust_remote_code). Real checkpoints keep their own remote code. Returns the folder.

    Raises ValueError for a folder whose config.json is not the original layout."""
    import json
    import shutil

    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "internvl_chat":
        raise ValueError(f"{folder}: not an original-layout checkpoint (model_type {config.get('model_type')!r})")
    shutil.copyfile(Path(__file__).with_name(f"{CONFIG_MODULE}.py"), Path(folder) / f"{CONFIG_MODULE}.py")
    config["auto_map"] = {"AutoConfig": f"{CONFIG_MODULE}.InternVLChatConfig"}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def special_ids(files: dict[str, object]) -> dict[str, int | None]:
    """bos/eos/pad token ids of a generated tokenizer, for llm_config."""
    import json

    vocab = json.loads(files["tokenizer.json"])
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    special = files["special_tokens_map.json"]
    return {f"{role}_token_id": ids.get(special.get(f"{role}_token")) for role in ("bos", "eos", "pad")}


def make_peft_adapter(checkpoint: Path, out: Path, *, rank: int = 4, alpha: float = 8, bare_llm: bool = True,
                      targets: list[str] | None = None, vision: bool = False, seed: int = 1, extra_config: dict | None = None) -> Path:
    """Write a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) with
    random A and B for a checkpoint's LLM linears (keys of the bare LLM, as peft saves an
    adapter trained on it, or of the whole InternVL model), and optionally its ViT linears."""
    import json

    from safetensors.torch import save_file

    from ..models.layout import build_layout
    from ..io.reader import CheckpointReader

    with CheckpointReader(checkpoint) as reader:
        config = reader.config()
        layout = build_layout(config, reader.specs())
        shapes = {s.name: s.shape for s in reader.specs()}
    names = targets or (lora_targets(layout.dialect) + (VISION_LORA_TARGETS if vision else []))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, info in layout.keys.items():
        inside = info.module.rsplit(".", 1)[-1] if info.expert is not None else info.module  # an expert's gate_proj
        if info.lora or info.param != "weight" or info.part != "layer" or (info.module not in names and inside not in names):
            continue
        if info.family == "vision" and not vision:
            continue
        rows, cols = shapes[key]
        module = key.removesuffix(".weight")
        if bare_llm and info.family == "llm":
            module = module.removeprefix("language_model.")
        module = "base_model.model." + module
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) * 0.1
        tensors[f"{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if bare_llm else None, "r": rank, "lora_alpha": alpha,
        "target_modules": sorted({n.split(".")[-1] for n in names}), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": str(checkpoint),
        **(extra_config or {}),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def shard_groups(specs: list[TensorSpec], shards: int) -> list[list[TensorSpec]]:
    """`specs` in order, cut into exactly `shards` non-empty runs of about equal bytes (1 <= shards <= len(specs)):
    for a shard count no size limit gives (the limit cuts where tensors overflow, and a tensor over it stands alone)."""
    total = sum(s.nbytes for s in specs)
    groups: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    done = 0
    for index, spec in enumerate(specs):
        still_to_open = shards - len(groups) - 1  # groups after the current one
        if current and still_to_open and (len(specs) - index == still_to_open or done >= total * (len(groups) + 1) / shards):
            groups.append(current)
            current = []
        current.append(spec)
        done += spec.nbytes
    groups.append(current)
    return groups


def shard_limit_for(specs: list[TensorSpec], shards: int) -> int:
    """The smallest shard size limit that splits `specs` into at most `shards` shards."""
    low, high = max((s.nbytes for s in specs), default=1), max(sum(s.nbytes for s in specs), 1)
    while low < high:
        mid = (low + high) // 2
        if len(plan_shards(specs, mid)) <= shards:
            high = mid
        else:
            low = mid + 1
    return low


def _p(name: str, shape: tuple[int, ...], init: str = "normal") -> Planned:
    return Planned(TensorSpec(name, "BF16", tuple(shape)), init)


def _fill(item: Planned, generator: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(item.spec.shape, dtype=torch.bfloat16)
    if item.init == "ones":
        return tensor.normal_(1.0, 0.05, generator=generator)
    if item.init == "scale":
        return tensor.normal_(0.1, 0.02, generator=generator)
    if item.init == "small":
        return tensor.normal_(0.0, 0.01, generator=generator)
    if item.init == "lora":
        return tensor.normal_(0.0, 0.1, generator=generator)
    fan_in = math.prod(item.spec.shape[1:]) if len(item.spec.shape) > 1 else item.spec.shape[0]
    return tensor.normal_(0.0, min(0.02, 1.0 / math.sqrt(max(fan_in, 1))) * 2, generator=generator)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
