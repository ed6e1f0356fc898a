"""The calibrated pipeline apart from GPTQ: what a Quantizer sees (groups from the dialect
records, inputs, reruns, fused weights), AWQ-style folding through `prepare_layer`, and
GPTQ's robustness when a Hessian cannot be inverted (dampening ladder, round-to-nearest)."""

from __future__ import annotations

import json

import pytest
import torch

from internvl_tools.calibrate import gptq as gptq_math
from internvl_tools.calibrate.gptq import (GPTQConfig, HessianNotPositiveDefinite, PreparedHessian, gptq_quantize, prepare_hessian,
                                          rtn_quantize)
from internvl_tools.calibrate.gptq_quantizer import GPTQQuantizer
from internvl_tools.calibrate.pipeline import CalibrationJob, quantize_calibrated
from internvl_tools.calibrate.quantizer import ModuleUpdate, Quantizer
from internvl_tools.formats.gptq import pack
from internvl_tools.models.dialects import get_dialect
from internvl_tools.models.layout import llm_dialect

from .support import all_tensors, decoder_layer_of

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


# -- the dampening ladder ---------------------------------------------------------------------
def _upper_inverse_ok(prepared, h, damp):
    dampened = h + damp * h.diagonal().mean() * torch.eye(h.shape[0])
    torch.testing.assert_close(prepared.hinv.T @ prepared.hinv, torch.linalg.inv(dampened), rtol=1e-4, atol=1e-5)


def test_indefinite_hessian_gets_more_dampening():
    h = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # eigenvalues -0.05 and 2.05: damp 0.01 fails, 0.1 works
    prepared = prepare_hessian(h.clone(), GPTQConfig(group_size=-1, damp=0.01))
    assert prepared.damp == pytest.approx(0.1)
    _upper_inverse_ok(prepared, h, prepared.damp)


def test_non_finite_inverse_factor_rebuilds_the_hessian(monkeypatch):
    """When H's factor exists but its triangular inverse overflows, H is rebuilt from V V^T and retried with more damping."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    h = 2 * x.T @ x / 64
    real = torch.linalg.solve_triangular
    failures = []

    def overflowing(matrix, rhs, *, upper, left=True, unitriangular=False, out=None):
        result = real(matrix, rhs, upper=upper, left=left, unitriangular=unitriangular)
        if not failures:
            failures.append(1)
            result[0, 0] = float("inf")
        return result

    monkeypatch.setattr(gptq_math.torch.linalg, "solve_triangular", overflowing)
    prepared = prepare_hessian(h.clone(), GPTQConfig(group_size=-1, damp=0.01))
    assert failures and prepared.damp == pytest.approx(0.1)
    _upper_inverse_ok(prepared, h, prepared.damp)


@pytest.mark.parametrize("cols", [8, 300, 2500])
def test_inverse_factor_matches_the_reference_chain(cols):
    """hinv (one Cholesky of the reversed H + a blocked triangular inverse) is the reference implementation's
    chol(cholesky_inverse(chol(H)), upper) to float32 rounding, in GAR order, and GPTQ's codes are the same."""
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(cols + 64, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.2 + torch.eye(cols))
    h = 2 * x.T @ x / x.shape[0]
    config = GPTQConfig(group_size=min(128, cols), damp=0.01)
    prepared = prepare_hessian(h.clone(), config)
    ordered = h[prepared.perm][:, prepared.perm]
    ordered.diagonal().add_(0.01 * ordered.diagonal().mean())
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ordered)), upper=True)
    torch.testing.assert_close(prepared.hinv, reference, rtol=1e-4, atol=2e-5 * float(reference.abs().max()))
    assert torch.equal(prepared.hinv.tril(-1), torch.zeros_like(prepared.hinv))
    w = torch.randn(48, cols, generator=g) * 0.05
    ours = gptq_quantize(w, prepared, config)
    theirs = gptq_quantize(w, PreparedHessian(prepared.perm, reference, prepared.dead, 0.01), config)
    assert (ours.q != theirs.q).float().mean() < 1e-3  # a rounding tie may flip (and move its row's later columns), nothing more
    assert ours.loss == pytest.approx(theirs.loss, rel=1e-3)  # the same GPTQ objective


