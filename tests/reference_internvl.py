"""An independent re-statement of the original InternVL forward, from the published architecture.

Plain torch over the ORIGINAL checkpoint keys (no transformers modules, no key mapping): used
to check the runtime, the native conversion and everything built on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from internvl_tools.io.reader import CheckpointReader


def load_state(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    with CheckpointReader(folder) as reader:
        return reader.config(), {k: reader.get(k).float() for k in reader.keys()}


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def vit_norm(x, sd, prefix, cfg):
    if cfg["norm_type"] == "rms_norm":
        return rms(x, sd[prefix + ".weight"], cfg["layer_norm_eps"])
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], cfg["layer_norm_eps"])


def vit_forward(config, sd, pixels):
    """All hidden states of InternViT: [embeddings, after layer 1, ..., after layer L]."""
    cfg = config["vision_config"]
    w = sd["vision_model.embeddings.patch_embedding.weight"]
    x = F.conv2d(pixels, w, sd["vision_model.embeddings.patch_embedding.bias"], stride=cfg["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["vision_model.embeddings.position_embedding"]
    states = [x]
    heads = cfg["num_attention_heads"]
    for n in range(cfg["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{n}."
        h = vit_norm(x, sd, p + "norm1", cfg)
        qkv = h @ sd[p + "attn.qkv.weight"].T
        if cfg["qkv_bias"]:
            qkv = qkv + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.chunk(3, dim=-1)
        if cfg["qk_normalization"]:
            q = rms(q, sd[p + "attn.q_norm.weight"], cfg["layer_norm_eps"])
            k = rms(k, sd[p + "attn.k_norm.weight"], cfg["layer_norm_eps"])
        b, t, d = q.shape
        q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, t, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + sd[p + "ls1"] * att
        h = vit_norm(x, sd, p + "norm2", cfg)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + sd[p + "ls2"] * h
        states.append(x)
    return states


def shuffle_tokens(grid, version):
    """Pixel shuffle by its definition: 2x2 neighbourhoods concatenated as
    [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)]; v2 orders tokens row-major, v1 column-major."""
    n, side, _, c = grid.shape
    half = side // 2
    tokens = []
    order = [(i, j) for i in range(half) for j in range(half)] if version == "v2" else [(i, j) for j in range(half) for i in range(half)]
    for i, j in order:
        tokens.append(torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], dim=-1))
    return torch.stack(tokens, dim=1)


def image_features(config, sd, pixels):
    """Vision tower (select_layer) -> drop CLS -> pixel shuffle -> mlp1."""
    states = vit_forward(config, sd, pixels)
    x = states[config.get("select_layer", -1)][:, 1:, :]
    side = int(math.isqrt(x.shape[1]))
    x = shuffle_tokens(x.reshape(x.shape[0], side, side, -1), config["ps_version"])
    x = F.layer_norm(x, x.shape[-1:], sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = F.gelu(x @ sd["mlp1.1.weight"].T + sd["mlp1.1.bias"])
    return x @ sd["mlp1.3.weight"].T + sd["mlp1.3.bias"]


def head_dim(cfg):
    """An explicit head_dim (Qwen3, InternLM3) wins over hidden / heads."""
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _qkv(sd, p, dialect, cfg):
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = head_dim(cfg)
    if dialect == "internlm2":
        w = sd[p + "attention.wqkv.weight"].reshape(kv, heads // kv + 2, hd, -1)
        return (w[:, :-2].reshape(heads * hd, -1), w[:, -2].reshape(kv * hd, -1), w[:, -1].reshape(kv * hd, -1)), (None, None, None)
    if dialect == "phi3":
        w = sd[p + "self_attn.qkv_proj.weight"]
        return (w[: heads * hd], w[heads * hd : (heads + kv) * hd], w[(heads + kv) * hd :]), (None, None, None)
    ws = tuple(sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
    bs = tuple(sd.get(p + f"self_attn.{x}_proj.bias") for x in "qkv")
    return ws, bs


def _mlp(sd, p, dialect, x):
    if dialect == "internlm2":
        gate, up, down = sd[p + "feed_forward.w1.weight"], sd[p + "feed_forward.w3.weight"], sd[p + "feed_forward.w2.weight"]
    elif dialect == "phi3":
        gate, up = sd[p + "mlp.gate_up_proj.weight"].chunk(2, dim=0)
        down = sd[p + "mlp.down_proj.weight"]
    else:
        gate, up, down = (sd[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def route(sd, p, cfg, x):
    """(weights, experts) [T, top_k] each token of x [T, D] goes to: softmax over the router's logits,
    top-k, renormalised when norm_topk_prob."""
    probs = torch.softmax(x @ sd[p + "mlp.gate.weight"].T, dim=-1)
    top, chosen = probs.topk(cfg["num_experts_per_tok"], dim=-1)
    if cfg.get("norm_topk_prob"):
        top = top / top.sum(dim=-1, keepdim=True)
    return top, chosen


def _moe(sd, p, cfg, x):
    """A sparse block by its definition: router logits -> softmax -> the top-k experts per token,
    their probabilities renormalised to sum to 1 when norm_topk_prob; the output is the weighted sum
    of the chosen experts' SwiGLU, each expert computed on its own per-expert tensors."""
    top, chosen = route(sd, p, cfg, x)
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for weight, expert in zip(top[token], chosen[token].tolist()):
            e = f"{p}mlp.experts.{expert}."
            h = F.silu(x[token] @ sd[e + "gate_proj.weight"].T) * (x[token] @ sd[e + "up_proj.weight"].T)
            out[token] += weight * (h @ sd[e + "down_proj.weight"].T)
    return out


