"""A sparse layer's routed experts in the calibrated pipeline: each expert is calibrated on the
calibration tokens the router sends to it.

transformers runs a Qwen3-MoE layer's experts from fused parameters in one loop
(models/dialects.Experts), where no hook sees one expert's input. So, per cached sample, the
pipeline takes the input of the sparse block (`Experts.block`, after the post-attention norm),
routes it itself with the router's weight the way the block does (softmax over the logits, the
top-k experts per token) and hands each expert the rows routed to it:

- the expert's first group (gate_proj, up_proj) reads those rows of the block input;
- its second group (down_proj) reads act(gate(x)) * up(x) under the expert's current, already
  quantized gate and up (true-sequential, as the dense groups).

Experts are taken in chunks whose Hessians fit a quarter of the activation budget; each chunk is
one pass over the samples (the attention in front of the block is recomputed per pass), so at
most a chunk of Hessians is alive. How a method treats an expert that few tokens reach is the
method's (GroupWork.tokens / calibration_tokens; GPTQ: round-to-nearest below a share of the
calibration tokens, GPTQModel's fallback). The router itself is never quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..models.dialects import Experts, InputGroup
from .quantizer import GroupWork, LayerWork, ModuleUpdate, Quantizer

HESSIAN_SHARE = 4  # at most 1/HESSIAN_SHARE of the activation budget in expert Hessians at once
EXPERT_MIN_TOKENS = 0.005  # GPTQModel's default `Fallback`: below 0.5% of the calibration tokens, round-to-nearest


def min_routed_tokens(share: float, calibration_tokens: int | None) -> int:
    """The fewest routed tokens an expert needs to be calibrated: `share` of the calibration tokens, at least 1."""
    return max(1, int(share * (calibration_tokens or 0)))


def routing(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts, weights) of each token, int64 [tokens, top_k] and float32 [tokens, top_k], as the
    sparse block routes: softmax over the router's logits, the top_k, renormalised to sum to 1 when
    `norm_topk` (norm_topk_prob). hidden [..., hidden]; router_weight [experts, hidden]."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ router_weight.T.to(hidden.dtype)
    weights, chosen = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return chosen, weights


def route(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """The experts each token goes to, [tokens, top_k] (by the router's softmax; renormalising the
    chosen weights, norm_topk_prob, changes the mix, never the choice)."""
    return routing(hidden, router_weight, top_k)[0]


@dataclass(frozen=True)
class SparseBlock:
    """A sparse decoder layer's routing as a quantizer sees it (LayerWork.sparse): the dialect's
    `experts` record, the LLM config's `settings` (Experts.settings: experts, top_k, intermediate,
    norm_topk), the experts' activation `act` (SiLU for Qwen3-MoE) and the activation `budget` in
    bytes (a method keeps at most budget / HESSIAN_SHARE of its own statistics at once)."""

    experts: Experts
    settings: dict
    act: Callable[[torch.Tensor], torch.Tensor]
    budget: int

    def route(self, rows: torch.Tensor, router_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts, weights) of the rows [tokens, hidden] of the block's input (`routing`)."""
        return routing(rows, router_weight, self.settings["top_k"], self.settings["norm_topk"])


def expert_chunks(count: int, width: int, budget: int) -> list[range]:
    """Experts in chunks whose float32 [width, width] Hessians fit budget / HESSIAN_SHARE."""
    size = max(1, min(count, budget // HESSIAN_SHARE // (4 * width * width)))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def quantize_experts(layer, work: LayerWork, quantizer: Quantizer, apply: Callable[[Iterable[tuple[str, ModuleUpdate]]], None],
                     llm_config: dict, budget: int) -> dict[int, int]:
    """Quantize every routed expert of the decoder layer `layer` (calibrate.pipeline.DecoderLayer)
    with `quantizer`, group by group (all experts' gate/up first, then their down), on the tokens
    routed to each; returns the tokens routed to each expert."""
    experts = layer.experts
    settings = experts.settings(llm_config)
    router = layer.module.get_parameter(f"{experts.router}.weight").detach()
    act = layer.module.get_submodule(experts.prefix).act_fn
    tokens: dict[int, int] = {}
    total = 0
    for index in range(len(experts.groups)):
        width = layer.weight(experts.expert_groups(0)[index].linears[0]).shape[1]
        for chunk in expert_chunks(settings["experts"], width, budget):
            groups = {e: experts.expert_groups(e)[index] for e in chunk}
            seen = {e: 0 for e in chunk}
            total = 0
            for hidden in layer.inputs(experts.block):
                rows = hidden.reshape(-1, hidden.shape[-1])
                chosen = route(rows, router, settings["top_k"])
                total += rows.shape[0]
                for e in chunk:
                    picked = (chosen == e).any(dim=-1)
                    count = int(picked.sum())
                    if count:
                        seen[e] += count
                        quantizer.observe(groups[e], _group_input(layer, experts, e, index, rows[picked], act)[None])
            for e in chunk:
                tokens[e] = seen[e]
                apply(quantizer.quantize_group(GroupWork(work, groups[e], tokens=seen[e], calibration_tokens=total)))
    return tokens


def _group_input(layer, experts, expert: int, index: int, x: torch.Tensor, act) -> torch.Tensor:
    """The input of expert `expert`'s group `index` for its routed rows x [n, hidden]: x itself for
    the first group, act(gate(x)) * up(x) (its current weights) for the second."""
    if index == 0:
        return x
    first: InputGroup = experts.expert_groups(expert)[0]
    gate, up = (layer.weight(name) for name in first.linears)  # float32
    x = x.float()
    return act(x @ gate.T) * (x @ up.T)
