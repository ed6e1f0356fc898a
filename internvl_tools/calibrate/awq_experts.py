"""AWQ on a sparse (mixture-of-experts) block, Qwen3-MoE's: math only (the quantizer that folds
the scales is calibrate/awq_quantizer.py; the routing is calibrate/experts.py's).

The post-attention norm feeds the router and every expert's gate_proj and up_proj, so ONE scale
vector s [hidden] serves them all (llm-compressor's Qwen-MoE AWQ mapping: post_attention_layernorm
-> mlp.gate, mlp.experts.*.gate_proj, mlp.experts.*.up_proj): the norm's weight / s, every
expert's gate/up columns x s, and the router's columns x s too, so its logits, hence the routing,
stay what they were (the router itself is never quantized). The exponent is searched on the
error of the block's output, the routed, weighted sum of the experts' SwiGLU outputs (AutoAWQ's
`module2inspect` = the sparse block), with gate/up fake-quantized and down kept in float.

Memory: the block's inputs are kept as rows (float32 [n, hidden]) with at most `cap` rows: past
it, every other kept row is dropped (an even subsample of all calibration tokens); the mean |x|
and the per-expert token counts are over every token. Each grid point then runs the experts one
at a time (one expert's fake-quantized gate/up alive at once, never the layer's experts twice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .awq import AWQConfig, ScaleSearch, best_scales, fake_quantize

ExpertWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # expert -> (gate, up, down), float32


@dataclass
class BlockInputs:
    """What one pass over the calibration samples gives of a sparse block's input: `rows` float32
    [n, hidden] (every token, or an even subsample of them: `stride`), `mean_abs` float32 [hidden]
    over every token, `tokens` in all, `routed` int64 [experts]: tokens routed to each expert."""

    rows: torch.Tensor
    stride: int
    mean_abs: torch.Tensor
    tokens: int
    routed: torch.Tensor


def collect_block_inputs(inputs: Iterable[torch.Tensor], route: Callable[[torch.Tensor], torch.Tensor], experts: int,
                         cap: int) -> BlockInputs:
    """One pass over `inputs` (per sample, the block input [1, T, hidden]); `route(rows)` gives each
    row's experts [T, top_k]. Keeps at most `cap` (>= 1) rows: every stride-th token."""
    kept: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    abs_sum: torch.Tensor | None = None
    routed = torch.zeros(experts, dtype=torch.int64)
    tokens = count = 0
    stride = 1
    for hidden in inputs:
        rows = hidden.reshape(-1, hidden.shape[-1]).float()
        part = rows.abs().sum(0, dtype=torch.float64)
        abs_sum = part if abs_sum is None else abs_sum + part
        routed += torch.bincount(route(rows).flatten().cpu(), minlength=experts)
        index = torch.arange(tokens, tokens + rows.shape[0], device=rows.device)
        tokens += rows.shape[0]
        take = index % stride == 0
        kept.append(rows[take])
        positions.append(index[take])
        count += int(take.sum())
        while count > cap:  # keep every other one of the kept rows
            stride *= 2
            every, where = torch.cat(kept), torch.cat(positions)
            take = where % stride == 0
            kept, positions, count = [every[take]], [where[take]], int(take.sum())
    if abs_sum is None:
        raise RuntimeError("no calibration input reached the sparse block")
    return BlockInputs(torch.cat(kept), stride, (abs_sum / max(tokens, 1)).float(), tokens, routed)


def block_output(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: int, expert_weights: ExpertWeights,
                 act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The sparse block's output, float32 [n, hidden]: sum over each row's chosen experts of
    weight x down(act(gate(x)) * up(x)). x [n, hidden]; chosen / weights [n, top_k] (experts.routing)."""
    out = torch.zeros_like(x)
    for e in range(experts):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        if not len(rows):
            continue
        gate, up, down = expert_weights(e)
        xe = x[rows]
        y = (act(xe @ gate.T) * (xe @ up.T)) @ down.T
        out.index_add_(0, rows, y * weights[rows, slot, None].to(y.dtype))
    return out


def search_block_scales(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: int, expert_weights: ExpertWeights,
                        act: Callable[[torch.Tensor], torch.Tensor], x_mean: torch.Tensor, config: AWQConfig) -> ScaleSearch:
    """Grid search (Lin et al. 2023, eq. 5) of the one scale vector [hidden] shared by every expert's
    gate/up: s = mean|x|^alpha normalised (awq.normalized_scales), the alpha with the least squared
    error of the block's output per row, ||block(x) - block_Q(x)||^2 / n, where block_Q computes with
    Q(W s) / s for each gate/up and the float down; routing as in `chosen` / `weights` (the
    router's columns take s too, so its logits do not move). Alpha 0 is plain round-to-nearest."""
    target = block_output(x, chosen, weights, experts, expert_weights, act)
    count = max(x.shape[0], 1)
    def loss_of(s: torch.Tensor) -> float:
        s = s.to(x.device)

        def scaled(e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            gate, up, down = expert_weights(e)
            return fake_quantize(gate * s, config) / s, fake_quantize(up * s, config) / s, down

        return float((block_output(x, chosen, weights, experts, scaled, act) - target).square().sum()) / count

    best = best_scales(x_mean, config, loss_of)
    best.scales = best.scales.to(x.device)
    return best
