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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LayoutError
from ..transforms.stream import Output
from .layout import Layout


@dataclass(frozen=True)
class Link:
    """One original key and the native keys made from it (split) and back (merge)."""

    original: str
    natives: tuple[str, ...]
    split: Callable | None  # original tensor -> tuple of native tensors; None: same tensor
    merge: Callable | None  # native tensors -> original tensor; None: same tensor


VISION_RENAMES = {
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
INTERNLM2_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def links(config: dict, layout: Layout, *, adapt_v1: bool) -> list[Link]:
    """Every original key linked to its native keys, in checkpoint order."""
    if layout.lora:
        raise LayoutError("checkpoint has embedded LoRA adapters; merge them first with `internvl-tools merge-lora`")
    v1 = adapt_v1 and config.get("ps_version", "v1") == "v1"
    llm = config["llm_config"]
    heads = llm["num_attention_heads"]
    kv_heads = llm.get("num_key_value_heads", heads)
    head_dim = llm.get("head_dim") or llm["hidden_size"] // heads
    grid = (config.get("force_image_size") or config["vision_config"]["image_size"]) // config["vision_config"]["patch_size"]
    result = []
    for key, info in layout.keys.items():
        if info.part == "layer" and "rotary_emb" in info.module:
            continue  # a buffer recomputed from the config; not a weight
        if info.family == "vision":
            result.append(_vision_link(key, info, v1, grid))
        elif info.family == "projector":
            # the 4 x vit_hidden input axis: LayerNorm weight/bias, linear_1's weight columns
            swap = v1 and (info.module == "0" or (info.module == "1" and info.param == "weight"))
            native = f"model.multi_modal_projector.{PROJECTOR[info.module]}.{info.param}"
            result.append(Link(key, (native,), _one(swap_chunks) if swap else None, swap_chunks if swap else None))
        else:
            result.append(_llm_link(key, info, layout.dialect, heads, kv_heads, head_dim))
    return result


def to_native_outputs(link_list: list[Link]) -> list[Output]:
    """Outputs that build native tensors from an original checkpoint."""
    outputs = []
    for link in link_list:
        for index, native in enumerate(link.natives):
            fn = None if link.split is None else (lambda t, s=link.split, i=index: s(t)[i])
            outputs.append(Output(native, (link.original,), fn))
    return outputs


def to_original_outputs(link_list: list[Link]) -> list[Output]:
    """Outputs that rebuild the original tensors from a native checkpoint."""
    return [Output(link.original, link.natives, link.merge) for link in link_list]


# -- vision -------------------------------------------------------------------------------
def _vision_link(key: str, info, v1: bool, grid: int) -> Link:
    base = "model.vision_tower."
    if info.part == "embeddings":
        if info.module == "class_embedding":
            return Link(key, (base + "embeddings.cls_token",), None, None)
        if info.module == "position_embedding":
            fn = (lambda t: transpose_position_grid(t, grid)) if v1 else None
            return Link(key, (base + "embeddings.position_embeddings",), _one(fn) if fn else None, fn)
        native = base + f"embeddings.patch_embeddings.projection.{info.param}"
        fn = transpose_kernel if v1 and info.param == "weight" else None
        return Link(key, (native,), _one(fn) if fn else None, fn)
    prefix = f"{base}encoder.layer.{info.layer}."
    if info.module == "attn.qkv":
        natives = tuple(f"{prefix}attention.{p}_proj.{info.param}" for p in "qkv")
        return Link(key, natives, split_thirds, concat_rows)
    suffix = f".{info.param}" if info.param else ""
    return Link(key, (prefix + VISION_RENAMES[info.module] + suffix,), None, None)


# -- language model ------------------------------------------------------------------------
def _llm_link(key: str, info, dialect: str, heads: int, kv_heads: int, head_dim: int) -> Link:
    if info.part == "head":
        return Link(key, (f"lm_head.{info.param}",), None, None)
    if info.part in ("embeddings", "final_norm"):
        module = "embed_tokens" if info.part == "embeddings" else "norm"
        return Link(key, (f"model.language_model.{module}.{info.param}",), None, None)
    prefix = f"model.language_model.layers.{info.layer}."
    if dialect != "internlm2":
        return Link(key, (f"{prefix}{info.module}.{info.param}",), None, None)
    if info.module == "attention.wqkv":
        natives = tuple(f"{prefix}self_attn.{p}_proj.{info.param}" for p in "qkv")
        groups = heads // kv_heads
        return Link(key, natives, lambda t: split_internlm2_wqkv(t, kv_heads, groups, head_dim),
                    lambda q, k, v: merge_internlm2_wqkv(q, k, v, kv_heads, groups, head_dim))
    return Link(key, (f"{prefix}{INTERNLM2_RENAMES[info.module]}.{info.param}",), None, None)


# -- tensor functions (pure, work on meta tensors too) --------------------------------------
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