def _reference_sweep(w, prepared, config):
    """Frantar et al.'s Algorithm 1 as the reference implementation writes it (column by column on [rows, block])."""
    from internvl_tools.calibrate.gptq import group_params, quantize_column

    hinv, perm = prepared.hinv, prepared.perm
    w = w.clone().float()
    w[:, prepared.dead] = 0
    w = w[:, perm]
    rows, cols = w.shape
    group = config.group_size if config.group_size > 0 else cols
    q = torch.zeros(rows, cols, dtype=torch.int32)
    for start in range(0, cols, config.block_size):
        stop = min(start + config.block_size, cols)
        w1, err1, hinv1 = w[:, start:stop].clone(), torch.zeros(rows, stop - start), hinv[start:stop, start:stop]
        for i in range(stop - start):
            if (start + i) % group == 0:
                scale, zero = group_params(w[:, start + i : start + i + group], config.bits, config.sym, config.scale_dtype)
            x = w1[:, i]
            codes = quantize_column(x, scale, zero, config.bits)
            q[:, start + i] = codes.to(torch.int32)
            e = (x - scale * (codes - zero)) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, start:stop] = w1
        w[:, stop:] -= err1 @ hinv[start:stop, stop:]
    return q[:, torch.argsort(perm)]


@pytest.mark.parametrize("cfg", [GPTQConfig(4, 64, True, False), GPTQConfig(4, 64, False, True), GPTQConfig(8, -1, True, False),
                                 GPTQConfig(4, 128, False, False, act_group_aware=False)])
def test_transposed_sweep_is_the_reference_sweep_bit_for_bit(cfg):
    """gptq_quantize sweeps each block transposed (contiguous columns): the codes are the column-by-column loop's exactly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(900, 320, generator=g) @ (torch.randn(320, 320, generator=g) * 0.2)
    prepared = prepare_hessian(2 * x.T @ x / 900, cfg)
    w = torch.randn(200, 320, generator=g) * 0.05
    assert torch.equal(gptq_quantize(w, prepared, cfg).q, _reference_sweep(w, prepared, cfg))


@pytest.mark.parametrize("cfg", [GPTQConfig(4, 64, True, False), GPTQConfig(4, 64, False, True), GPTQConfig(8, 128, False, False)])
def test_stacked_linears_get_their_own_codes(cfg):
    """The quantizer sweeps linears sharing a Hessian (q/k/v, gate/up) as one stacked matrix: each keeps its own codes, scales and loss."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(900, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.2)
    prepared = prepare_hessian(2 * x.T @ x / 900, cfg)
    weights = [torch.randn(rows, 256, generator=g) * 0.05 for rows in (256, 64, 64)]
    whole = gptq_quantize(torch.cat(weights), prepared, cfg)
    start = 0
    for weight in weights:
        alone = gptq_quantize(weight, prepared, cfg)
        stop = start + weight.shape[0]
        assert torch.equal(whole.q[start:stop], alone.q) and torch.equal(whole.scales[:, start:stop], alone.scales)
        assert torch.equal(whole.zeros[:, start:stop], alone.zeros)
        assert float(whole.row_loss[start:stop].sum()) == pytest.approx(alone.loss, rel=1e-5)
        start = stop


def test_non_finite_hessian_is_refused_after_the_ladder():
    h = torch.full((4, 4), float("nan"))
    with pytest.raises(HessianNotPositiveDefinite, match="damp 1"):
        prepare_hessian(h, GPTQConfig(group_size=-1))


