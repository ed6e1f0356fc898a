"""GPTQ on a sparse LLM (InternVL3.5-30B-A3B's Qwen3-MoE): every expert gets the Hessian of the calibration tokens
the router sends to it (checked against the independent reference's routing), experts that too few tokens reach
fall back to round-to-nearest as in GPTQModel, the router stays as it is, and the output runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from internvl_tools.calibrate.experts import expert_chunks, quantize_experts
from internvl_tools.calibrate.gptq import GPTQConfig, rtn_quantize
from internvl_tools.calibrate.gptq_quantizer import GPTQJob, GPTQQuantizer, quantize_gptq
from internvl_tools.calibrate.quantizer import GroupWork, Quantizer
from internvl_tools.formats.gptq import pack
from internvl_tools.runtime.model import InternVLRuntime

from . import reference_internvl as ref
from .support import all_tensors, decoder_layer_of, sample_image, transformers_and_runtime_logits

MOE = "InternVL3.5-30B-A3B"
TINY_GPTQ = ["--method", "gptq", "--group-size", "32", "--num-samples", "4", "--seq-len", "64"]


class Recorder(Quantizer):
    """Records what each group observes and the token counts it is quantized with; changes nothing."""

    name = "recorder"
    supports_experts = True

    def __init__(self):
        self.seen: dict[tuple[str, ...], list[torch.Tensor]] = {}
        self.counts: dict[tuple[str, ...], tuple[int, int]] = {}

    def options(self):
        return {}

    def output_specs(self, spec, info):
        return None

    def quantization_config(self, layout):
        return None

    def observe(self, group, inputs):
        self.seen.setdefault(group.linears, []).append(inputs[0].clone())

    def quantize_group(self, work: GroupWork):
        self.counts[work.group.linears] = (work.tokens, work.calibration_tokens)
        return ()


def _observe_layer(folder, index, samples, budget):
    layer, record = decoder_layer_of(folder, index, samples, folder / "unused", experts=True)
    config = json.loads((folder / "config.json").read_text())
    recorder = Recorder()
    tokens = quantize_experts(layer, layer.work(record, lambda _m: None), recorder, lambda updates: list(updates),
                              config["llm_config"], budget)
    return recorder, tokens


@pytest.mark.parametrize("budget", [2**30, 4 * 4 * 64 * 64])  # all experts in one pass; one expert per pass
def test_each_expert_sees_exactly_the_tokens_routed_to_it(tiny, budget):
    folder = tiny(MOE)
    generator = torch.Generator().manual_seed(3)
    samples = [torch.randn(1, t, 64, generator=generator) for t in (7, 12, 5)]
    recorder, tokens = _observe_layer(folder, 1, samples, budget)
    config, sd = ref.load_state(folder)
    cfg, p = config["llm_config"], "language_model.model.layers.1."
    expected: dict[int, list[torch.Tensor]] = {e: [] for e in range(4)}
    for sample in samples:
        h, _ = ref.decoder_layer(config, sd, 1, sample[0])
        _, chosen = ref.route(sd, p, cfg, h)
        for e in range(4):
            rows = (chosen == e).any(dim=-1)
            if rows.any():
                expected[e].append(h[rows])
    for e in range(4):
        stem = f"mlp.experts.{e}."
        first, second = (stem + "gate_proj", stem + "up_proj"), (stem + "down_proj",)
        x = torch.cat(expected[e])
        assert tokens[e] == x.shape[0] and recorder.counts[first] == recorder.counts[second] == (x.shape[0], 24)
        torch.testing.assert_close(torch.cat(recorder.seen[first]), x, rtol=1e-4, atol=1e-5)
        gate, up = sd[p + stem + "gate_proj.weight"], sd[p + stem + "up_proj.weight"]
        torch.testing.assert_close(torch.cat(recorder.seen[second]), F.silu(x @ gate.T) * (x @ up.T), rtol=1e-4, atol=1e-5)
    assert sum(tokens.values()) == 24 * 2  # top-2: every token reaches two experts


def test_expert_chunks_fit_the_budget():
    assert expert_chunks(128, 2048, 2 * 2**30) == [range(0, 32), range(32, 64), range(64, 96), range(96, 128)]  # 16 MiB each
    assert expert_chunks(128, 768, 2 * 2**30) == [range(0, 128)]
    assert expert_chunks(4, 64, 1) == [range(e, e + 1) for e in range(4)]


def test_gptq_quantizes_every_expert_and_keeps_the_router(tiny, tmp_path, run_cli):
    out = tmp_path / "q"
    result = run_cli("quantize", tiny(MOE), "-o", out, *TINY_GPTQ, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["experts"]["gptq"] + summary["experts"]["round_to_nearest"] == 3 * 4
    assert summary["experts"]["min_tokens_share"] == 0.005
    # transformers (optimum + gptqmodel) converts nn.Linear only: the summary and a warning say where gptq-format experts load
    assert "nn.Linear" in summary["experts"]["note"] and "--format compressed-tensors" in summary["experts"]["note"]
    assert result.stderr.startswith("warning: ")
    tensors, base = all_tensors(out), all_tensors(tiny(MOE))
    stem = "language_model.model.layers.2.mlp.experts.3.down_proj"
    assert {f"{stem}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")} <= set(tensors) and f"{stem}.weight" not in tensors
    for n in range(3):
        router = f"language_model.model.layers.{n}.mlp.gate.weight"
        assert torch.equal(tensors[router], base[router])
    runtime, reference = InternVLRuntime(out), InternVLRuntime(tiny(MOE))
    pixels = runtime.pixel_values(sample_image(5))
    ids = runtime.prompt_ids("Describe the image.", pixels.shape[0])
    got, want = runtime.logits(ids, pixels), reference.logits(ids, pixels)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9  # 4-bit noise on a tiny random model


def test_experts_that_too_few_tokens_reach_use_round_to_nearest(tiny, tmp_path):
    """GPTQModel's fallback: below a share of the calibration tokens, an expert is quantized with RTN."""
    config = GPTQConfig(bits=4, group_size=32)
    quantizer = GPTQQuantizer(config, expert_min_tokens=1.0)  # no expert receives every token: all fall back
    job = GPTQJob(config, num_samples=3, seq_len=48)
    quantize_gptq(tiny(MOE), tmp_path / "q", job, max_shard_size=10**9, quantizer=quantizer)
    facts = quantizer.summary()["experts"]
    assert (facts["gptq"], facts["round_to_nearest"]) == (0, 12) and facts["fewest_tokens"] >= 0
    assert "layer 0 mlp.experts.1" in facts["round_to_nearest_experts"]
    tensors = all_tensors(tmp_path / "q")
    key = "language_model.model.layers.1.mlp.experts.2.gate_proj"
    weight = all_tensors(tiny(MOE))[key + ".weight"].float()
    for name, tensor in pack(rtn_quantize(weight, config), 4).items():
        assert torch.equal(tensors[f"{key}.{name}"], tensor), name
    assert quantizer.options()["expert_min_tokens"] == 1.0


