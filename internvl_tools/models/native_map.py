"""Original (remote-code) InternVL layout <-> transformers-native InternVLForConditionalGeneration.

Each original key is linked to one or more native keys by a split function and its inverse
merge, so the conversion streams in both directions and a round trip is bit-identical:
- InternViT: attn.qkv rows [q; k; v] split into attention.{q,k,v}_proj; renames of norms,
  layer scales, embeddings;
- mlp1.0/1/3 -> multi_modal_projector.layer_norm/linear_1/linear_2;
- InternLM2 -> Llama: wqkv (rows grouped per KV head as [q x group, k, v]) split into
  q/k/v_proj, wo/w1/w3/w2 and the norms renamed; Llama, Qwen2 and Phi-3 keep their keys;
- ps_version v1 (`adapt_v1=True`): the native class always shuffles pixels v2-style, whose
  tokens are v1's with the grid transposed and two of the four channel chunks swapped. The
  patch-embedding kernel and position grid are transposed and mlp1's input chunks 1 and 2
  swapped, so the native model fed pixel_values.transpose(-1, -2) is exact.

A fused linear's tensors other than the float weight (a quantized checkpoint's scales, shapes,
format codes) are split and merged by their kind, which the on-disk format declares
(formats/*.py `fused`; passed in here as `fused`, {param: kind}):
- "rows": axis 0 is the output rows, cut and put back as the weight's rows (int8 weights,
  bitsandbytes SCB, channel scales, compressed-tensors' weight_packed: packed along inputs);
- "same": one tensor that every part holds alike (bitsandbytes' weight_format scalar, an
  act-order g_idx): copied to each part, merged only when the parts are equal;
- "shape": an integer vector (out, in, ...) of the float weight (compressed-tensors'
  weight_shape): each part gets its own row count, the merge sums them.
A parameter without a kind (GPTQ / AWQ tensors packed across output rows) cannot be split or
merged: LayoutError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LayoutError
from .dialects import Dialect, get_dialect
from .layout import Layout, llm_dialect
from .vision import LLM_PREFIX, NATIVE_HEAD, NATIVE_LLM_PREFIX, PROJECTOR, VISION


@dataclass(frozen=True)
class Link:
    """One original key and the native keys made from it (split) and back (merge)."""

    original: str
    natives: tuple[str, ...]
    split: Callable | None  # original tensor -> tuple of native tensors; None: same tensor
    merge: Callable | None  # native tensors -> original tensor; None: same tensor


VISION_RENAMES = dict(VISION.renames)
VISION_EMBEDDINGS = dict(VISION.embeddings)
PROJECTOR_RENAMES = dict(PROJECTOR.renames)
SIDECAR = "internvl_original.json"  # written by `convert --to hf`: the original config and key order
FUSED_KINDS = ("rows", "same", "shape")
PLAIN_FUSED = {"weight": "rows", "bias": "rows"}  # a float linear's tensors (formats/plain.py)


def links(config: dict, layout: Layout, *, adapt_v1: bool, fused: dict[str, str] | None = None) -> list[Link]:
    """Every original key linked to its native keys, in checkpoint order (rotary buffers,
    recomputed from the config, have no native key). `fused`: {param: kind} of the on-disk
    format (module docstring; default PLAIN_FUSED). Raises LayoutError (embedded LoRA, a fused
    tensor of a kind that cannot be split)."""
    if layout.lora:
        raise LayoutError("checkpoint has embedded LoRA adapters; merge them first with `internvl-tools merge-lora`")
    return [link_for_key(config, info, adapt_v1=adapt_v1, fused=fused) for info in layout.keys.values()
            if not (info.part == "layer" and "rotary_emb" in info.module)]


def link_for_key(config: dict, info, *, adapt_v1: bool, fused: dict[str, str] | None = None) -> Link:
    """The link of one classified original key (models.layout.KeyInfo) to its native key(s).

    `fused`: {param: kind} for the tensors of a fused linear (module docstring; default
    PLAIN_FUSED). Raises LayoutError for a fused linear's tensor without a kind."""
    link = _link_for_key(config, info, adapt_v1=adapt_v1)
    if link.split is None or len(link.natives) == 1:
        return link
    return fused_link(link, info, PLAIN_FUSED if fused is None else fused)


def fused_link(link: Link, info, fused: dict[str, str]) -> Link:
    """The link of one tensor of a fused linear, by the kind of its parameter (module docstring)."""
    kind = fused.get(info.param)
    count = len(link.natives)
    if kind == "rows":
        return link
    if kind == "same":
        return Link(link.original, link.natives, lambda t: (t,) * count, lambda *parts: merge_same(link.original, parts))
    if kind == "shape":
        return Link(link.original, link.natives, lambda t: split_shape(t, link.split, count),
                    lambda *parts: merge_shape(link.original, parts))
    parts = ", ".join(n.rpartition(".")[0].rpartition(".")[2] for n in link.natives)
    if fused is PLAIN_FUSED:
        raise LayoutError(f"key {link.original!r}: {info.param!r} of the fused {info.module} is a quantized tensor and this "
                          "reader was not given the checkpoint's format (open it through formats.views.open_view)")
    raise LayoutError(f"key {link.original!r}: the quantized tensor {info.param!r} of the fused {info.module} is not stored row "
                      f"by row, so it cannot be split into (or rebuilt from) {parts}; convert the bf16 checkpoint first, "
                      "then quantize the converted one")