# -- GPTQ in the pipeline: a linear whose Hessian cannot be inverted --------------------------
class PoisonedGPTQ(GPTQQuantizer):
    """GPTQ whose layer-1 down_proj sees non-finite inputs (what a float16 overflow upstream makes)."""

    layer = -1

    def prepare_layer(self, work):
        self.layer = work.index
        return super().prepare_layer(work)

    def observe(self, group, inputs):
        if self.layer == 1 and group.linears == ("mlp.down_proj",):
            inputs = torch.full_like(inputs, float("nan"))
        super().observe(group, inputs)


def test_failing_cholesky_falls_back_to_round_to_nearest(tiny, tmp_path, run_cli, monkeypatch):
    import internvl_tools.calibrate.gptq_quantizer as module

    family = "InternVL2-Llama3-76B"
    monkeypatch.setattr(module, "GPTQQuantizer", PoisonedGPTQ)
    result = run_cli("quantize", tiny(family), "-o", tmp_path / "q", "--method", "gptq", "--group-size", "32",
                     "--num-samples", "4", "--seq-len", "64")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:") and "--seq-len" not in line]
    assert len(warnings) == 1 and "layer 1 mlp.down_proj" in warnings[0] and "round-to-nearest" in warnings[0], result.output
    src, dst = all_tensors(tiny(family)), all_tensors(tmp_path / "q")
    config = GPTQConfig(4, 32)
    for layer, expect_rtn in ((1, True), (0, False)):
        stem = f"language_model.model.layers.{layer}.mlp.down_proj"
        rtn = pack(rtn_quantize(src[stem + ".weight"], config), config.bits)
        same = all(torch.equal(dst[f"{stem}.{part}"], tensor) for part, tensor in rtn.items())
        assert same == expect_rtn, stem


def test_summary_names_the_round_to_nearest_linears(tiny, tmp_path):
    quantizer, lines = PoisonedGPTQ(GPTQConfig(4, 32)), []
    quantize_calibrated(tiny("InternVL2-1B"), tmp_path / "q", quantizer, CalibrationJob(num_samples=2, seq_len=48),
                        max_shard_size=10**9, log=lines.append)
    summary = quantizer.summary()
    assert summary["round_to_nearest"] == ["layer 1 mlp.down_proj"] and summary["damp_raised"] == {}
    layers = json.loads((tiny("InternVL2-1B") / "config.json").read_text())["llm_config"]["num_hidden_layers"]
    assert summary["linears"] == len(get_dialect("qwen2").linears) * layers
    assert sum(line.startswith("warning:") and "--seq-len" not in line for line in lines) == 1


# -- the Quantizer interface, as AWQ will use it ----------------------------------------------
class FoldingQuantizer(Quantizer):
    """Quantizes nothing; checks what the pipeline hands over, and folds a per-channel scale s
    into each group fed by a norm as AWQ does (norm x s, the group's input columns / s), which
    leaves the model's function unchanged."""

    name = "fold"

    def __init__(self, dialect):
        self.dialect = dialect
        self.folded = {g.after for g in dialect.groups if g.after in dialect.norms}
        self.calls, self.observed, self.dtypes = [], [], {}

    def options(self):
        return {"fold": sorted(self.folded)}

    def output_specs(self, spec, info):
        group = next((g for g in self.dialect.groups if g.after in self.folded and info.module in (g.after, *g.linears)), None)
        if group is None or info.param != "weight":
            return None
        self.dtypes[spec.name] = DTYPES[spec.dtype]
        return [spec]

    def quantization_config(self, layout):
        return None  # the output holds plain (rescaled) weights

    def _scale(self, columns):
        return torch.linspace(0.5, 2.0, columns)

    def prepare_layer(self, work):
        self.calls.append(("prepare", work.index))
        self.layer = work
        for group in self.dialect.groups:
            if group.after not in self.folded:
                continue
            norm = work.weight(group.after)
            s = self._scale(norm.shape[0])
            yield group.after, ModuleUpdate({"weight": self._stored(work, group.after, norm * s)}, norm * s)
            for name in group.linears:
                yield name, ModuleUpdate({}, work.weight(name) / s)

    def _stored(self, work, module, tensor):
        key = next(k for k in self.dtypes if k.startswith(f"language_model.model.layers.{work.index}.{module}."))
        return tensor.to(self.dtypes[key])

    def observe(self, group, inputs):
        self.observed.append(inputs)

    def quantize_group(self, work):
        self.calls.append(("group", work.group.linears))
        observed, self.observed = self.observed, []
        assert all(torch.equal(a, b) for a, b in zip(work.inputs(), observed, strict=True))
        assert len(list(work.layer.outputs())) == len(observed)
        for name in work.group.linears:
            weight = work.layer.weight(name)
            assert all(x.dim() == 3 and x.shape[0] == 1 and x.shape[-1] == weight.shape[1] for x in observed), name
            if work.group.after in self.folded:
                yield name, ModuleUpdate({"weight": self._stored(work.layer, name, weight)}, None)


