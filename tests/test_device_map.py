"""The multi-GPU planner as a pure function over real model shapes (fake sizes, no tensors)."""

from __future__ import annotations

import math

import pytest

from internvl_tools.planners.device_map import GIB, ModelSizes, plan_devices

from .support import real_sizes

GB = 10**9


def model_card_split(num_layers: int, world_size: int) -> dict[int, int]:
    """The model cards' split_model rule, re-stated: layer -> GPU (GPU 0 counts as half)."""
    per_gpu = math.ceil(num_layers / (world_size - 0.5))
    counts = [per_gpu] * world_size
    counts[0] = math.ceil(per_gpu * 0.5)
    owner, layer = {}, 0
    for gpu, count in enumerate(counts):
        for _ in range(count):
            if layer < num_layers:
                owner[layer] = gpu
            layer += 1
    owner[num_layers - 1] = 0
    return owner


def check_invariants(plan, sizes: ModelSizes, gpu_bytes: int):
    layers = [layer for g in plan.gpus for layer in g.layers]
    assert sorted(layers) == list(range(len(sizes.layer_bytes)))  # each layer once, none split
    last = len(sizes.layer_bytes) - 1
    assert last in plan.gpus[0].layers and plan.gpus[0].holds_vision
    assert not any(g.holds_vision for g in plan.gpus[1:])
    spread = [[l for l in g.layers if l != last] for g in plan.gpus]
    flat = [l for group in spread for l in group]
    assert flat == list(range(last))  # layers 0..L-2 in order over GPUs 0..N-1
    assert sum(g.weight_bytes for g in plan.gpus) == (sizes.vision_bytes + sizes.projector_bytes + sizes.embed_bytes
                                                      + sizes.norm_bytes + sizes.head_bytes + sum(sizes.layer_bytes))
    dm = plan.device_map
    for module in ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm", "language_model.lm_head"):
        assert dm[module] == 0
    assert dm[f"language_model.model.layers.{last}"] == 0
    for g in plan.gpus:
        for layer in g.layers:
            assert dm[f"language_model.model.layers.{layer}"] == g.gpu
    if plan.fits:
        assert all(g.free_bytes >= 0 for g in plan.gpus)
    else:
        assert any(g.free_bytes < 0 for g in plan.gpus)


def test_real_76b_sizes():
    sizes = real_sizes("InternVL2-Llama3-76B")
    total = sizes.vision_bytes + sizes.projector_bytes + sizes.embed_bytes + sizes.head_bytes + sum(sizes.layer_bytes)
    assert 150 * GB < total < 154 * GB and len(sizes.layer_bytes) == 80
    assert 11 * GB < sizes.vision_bytes < 12 * GB


@pytest.mark.parametrize("family,gpus,gpu_gb,fits,needed", [
    ("InternVL2-Llama3-76B", 1, 80, False, 2),
    # the model cards' half-GPU-0 rule asks for three 80GB GPUs; balanced by bytes, two hold it
    ("InternVL2-Llama3-76B", 2, 80, True, None),
    ("InternVL2-Llama3-76B", 3, 80, True, None),
    ("InternVL2-Llama3-76B", 8, 80, True, None),
    ("InternVL2-Llama3-76B", 2, 40, False, 4),
    ("InternVL2-Llama3-76B", 3, 40, False, 4),
    ("InternVL2-Llama3-76B", 4, 40, True, None),
    ("InternVL2-Llama3-76B", 8, 40, True, None),
    ("InternVL2-40B", 1, 80, False, 2),
    ("InternVL2-40B", 2, 80, True, None),
    ("InternVL2-40B", 3, 40, True, None),
    ("InternVL2-40B", 2, 40, False, 3),
    ("InternVL2-40B", 8, 40, True, None),
    ("InternVL-Chat-V1-2", 4, 40, True, None),
])
def test_plans(family, gpus, gpu_gb, fits, needed):
    sizes = real_sizes(family)
    gpu_bytes = gpu_gb * GIB
    plan = plan_devices(sizes, gpus, gpu_bytes)
    assert plan.fits is fits
    assert plan.gpus_needed == needed
    assert len(plan.gpus) == gpus
    check_invariants(plan, sizes, gpu_bytes)