def rotate(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = positions[:, None].float() * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def llm_logits(config, sd, embeds):
    """Causal decoder over input embeddings [1, T, D] in the checkpoint's own key dialect.

    Llama, Yi, Qwen2 (q/k/v bias when present) and InternLM3 share key names; Qwen3 adds an
    RMSNorm over each query / key head (weights [head_dim]) before RoPE; q has heads x head_dim
    rows, which need not equal the width. RoPE scaling of the dynamic kind changes nothing below
    max_position_embeddings, which the test prompts stay under. Qwen3-MoE is Qwen3's attention with a
    sparse block (`_moe`) in place of every layer's MLP."""
    cfg = config["llm_config"]
    x = embeds[0]
    assert x.shape[0] <= cfg["max_position_embeddings"]
    for n in range(cfg["num_hidden_layers"]):
        x = decoder_layer(config, sd, n, x)[1]
    x = rms(x, sd["language_model.model.norm.weight"], cfg["rms_norm_eps"])
    head = sd.get("language_model.lm_head.weight", sd.get("language_model.output.weight"))
    return (x @ head.T)[None]


def llm_dialect(cfg):
    return {"InternLM2ForCausalLM": "internlm2", "Phi3ForCausalLM": "phi3", "Qwen3ForCausalLM": "qwen3",
            "Qwen3MoeForCausalLM": "qwen3_moe"}.get(cfg["architectures"][0], "llama")


def decoder_layer(config, sd, n, x):
    """Decoder layer n over hidden states [T, D] (positions 0..T-1, causal): (the MLP's / sparse
    block's input after the second norm, the layer's output)."""
    cfg = config["llm_config"]
    dialect = llm_dialect(cfg)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = head_dim(cfg)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    norms = ("attention_norm", "ffn_norm") if dialect == "internlm2" else ("input_layernorm", "post_attention_layernorm")
    out_name = "attention.wo" if dialect == "internlm2" else "self_attn.o_proj"
    t = x.shape[0]
    positions = torch.arange(t)
    mask = torch.full((t, t), float("-inf")).triu(1)
    p = f"language_model.model.layers.{n}."
    h = rms(x, sd[p + norms[0] + ".weight"], eps)
    (wq, wk, wv), (bq, bk, bv) = _qkv(sd, p, dialect, cfg)
    q, k, v = h @ wq.T, h @ wk.T, h @ wv.T
    if bq is not None:
        q, k, v = q + bq, k + bk, v + bv
    q, k = q.reshape(t, heads, hd), k.reshape(t, kv, hd)
    if dialect in ("qwen3", "qwen3_moe"):
        q = rms(q, sd[p + "self_attn.q_norm.weight"], eps)
        k = rms(k, sd[p + "self_attn.k_norm.weight"], eps)
    q = rotate(q.transpose(0, 1), positions, theta)
    k = rotate(k.transpose(0, 1), positions, theta).repeat_interleave(heads // kv, dim=0)
    v = v.reshape(t, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
    x = x + att.transpose(0, 1).reshape(t, heads * hd) @ sd[p + out_name + ".weight"].T
    h = rms(x, sd[p + norms[1] + ".weight"], eps)
    return h, x + (_moe(sd, p, cfg, h) if dialect == "qwen3_moe" else _mlp(sd, p, dialect, h))


def embed(config, sd, input_ids, features, context_id):
    table = sd.get("language_model.model.embed_tokens.weight", sd.get("language_model.model.tok_embeddings.weight"))
    x = table[input_ids]
    if features is not None:
        x = x.clone()
        x[input_ids == context_id] = features.reshape(-1, features.shape[-1])
    return x


def logits(folder, input_ids, pixels, context_id):
    """Reference logits of an original checkpoint for a prompt and optional pixels."""
    config, sd = load_state(folder)
    features = image_features(config, sd, pixels) if pixels is not None else None
    return llm_logits(config, sd, embed(config, sd, input_ids, features, context_id))