@pytest.mark.parametrize("family", ["InternVL2-2B", "InternVL2-4B"])  # fused InternLM2 wqkv; Phi-3 qkv_proj / gate_up_proj
def test_quantizer_interface_and_awq_style_folding(family, tiny, tmp_path):
    from internvl_tools.runtime.model import InternVLRuntime

    config = json.loads((tiny(family) / "config.json").read_text())
    dialect = get_dialect(llm_dialect(config))
    quantizer = FoldingQuantizer(dialect)
    out = quantize_calibrated(tiny(family), tmp_path / "f", quantizer, CalibrationJob(num_samples=3, seq_len=64), max_shard_size=10**9)
    layers = config["llm_config"]["num_hidden_layers"]
    expected = [call for index in range(layers) for call in [("prepare", index)] + [("group", g.linears) for g in dialect.groups]]
    assert quantizer.calls == expected
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    src, dst = all_tensors(tiny(family)), all_tensors(out)
    assert src.keys() == dst.keys()
    norm = f"language_model.model.layers.0.{sorted(quantizer.folded)[0]}.weight"
    s = quantizer._scale(src[norm].shape[0])
    torch.testing.assert_close(dst[norm].float(), (src[norm].float() * s).to(src[norm].dtype).float())
    ids = torch.tensor([list(range(1, 30))])
    want, got = InternVLRuntime(tiny(family)).logits(ids), InternVLRuntime(out).logits(ids)
    assert (got - want).norm() / want.norm() < 0.02  # the fold is exact up to bf16 rounding