@pytest.mark.parametrize("family,gpus", [("InternVL2-Llama3-76B", 3), ("InternVL2-Llama3-76B", 4), ("InternVL2-Llama3-76B", 8),
                                         ("InternVL2-40B", 2), ("InternVL2-40B", 4)])
def test_at_least_as_balanced_as_model_card_rule(family, gpus):
    sizes = real_sizes(family)
    plan = plan_devices(sizes, gpus, 80 * GIB)
    owner = model_card_split(len(sizes.layer_bytes), gpus)
    card_loads = [0] * gpus
    for layer, gpu in owner.items():
        card_loads[gpu] += sizes.layer_bytes[layer]
    card_loads[0] += sizes.vision_bytes + sizes.projector_bytes + sizes.embed_bytes + sizes.norm_bytes + sizes.head_bytes
    ours = [g.weight_bytes for g in plan.gpus]
    assert max(ours) <= max(card_loads)
    # balanced by bytes: GPUs 1..N-1 differ by at most two decoder layers
    layer = max(sizes.layer_bytes)
    assert max(ours[1:]) - min(ours[1:]) <= 2 * layer


def test_quantized_sizes_change_the_answer():
    """bf16 76B needs four 40GB GPUs; its int8 LLM fits three, int4 two; int8 needs two 80GB GPUs."""
    bf16, int8, int4 = (real_sizes("InternVL2-Llama3-76B", m) for m in (None, "int8", "int4"))
    assert not plan_devices(bf16, 3, 40 * GIB).fits
    assert plan_devices(int8, 3, 40 * GIB).fits and not plan_devices(int8, 2, 40 * GIB).fits
    assert plan_devices(int4, 2, 40 * GIB).fits
    assert not plan_devices(int8, 1, 80 * GIB).fits and plan_devices(int8, 2, 80 * GIB).fits
    assert sum(int8.layer_bytes) < 0.51 * sum(bf16.layer_bytes)
    assert sum(int4.layer_bytes) < 0.27 * sum(bf16.layer_bytes)


def test_int4_76b_fits_one_80gb_gpu_with_short_context():
    sizes = real_sizes("InternVL2-Llama3-76B", "int4")
    total = sizes.vision_bytes + sizes.projector_bytes + sizes.embed_bytes + sizes.head_bytes + sum(sizes.layer_bytes)
    assert 45 * GB < total < 55 * GB
    assert plan_devices(sizes, 1, 80 * GIB, context_tokens=4096).fits


def test_kv_cache_and_reserve_count():
    sizes = real_sizes("InternVL2-Llama3-76B")
    short = plan_devices(sizes, 3, 80 * GIB, context_tokens=1024)
    long = plan_devices(sizes, 3, 80 * GIB, context_tokens=65536, batch=4)
    assert long.gpus[1].kv_bytes > short.gpus[1].kv_bytes
    per_layer = 2 * 8 * 128 * 2  # K and V, 8 kv heads x 128 dims, bf16
    assert short.gpus[1].kv_bytes == per_layer * 1024 * len(short.gpus[1].layers)
    assert not long.fits
    assert not plan_devices(sizes, 3, 80 * GIB, reserve_bytes=40 * GIB).fits


def test_fixed_share_too_large_for_any_count():
    sizes = real_sizes("InternVL2-Llama3-76B")
    plan = plan_devices(sizes, 2, 16 * GIB)
    assert not plan.fits and plan.gpus_needed is None  # GPU 0 alone must hold InternViT-6B and more


def test_one_gpu_everything_on_gpu_0():
    sizes = real_sizes("InternVL2-1B")
    plan = plan_devices(sizes, 1, 24 * GIB)
    assert plan.fits and plan.gpus[0].layers == tuple(range(24))