def _link_for_key(config: dict, info, *, adapt_v1: bool) -> Link:
    key = info.key
    v1 = adapt_v1 and config.get("ps_version", "v1") == "v1"
    if info.family == "vision":
        vision = config["vision_config"]
        grid = (config.get("force_image_size") or vision["image_size"]) // vision["patch_size"]
        return _vision_link(key, info, v1, grid)
    if info.family == "projector":
        # the 4 x vit_hidden input axis: LayerNorm weight/bias, linear_1's weight columns
        swap = v1 and (info.module == "0" or (info.module == "1" and info.param == "weight"))
        native = f"{PROJECTOR.native_prefix}.{PROJECTOR_RENAMES[info.module]}.{info.param}"
        return Link(key, (native,), _one(swap_chunks) if swap else None, swap_chunks if swap else None)
    llm = config["llm_config"]
    heads = llm["num_attention_heads"]
    kv_heads = llm.get("num_key_value_heads") or heads
    head_dim = llm.get("head_dim") or llm["hidden_size"] // heads
    return _llm_link(key, info, get_dialect(llm_dialect(config)), heads, kv_heads, head_dim)


def native_module(module: str, record: Dialect) -> str:
    """The native module path of an original-layout module path (a device-map entry):
    vision_model -> model.vision_tower, mlp1 -> model.multi_modal_projector,
    language_model.model.layers.N -> model.language_model.layers.N, the embeddings / final
    norm / head of the dialect -> model.language_model.embed_tokens / .norm, lm_head.

    Raises LayoutError for a path outside these (a device map names whole parts only)."""
    llm = f"{LLM_PREFIX}.model."
    if module == VISION.prefix or module.startswith(VISION.prefix + "."):
        return VISION.native_prefix + module[len(VISION.prefix):]
    if module == PROJECTOR.prefix:
        return PROJECTOR.native_prefix
    if module == f"{LLM_PREFIX}.{record.head}":
        return NATIVE_HEAD
    if module == f"{llm}{record.embed}":
        return f"{NATIVE_LLM_PREFIX}.embed_tokens"
    if module.startswith(llm):
        return f"{NATIVE_LLM_PREFIX}.{module[len(llm):]}"
    if module == LLM_PREFIX:
        return NATIVE_LLM_PREFIX
    raise LayoutError(f"module {module!r} has no native counterpart; device maps name vision_model, mlp1 and language_model parts")


# -- vision -------------------------------------------------------------------------------
def _vision_link(key: str, info, v1: bool, grid: int) -> Link:
    base = VISION.native_prefix + "."
    if info.part == "embeddings":
        native = base + VISION_EMBEDDINGS[info.module] + (f".{info.param}" if info.param else "")
        if info.module == "position_embedding" and v1:
            fn = lambda t: transpose_position_grid(t, grid)  # noqa: E731
            return Link(key, (native,), _one(fn), fn)
        if info.module == "patch_embedding" and v1 and info.param == "weight":
            return Link(key, (native,), _one(transpose_kernel), transpose_kernel)
        return Link(key, (native,), None, None)
    prefix = f"{base}encoder.layer.{info.layer}."
    if info.module == VISION.fused_qkv:
        natives = tuple(f"{prefix}attention.{p}_proj.{info.param}" for p in "qkv")
        return Link(key, natives, split_thirds, concat_rows)
    suffix = f".{info.param}" if info.param else ""
    return Link(key, (prefix + VISION_RENAMES[info.module] + suffix,), None, None)


# -- language model ------------------------------------------------------------------------
def native_llm_module(record: Dialect, module: str) -> tuple[str, ...]:
    """Native module(s) of a decoder-layer module (linear or norm) of the original layout."""
    if module in record.norms:
        return (record.norms[module],)
    if module in record.linear_names:
        return record.linear(module).natives
    return (module,)


def _llm_link(key: str, info, record: Dialect, heads: int, kv_heads: int, head_dim: int) -> Link:
    if info.part == "head":
        return Link(key, (f"{NATIVE_HEAD}.{info.param}",), None, None)
    if info.part in ("embeddings", "final_norm"):
        module = "embed_tokens" if info.part == "embeddings" else "norm"
        return Link(key, (f"{NATIVE_LLM_PREFIX}.{module}.{info.param}",), None, None)
    prefix = f"{NATIVE_LLM_PREFIX}.layers.{info.layer}."
    natives = tuple(f"{prefix}{module}.{info.param}" for module in native_llm_module(record, info.module))
    if len(natives) == 1:
        return Link(key, natives, None, None)
    split_name = record.linear(info.module).split
    split, merge = SPLITS[split_name](heads, kv_heads, head_dim)
    return Link(key, natives, split, merge)