# -- the calibration forwards: SDPA, and their dtype ----------------------------------------------
@pytest.mark.parametrize("family", ["InternVL2-1B", "InternVL2-4B", "InternVL3.5-30B-A3B"])  # qwen2, phi3, qwen3_moe
def test_sdpa_and_bf16_forwards_match_the_eager_float32_layer(family, tiny, tmp_path):
    """The pipeline's layer (SDPA, causal without a mask) gives the eager float32 layer's outputs and
    group inputs; in bf16 they stay within bf16 rounding, and weight() still hands out float32."""
    folder = tiny(family)
    hidden = json.loads((folder / "config.json").read_text())["llm_config"]["hidden_size"]
    g = torch.Generator().manual_seed(5)
    samples = [torch.randn(1, t, hidden, generator=g) for t in (9, 17)]
    eager, sdpa, bf16 = (decoder_layer_of(folder, 1, samples, tmp_path / name, dtype, attention, experts=True)[0]
                         for name, dtype, attention in (("eager", torch.float32, "eager"), ("sdpa", torch.float32, "sdpa"),
                                                        ("bf16", torch.bfloat16, "sdpa")))
    dialect = get_dialect(llm_dialect(json.loads((folder / "config.json").read_text())))
    o_group = dialect.groups[1].hook  # the attention output projection's input: after attention
    for want, got, low in zip(eager.outputs(), sdpa.outputs(), bf16.outputs(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert low.dtype == torch.bfloat16 and (low.float() - want).norm() / want.norm() < 2e-2
    for want, got, low in zip(eager.inputs(o_group), sdpa.inputs(o_group), bf16.inputs(o_group), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # a non-causal SDPA would differ at every row but the last
        assert (low.float() - want).norm() / want.norm() < 2e-2
    name = dialect.groups[0].linears[0]
    assert bf16.weight(name).dtype == torch.float32 and torch.equal(bf16.weight(name), sdpa.weight(name))
    bf16.set_weight(name, sdpa.weight(name) * 2)
    assert torch.equal(bf16.weight(name), sdpa.weight(name) * 2) and next(bf16.module.parameters()).dtype == torch.bfloat16


def test_forward_dtype_option_is_recorded(tiny, tmp_path, run_cli, monkeypatch):
    from internvl_tools.calibrate import pipeline

    assert pipeline.forward_dtype("fp32", "cpu") == torch.float32 and pipeline.forward_dtype("bf16", "cpu") == torch.bfloat16
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: False)  # a CPU without AVX512-BF16 / AMX
    assert pipeline.forward_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: True)
    assert pipeline.forward_dtype("auto", "cpu") == torch.bfloat16
    for option, recorded in (("auto", "bf16"), ("fp32", "fp32")):
        out = tmp_path / option
        result = run_cli("quantize", tiny("InternVL2-1B"), "-o", out, "--method", "gptq", "--group-size", "32",
                         "--num-samples", "2", "--seq-len", "48", "--forward-dtype", option)
        assert result.exit_code == 0, result.output
        record = json.loads((out / "config.json").read_text())["quantization_calibration"]
        assert record["forward_dtype"] == recorded and f"{recorded} forwards" in result.output
    hf = tmp_path / "hf"
    assert run_cli("convert", out, "-o", hf, "--to", "hf").exit_code == 0
    for folder in (out, hf):  # inspect shows the record in both layouts
        assert json.loads(run_cli("inspect", folder, "--json").output)["calibration"] == record
        text = " ".join(run_cli("inspect", folder).output.split())
        assert "calibrated on" in text and "fp32 forwards" in text
    result = run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "i8", "--method", "int8", "--forward-dtype", "bf16")
    assert result.exit_code == 2 and "--forward-dtype" in result.output


def test_resume_where_auto_means_another_dtype_is_refused(tiny, tmp_path, monkeypatch):
    """The resume state keeps the dtype --forward-dtype auto resolved to: a partial begun where auto
    meant bf16 is not continued in fp32 (the output would mix both and its record would say bf16),
    and an explicit --forward-dtype bf16 continues a run begun with auto = bf16."""
    from internvl_tools.calibrate import pipeline
    from internvl_tools.calibrate.gptq_quantizer import GPTQJob, quantize_gptq
    from internvl_tools.errors import InputError

    class Stop(Exception):
        pass

    def stop(done):
        raise Stop

    monkeypatch.setattr(pipeline, "native_bf16", lambda device: True)
    out = tmp_path / "q"
    with pytest.raises(Stop):
        quantize_gptq(tiny("InternVL2-1B"), out, GPTQJob(GPTQConfig(4, 32), num_samples=2, seq_len=32), max_shard_size=10**9,
                      progress=stop)
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: False)  # the same partial on a CPU without AVX512-BF16
    with pytest.raises(InputError, match=r"--forward-dtype bf16 \(now fp32\)"):
        quantize_gptq(tiny("InternVL2-1B"), out, GPTQJob(GPTQConfig(4, 32), num_samples=2, seq_len=32), max_shard_size=10**9,
                      resume=True)
    quantize_gptq(tiny("InternVL2-1B"), out, GPTQJob(GPTQConfig(4, 32), num_samples=2, seq_len=32, forward_dtype="bf16"),
                  max_shard_size=10**9, resume=True)
    assert json.loads((out / "config.json").read_text())["quantization_calibration"]["forward_dtype"] == "bf16"
