"""Multi-GPU layout planning from real tensor byte sizes (pure: no I/O, testable with fake sizes).

Placement follows the InternVL model cards' rule and fixes what it ignores:
- GPU 0 holds the vision tower and projector whole (InternViT-6B's 25 heads don't split), the
  LLM embeddings, final norm and head, and the LAST decoder layer (this co-location avoids the
  "tensors on different devices" errors users hit with other splits);
- no decoder layer is split; layers 0..L-2 go in order over GPUs 0..N-1, balanced by bytes
  (weights + KV cache) against what each GPU already holds;
- every GPU keeps headroom, so a plan that "fits" can also run.

Headroom per GPU = reserve (CUDA context, allocator slack, transient activations; --reserve)
                 + KV cache of its decoder layers: 2 x kv_heads x head_dim x context x batch x 2 bytes per layer
                 + on GPU 0 only, the vision activations: tiles x (patches + 1) x width x 2 bytes x 8
                   plus eager attention scores tiles x heads x (patches + 1)^2 x 2 bytes,
                   with tiles = max_dynamic_patch + 1 (thumbnail) for dynamic models, else 1;
                   and the prefill logits: vocab x context x batch x 4 bytes (fp32; the remote-code
                   generate computes them for every prompt position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30


@dataclass(frozen=True)
class ModelSizes:
    """Byte sizes and shapes a device map needs, read from a checkpoint's headers and config."""

    vision_bytes: int
    projector_bytes: int
    embed_bytes: int
    norm_bytes: int
    head_bytes: int
    layer_bytes: tuple[int, ...]
    kv_bytes_per_token_per_layer: int  # 2 x kv_heads x head_dim x 2 bytes
    logits_bytes_per_token: int  # vocab x 4 bytes
    vision_activation_bytes: int
    module_names: dict[str, str] = field(default_factory=dict)  # part -> module prefix for device_map
    layer_prefix: str = "language_model.model.layers."


@dataclass(frozen=True)
class GpuPlan:
    """What one GPU holds."""

    gpu: int
    layers: tuple[int, ...]
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    reserve_bytes: int
    capacity_bytes: int
    holds_vision: bool

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.needed_bytes


@dataclass(frozen=True)
class DevicePlan:
    """A complete multi-GPU layout, or the reason it does not fit."""

    gpus: tuple[GpuPlan, ...]
    fits: bool
    device_map: dict[str, int]
    gpus_needed: int | None = None  # when it does not fit: GPUs of this size that would suffice


def plan_devices(
    sizes: ModelSizes,
    num_gpus: int,
    gpu_bytes: int,
    *,
    reserve_bytes: int = 2 * GIB,
    context_tokens: int = 8192,
    batch: int = 1,
    search_limit: int = 64,
) -> DevicePlan:
    """Place the model on `num_gpus` GPUs of `gpu_bytes` each (see the module docstring).

    When it does not fit, the returned plan has fits=False, the most balanced (overfull)
    placement, and `gpus_needed`: the smallest GPU count of that size that fits (None if
    even `search_limit` GPUs do not, e.g. because GPU 0's fixed share alone is too large).
    """
    if num_gpus < 1:
        raise ValueError("num_gpus must be at least 1")
    plan = _place(sizes, num_gpus, gpu_bytes, reserve_bytes, context_tokens * batch)
    if plan.fits:
        return plan
    needed = next((n for n in range(num_gpus + 1, search_limit + 1)
                   if _place(sizes, n, gpu_bytes, reserve_bytes, context_tokens * batch).fits), None)
    return DevicePlan(plan.gpus, False, plan.device_map, needed)


def _place(sizes: ModelSizes, num_gpus: int, gpu_bytes: int, reserve: int, tokens: int) -> DevicePlan:
    kv = sizes.kv_bytes_per_token_per_layer * tokens
    costs = [b + kv for b in sizes.layer_bytes]
    last = len(costs) - 1
    fixed0 = sizes.vision_bytes + sizes.projector_bytes + sizes.embed_bytes + sizes.norm_bytes + sizes.head_bytes
    activations0 = sizes.vision_activation_bytes + sizes.logits_bytes_per_token * tokens
    fixed0 += (costs[last] if costs else 0) + activations0
    fixed = [fixed0] + [0] * (num_gpus - 1)
    spread = costs[:last] if costs else []
    groups = _balanced_groups(spread, fixed)
    fits = all(fixed[g] + sum(spread[i] for i in groups[g]) <= gpu_bytes - reserve for g in range(num_gpus))
    if last >= 0:
        groups[0] = groups[0] + [last]
    gpus = []
    for g in range(num_gpus):
        weights = sum(sizes.layer_bytes[i] for i in groups[g])
        if g == 0:
            weights += sizes.vision_bytes + sizes.projector_bytes + sizes.embed_bytes + sizes.norm_bytes + sizes.head_bytes
        gpus.append(GpuPlan(g, tuple(groups[g]), weights, kv * len(groups[g]),
                            activations0 if g == 0 else 0, reserve, gpu_bytes, g == 0))
    return DevicePlan(tuple(gpus), fits, _device_map(sizes, groups))


def _balanced_groups(costs: list[int], fixed: list[int]) -> list[list[int]]:
    """Split `costs` (in order) into len(fixed) contiguous groups: smallest possible largest
    load (load of GPU g = fixed[g] + its layers), then as even as that allows."""
    n = len(fixed)
    if not costs:
        return [[] for _ in range(n)]
    low, high = max(max(fixed), max(costs)), max(fixed) + sum(costs)
    while low < high:
        mid = (low + high) // 2
        if _fill(costs, fixed, mid) is not None:
            high = mid
        else:
            low = mid + 1
    even = _fill(costs, fixed, low, even=True)
    return even if even is not None else _fill(costs, fixed, low)


def _fill(costs: list[int], fixed: list[int], bound: int, even: bool = False) -> list[list[int]] | None:
    """Greedy contiguous fill under `bound`; with `even`, a GPU also stops near the average
    of what is left, so the last GPUs are not left nearly empty."""
    groups: list[list[int]] = [[] for _ in fixed]
    g, load = 0, fixed[0]
    remaining = sum(costs) + sum(fixed)
    for i, cost in enumerate(costs):
        target = remaining / (len(fixed) - g)
        while load + cost > bound or (even and groups[g] and load + cost / 2 > target and g + 1 < len(fixed)):
            remaining -= load
            g += 1
            if g == len(fixed):
                return None
            load = fixed[g]
            target = remaining / (len(fixed) - g)
        groups[g].append(i)
        load += cost
    return groups


def _device_map(sizes: ModelSizes, groups: list[list[int]]) -> dict[str, int]:
    device_map = {name: 0 for name in sizes.module_names.values()}
    for g, layers in enumerate(groups):
        for layer in layers:
            device_map[f"{sizes.layer_prefix}{layer}"] = g
    return device_map