def _internlm2_wqkv(heads: int, kv_heads: int, head_dim: int):
    groups = heads // kv_heads
    return (lambda t: split_internlm2_wqkv(t, kv_heads, groups, head_dim),
            lambda q, k, v: merge_internlm2_wqkv(q, k, v, kv_heads, groups, head_dim))


# how a fused tensor named by Linear.split is cut into its native tensors, and put back:
# name -> (heads, kv_heads, head_dim) -> (split, merge)
SPLITS: dict[str, Callable] = {"internlm2_wqkv": _internlm2_wqkv}


# -- tensor functions (pure, work on meta tensors too) --------------------------------------
def merge_same(key: str, parts):
    """The one tensor every part of a fused linear holds alike; LayoutError when they differ."""
    import torch

    first = parts[0]
    if first.device.type != "meta":
        for part in parts[1:]:
            if part.shape != first.shape or part.dtype != first.dtype or not torch.equal(part, first):
                raise LayoutError(f"key {key!r}: its native parts differ ({first.tolist() if first.numel() < 8 else list(first.shape)} "
                                  f"vs {part.tolist() if part.numel() < 8 else list(part.shape)}), so they cannot be one fused tensor; "
                                  "the parts were quantized differently")
    return first


def split_shape(t, split: Callable, count: int):
    """A weight-shape vector (rows, in, ...) -> one per part (`count` parts), with the part's rows
    (as `split` cuts the rows)."""
    import torch

    if t.device.type == "meta":
        return tuple(torch.empty_like(t) for _ in range(count))
    rows, rest = int(t[0]), t[1:].tolist()
    return tuple(torch.tensor([p.shape[0], *rest], dtype=t.dtype) for p in split(torch.empty(rows, device="meta")))


def merge_shape(key: str, parts):
    """Part weight-shape vectors -> the fused one (rows summed; the other axes must agree)."""
    import torch

    first = parts[0]
    if first.device.type == "meta":
        return first
    if any(p[1:].tolist() != first[1:].tolist() for p in parts):
        raise LayoutError(f"key {key!r}: its native parts have weight shapes {[p.tolist() for p in parts]}, "
                          "which do not share their input width; they cannot be one fused tensor")
    return torch.tensor([sum(int(p[0]) for p in parts), *first[1:].tolist()], dtype=first.dtype)



def split_thirds(t):
    """[q; k; v] rows -> (q, k, v)."""
    rows = t.shape[0] // 3
    return t[:rows], t[rows : 2 * rows], t[2 * rows :]


def concat_rows(*parts):
    """(q, k, v) -> [q; k; v]."""
    import torch

    return torch.cat(parts, dim=0)


def split_internlm2_wqkv(t, kv_heads: int, groups: int, head_dim: int):
    """InternLM2's wqkv rows, grouped per KV head as [q x groups, k, v], -> (q, k, v)."""
    shaped = t.reshape(kv_heads, groups + 2, head_dim, *t.shape[1:])
    q = shaped[:, :groups].reshape(kv_heads * groups * head_dim, *t.shape[1:])
    k = shaped[:, groups].reshape(kv_heads * head_dim, *t.shape[1:])
    v = shaped[:, groups + 1].reshape(kv_heads * head_dim, *t.shape[1:])
    return q, k, v


def merge_internlm2_wqkv(q, k, v, kv_heads: int, groups: int, head_dim: int):
    """Inverse of split_internlm2_wqkv."""
    import torch

    rest = q.shape[1:]
    shaped = torch.cat(
        [q.reshape(kv_heads, groups, head_dim, *rest), k.reshape(kv_heads, 1, head_dim, *rest), v.reshape(kv_heads, 1, head_dim, *rest)],
        dim=1,
    )
    return shaped.reshape(kv_heads * (groups + 2) * head_dim, *rest)


def transpose_kernel(t):
    """Patch-embedding kernel [C, 3, p, p] with its spatial axes swapped (an involution)."""
    return t.transpose(-1, -2).contiguous()


def transpose_position_grid(t, grid: int):
    """Position embeddings [1, 1 + g*g, C] with the g x g grid transposed (an involution)."""
    import torch

    cls, patches = t[:, :1], t[:, 1:]
    channels = t.shape[-1]
    patches = patches.reshape(1, grid, grid, channels).transpose(1, 2).reshape(1, grid * grid, channels)
    return torch.cat([cls, patches], dim=1)


def swap_chunks(t):
    """Swap the 2nd and 3rd quarter of the last axis (mlp1's 4 x vit_hidden input; an involution)."""
    shape = t.shape
    quarters = t.reshape(*shape[:-1], 4, shape[-1] // 4)
    return quarters[..., [0, 2, 1, 3], :].reshape(shape)


def _one(fn: Callable) -> Callable:
    return lambda t: (fn(t),)