def test_native_layout_gptq(tiny, tmp_path, run_cli):
    assert run_cli("convert", tiny(MOE), "-o", tmp_path / "hf").exit_code == 0
    result = run_cli("quantize", tmp_path / "hf", "-o", tmp_path / "q", *TINY_GPTQ)
    assert result.exit_code == 0, result.output
    tensors = all_tensors(tmp_path / "q")
    assert "model.language_model.layers.0.mlp.experts.1.up_proj.qweight" in tensors
    assert tensors["model.language_model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    # vLLM and GPTQModel read `dynamic`: the router is named as kept (vLLM would build it as a GPTQ linear), in both layouts
    rule = r"-:.*\.mlp\.gate$"
    assert rule in json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert run_cli("convert", tmp_path / "q", "-o", tmp_path / "back", "--to", "original").exit_code == 0
    assert rule in json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]["dynamic"]
    ids = torch.tensor([[3, 5, 8, 13]])
    got, want = InternVLRuntime(tmp_path / "q").logits(ids), InternVLRuntime(tmp_path / "hf").logits(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9  # 4-bit noise on a tiny random model


@pytest.mark.requires("compressed_tensors")
def test_transformers_loads_compressed_tensors_experts(tiny, tmp_path, run_cli):
    """GPTQ --format compressed-tensors (W4A16, pack-quantized) of the native layout: transformers' compressed-tensors
    loader dequantizes every expert into its fused parameters (no missing or unexpected keys) and computes our
    runtime's logits on the same quantized weights. (The gptq format's experts it cannot fill: README.)"""
    assert run_cli("convert", tiny(MOE), "-o", tmp_path / "hf").exit_code == 0
    out = tmp_path / "w4a16"
    result = run_cli("quantize", tmp_path / "hf", "-o", out, *TINY_GPTQ, "--format", "compressed-tensors")
    assert result.exit_code == 0, result.output
    assert "model.language_model.layers.1.mlp.experts.2.down_proj.weight_packed" in all_tensors(out)
    assert r"re:.*\.mlp\.gate$" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    theirs, ours = transformers_and_runtime_logits(out)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-3)  # its dequantized weights pass through bf16, ours stay fp32
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
