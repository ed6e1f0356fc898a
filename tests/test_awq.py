"""AWQ: the gemm tensors against an independent dequantizer, the folds keep the float model's
function, AWQ against round-to-nearest on outlier channels, every dialect, resume, refusals,
chat / verify on the output, the native gemm output loaded by transformers + gptqmodel's AWQ
kernels (in .venv-gptq), and compressed-tensors W4A16 (GPTQ and AWQ) loaded by transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from internvl_tools.calibrate import awq_quantizer
from internvl_tools.calibrate.awq import AWQConfig, InputStats, apply_clip, fake_quantize, normalized_scales, output_error, quantize, \
    search_clip, search_scales
from internvl_tools.calibrate.awq_quantizer import AWQJob, AWQQuantizer, llm_facts, quantize_awq

from .support import GPTQ_PYTHON, all_tensors, awq_independent_dequantize as independent_dequantize, \
    decoder_layer_of as _decoder_layer, sample_image

TINY_AWQ = ["--method", "awq", "--group-size", "32", "--num-samples", "4", "--seq-len", "64"]
# groups with no exact fold per dialect: none (InternLM2 wo and Phi-3 o_proj / down_proj fold into the v rows /
# up half of their fused wqkv, qkv_proj, gate_up_proj: InputGroup.after_rows in models/dialects.py)
UNSCALED = {"InternVL2-Llama3-76B": set(), "InternVL2-1B": set(), "InternVL2-2B": set(), "InternVL2-4B": set(),
            "InternVL3.5-1B": set(), "InternVL3-9B-InternLM3": set()}


@pytest.fixture(scope="module")
def awq_tiny(tiny, tmp_path_factory):
    cache = {}

    def get(family, *extra):
        key = (family, extra)
        if key not in cache:
            from click.testing import CliRunner

            from internvl_tools.cli.main import cli

            out = tmp_path_factory.mktemp("awq") / family
            result = CliRunner().invoke(cli, ["quantize", str(tiny(family)), "-o", str(out), *TINY_AWQ, *extra, "--json"])
            assert result.exit_code == 0, result.output
            cache[key] = (out, json.loads(result.stdout))
        return cache[key]

    return get


# -- the math ---------------------------------------------------------------------------------
def _outlier_problem(seed=0, rows=128, cols=256, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x[:, :4] *= 40  # a few channels with large activations, as LLMs have
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


def test_awq_beats_round_to_nearest_on_outlier_channels():
    w, x = _outlier_problem()
    config = AWQConfig(group_size=64)
    stats = InputStats(w.shape[1])
    for part in x.split(500):
        stats.add(part)
    torch.testing.assert_close(stats.h, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    found = search_scales([w], stats.h, stats.mean_abs(), config)
    assert found.alpha > 0 and found.loss < 0.5 * found.rtn_loss
    scaled = w * found.scales
    clipped = apply_clip(scaled, search_clip(scaled, stats.h / found.scales[:, None] / found.scales[None, :], config), 64)
    awq = quantize(clipped, config).dequantize() / found.scales
    rtn = fake_quantize(w, config)
    err = lambda approx: float(((x @ (w - approx).T) ** 2).mean())
    assert err(awq) < 0.5 * err(rtn), (err(awq), err(rtn))
    # the error the search measures through H is the output MSE itself
    assert found.rtn_loss == pytest.approx(err(rtn) * w.shape[0], rel=1e-3)


def test_row_form_statistics_equal_the_second_moment_form():
    """Fewer tokens than input columns: InputStats keeps the rows; the output errors, the clipping
    blocks and the search's choice equal those computed through H = X^T X / n; past `in` tokens it
    switches to H for good (still equal)."""
    w, x = _outlier_problem(tokens=200)
    config = AWQConfig(group_size=64)
    stats = InputStats(w.shape[1])
    for part in x.split(64):
        stats.add(part)
    assert stats._h is None  # 200 tokens < 256 columns: the row form
    h = x.T @ x / x.shape[0]
    torch.testing.assert_close(stats.h, h, rtol=1e-4, atol=1e-3)
    diff = w - fake_quantize(w, config)
    assert output_error(diff, stats) == pytest.approx(output_error(diff, h), rel=1e-4)
    assert output_error(diff, stats) == pytest.approx(float(((x @ diff.T) ** 2).sum() / x.shape[0]), rel=1e-4)
    torch.testing.assert_close(stats.diagonal_blocks(64), torch.stack([h[i:i + 64, i:i + 64] for i in range(0, 256, 64)]),
                               rtol=1e-4, atol=1e-3)
    by_rows, by_h = search_scales([w], stats, stats.mean_abs(), config), search_scales([w], h, stats.mean_abs(), config)
    assert by_rows.alpha == by_h.alpha and by_rows.loss == pytest.approx(by_h.loss, rel=1e-4)
    torch.testing.assert_close(search_clip(w, stats, config), search_clip(w, h, config))
    more = torch.randn(100, w.shape[1])
    stats.add(more)  # 300 tokens > 256 columns: H from now on
    assert stats._h is not None and stats.tokens == 300
    all_x = torch.cat([x, more])
    torch.testing.assert_close(stats.h, all_x.T @ all_x / 300, rtol=1e-4, atol=1e-3)


def test_rtn_semantics_are_autoawq_s():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.25] * 8])
    codes = quantize(w, AWQConfig(group_size=32))
    scale = torch.tensor((2.0 + 1.0) / 15).half().float()
    assert codes.scales.item() == scale and codes.zeros.item() == round(1.0 / scale.item())
    assert torch.equal(codes.dequantize(), (codes.q - codes.zeros).float() * scale)
    sym = quantize(w, AWQConfig(group_size=32, zero_point=False))
    assert sym.zeros.item() == 8 and sym.scales.item() == torch.tensor(2.0 / 7).half().float().item()
    assert sym.signed().min() >= -8 and sym.signed().max() <= 7


# -- the format -------------------------------------------------------------------------------
def test_independent_dequantizer_equals_the_runtime(tiny, awq_tiny):
    from internvl_tools.formats.dequantized import DequantizedView
    from internvl_tools.models.views import open_view

    family = "InternVL2-Llama3-76B"
    out, _summary = awq_tiny(family)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert "quantization_config" not in config["llm_config"]  # top level, where vLLM looks (vllm#11122)
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["vision_model", "mlp1", "language_model.lm_head"]}
    src, dst = all_tensors(tiny(family)), all_tensors(out)
    linears = [k for k, t in src.items() if k.startswith("language_model.model.layers.") and t.dim() == 2]
    with DequantizedView(open_view(out)) as runtime:
        for key in linears:
            stem = key.removesuffix(".weight")
            assert key not in dst and dst[stem + ".scales"].dtype == torch.float16
            mine = independent_dequantize(dst[stem + ".qweight"], dst[stem + ".qzeros"], dst[stem + ".scales"])
            assert torch.equal(runtime.get(key).float(), mine), key
    norms = {k for k in src if k.endswith("layernorm.weight") and ".layers." in k}
    for key, tensor in src.items():
        if key not in linears and key not in norms:
            assert torch.equal(dst[key], tensor), key  # vision, mlp1, embeddings, final norm, head untouched
    assert any(not torch.equal(dst[k], src[k]) for k in norms)  # the scales folded into the norms


# -- the folds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["InternVL2-Llama3-76B", "InternVL2-1B", "InternVL2-2B", "InternVL2-4B", "InternVL3.5-1B",
                                    "InternVL3-9B-InternLM3"])
def test_folded_scales_keep_the_float_layer_s_function(family, tiny, tmp_path, monkeypatch):
    """prepare_layer's folds (norms, v_proj rows + bias, GQA-tied v -> o, up -> down, and into the rows of fused
    tensors: InternLM2 wqkv's v rows -> wo under GQA, Phi-3 qkv_proj's v rows -> o_proj, gate_up_proj's up half ->
    down_proj) change no output of the float layer (1e-4), every group scaled with uneven scales."""
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(1, 24, 64, generator=g) * torch.linspace(0.1, 8, 64) for _ in range(2)]
    layer, dialect = _decoder_layer(tiny(family), 1, hidden, tmp_path)
    before = [out.clone() for out in layer.outputs()]
    real = awq_quantizer.search_scales
    alphas = []

    def forced(weights, h, x_mean, config, expand=None):  # alpha 0.5, whatever the search prefers
        found = real(weights, h, x_mean, config, expand)
        found.scales, found.alpha = normalized_scales(x_mean, 0.5), 0.5
        alphas.append(float(found.scales.std()))
        return found

    monkeypatch.setattr(awq_quantizer, "search_scales", forced)
    record, head_dim = llm_facts(tiny(family))
    quantizer = AWQQuantizer(AWQConfig(group_size=32), record, head_dim=head_dim)
    work = layer.work(dialect, lambda _line: None)
    biases_before = {g.after: work.bias(g.after) for g in dialect.groups if g.after and g.after not in dialect.norms}
    for name, update in quantizer.prepare_layer(work):
        if update.weight is not None:
            layer.set_weight(name, update.weight)
        if update.bias is not None:
            layer.set_weight(name, update.bias, "bias")
    after = list(layer.outputs())
    for want, got in zip(before, after, strict=True):
        assert (got - want).norm() / want.norm() < 1e-4
    assert len(alphas) == len(dialect.groups) - len(UNSCALED[family]) and min(alphas) > 0.05  # real, uneven scales
    assert set(quantizer.summary()["unscaled"]) == UNSCALED[family]
    if family == "InternVL2-1B":  # Qwen2: v_proj has a bias, divided by the o_proj scales too
        assert not torch.equal(work.bias("self_attn.v_proj"), biases_before["self_attn.v_proj"])


@pytest.mark.parametrize("heads,kv", [(4, 2), (8, 8), (8, 1)])
def test_fused_row_rules_pick_the_rows_transformers_reads(heads, kv):
    """FUSED_ROWS against the tensors' own splits: InternLM2 wqkv's v (native_map's split, per KV
    head), Phi-3 qkv_proj's v ([q; k; v] as Phi3Attention slices it), gate_up_proj's up half."""
    from internvl_tools.models.dialects import FUSED_ROWS
    from internvl_tools.models.native_map import split_internlm2_wqkv

    def picked(rule, rows, width, hd=16):
        return torch.cat([torch.arange(a, b) for a, b in FUSED_ROWS[rule](rows, width, hd)])

    hd = 16
    rows = (heads + 2 * kv) * hd
    fused = torch.arange(rows)
    assert torch.equal(picked("internlm2_wqkv_v", rows, heads * hd), split_internlm2_wqkv(fused, kv, heads // kv, hd)[2])
    assert torch.equal(picked("qkv_v", rows, heads * hd), fused[(heads + kv) * hd:])
    assert torch.equal(picked("gate_up_up", 2 * 96, 96), torch.arange(96, 192))


# -- the pipeline ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["InternVL2-Llama3-76B", "InternVL2-1B", "InternVL2-2B", "InternVL2-4B"])
def test_every_dialect_runs(family, tiny, awq_tiny):
    from internvl_tools.runtime.model import InternVLRuntime

    out, summary = awq_tiny(family)
    assert set(summary["unscaled"]) == UNSCALED[family]
    src, dst = all_tensors(tiny(family)), all_tensors(out)
    linears = [k for k, t in src.items() if k.startswith("language_model.model.layers.") and t.dim() == 2]
    assert summary["linears"] == len(linears)
    for key in linears:  # fused tensors (wqkv, w1/w3, qkv_proj, gate_up_proj) stay fused, under their own names
        stem = key.removesuffix(".weight")
        assert dst[stem + ".qweight"].shape == (src[key].shape[1], src[key].shape[0] // 8)
    bf16, q4 = InternVLRuntime(tiny(family)), InternVLRuntime(out)
    pixels = bf16.pixel_values(sample_image(3))
    ids = bf16.prompt_ids("Describe the image.", pixels.shape[0])
    want, got = bf16.logits(ids, pixels), q4.logits(ids, pixels)
    assert torch.equal(q4.image_features(pixels), bf16.image_features(pixels))
    assert (got - want).norm() / want.norm() < 0.3


def test_resume_continues_from_last_finished_layer(tiny, awq_tiny, tmp_path):
    family = "InternVL2-Llama3-76B"
    job = AWQJob(AWQConfig(group_size=32), num_samples=4, seq_len=64)  # what TINY_AWQ runs
    whole, _ = awq_tiny(family)

    class Stop(Exception):
        pass

    def interrupt(done):
        if done == 2:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        quantize_awq(tiny(family), out, job, max_shard_size=10**9, progress=interrupt)
    assert json.loads((tmp_path / "resumed.partial" / ".awq_state.json").read_text())["layers_done"] == 2
    seen = []
    quantize_awq(tiny(family), out, job, max_shard_size=10**9, resume=True, progress=seen.append)
    assert seen == [3]
    expected, got = all_tensors(whole), all_tensors(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], t) for k, t in expected.items())
    assert not (tmp_path / "resumed.partial").exists()


def test_resumed_run_s_summary_counts_every_layer(tiny, awq_tiny, tmp_path, run_cli):
    """Interrupted after layer 1 and resumed from the command line: the --json summary (linears,
    groups scaled, clipped, error_vs_rtn, ...) equals the uninterrupted run's, whose output it
    equals bit for bit; before that, a resume with changed options is refused naming each one
    (was, now) and the fix, the partial kept as it was."""
    family = "InternVL2-Llama3-76B"
    whole, expected = awq_tiny(family)
    job = AWQJob(AWQConfig(group_size=32), num_samples=4, seq_len=64)  # what TINY_AWQ runs

    class Stop(Exception):
        pass

    def interrupt(done):
        if done == 1:
            raise Stop

    out, partial = tmp_path / "resumed", tmp_path / "resumed.partial"
    with pytest.raises(Stop):
        quantize_awq(tiny(family), out, job, max_shard_size=10**9, progress=interrupt)
    state = json.loads((partial / ".awq_state.json").read_text())
    changed = run_cli("quantize", tiny(family), "-o", out, *TINY_AWQ, "--no-zero-point", "--num-samples", "3", "--resume")
    assert changed.exit_code == 2 and changed.output.strip().count("\n") == 0, changed.output
    assert "--zero-point (now --no-zero-point); --num-samples 4 (now 3);" in changed.output
    assert "rerun with its options to resume, or drop --resume" in changed.output and "{" not in changed.output
    assert json.loads((partial / ".awq_state.json").read_text()) == state
    resumed = run_cli("quantize", tiny(family), "-o", out, *TINY_AWQ, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["linears"] == expected["linears"] > 0
    assert {k: v for k, v in summary.items() if k not in ("out", "seconds")} == \
        {k: v for k, v in expected.items() if k not in ("out", "seconds")}
    got, want = all_tensors(out), all_tensors(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], t) for k, t in want.items())


def test_bad_input_exits_2_and_writes_nothing(tiny, awq_tiny, tmp_path, run_cli):
    def refused(*args, needle):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = run_cli("quantize", args[0], "-o", out, *args[1:])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert result.output.strip().count("\n") == 0, result.output
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()

    src = tiny("InternVL2-1B")
    refused(src, *TINY_AWQ, "--bits", "8", needle="4-bit")
    refused(src, *TINY_AWQ, "--group-size", "64", needle="mlp.down_proj.weight: its 96 input features")
    refused(awq_tiny("InternVL2-Llama3-76B")[0], *TINY_AWQ, needle="already quantized")
    refused(tiny("InternVL2-1B", lora="embedded"), *TINY_AWQ, needle="merge-lora")
    refused(src, *TINY_AWQ, "--format", "compressed-tensors", "--zero-point", needle="symmetric")
    refused(src, *TINY_AWQ, "--format", "gptq", needle="--format awq or compressed-tensors")
    refused(src, "--method", "gptq", "--asym", "--format", "compressed-tensors", needle="symmetric")
    refused(src, *TINY_AWQ, "--group-size", "0", needle="--group-size 0 is not supported")
    # an AWQ output whose config.json lost its quantization_config: every command names the key and the fix
    # (as inspect does), quantize before OUT.partial exists
    stripped = tmp_path / "stripped"
    shutil.copytree(awq_tiny("InternVL2-Llama3-76B")[0], stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    needle = "is a quantized tensor (gptq / awq) but config.json has no quantization_config; restore"
    refused(stripped, *TINY_AWQ, needle=needle)
    refused(stripped, "--method", "gptq", "--group-size", "32", "--num-samples", "2", "--seq-len", "32", needle=needle)
    for args in (("inspect", stripped), ("chat", stripped, "hi"), ("convert", stripped, "-o", tmp_path / "c")):
        result = run_cli(*args)
        assert result.exit_code == 2 and needle in result.output and result.output.strip().count("\n") == 0, result.output
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    # a --bits the option does not offer at all is refused while parsing: exit 2, nothing written, one line
    out = tmp_path / "bits3"
    result = run_cli("quantize", src, "-o", out, *TINY_AWQ, "--bits", "3")
    assert result.exit_code == 2 and "'3' is not one of '4', '8'" in result.output and not out.exists()


def test_chat_and_verify_run_the_awq_output(tiny, awq_tiny, run_cli, tmp_path):
    from internvl_tools.io.slices import write_tsv

    from .support import make_items

    family = "InternVL2-1B"
    out, _ = awq_tiny(family)
    image = tmp_path / "a.png"
    sample_image(2).save(image)
    chat = run_cli("chat", out, "What is this?", "--image", image, "--max-new-tokens", "3", "--json")
    assert chat.exit_code == 0 and len(json.loads(chat.output)["token_ids"]) > 0, chat.output
    bench = write_tsv(make_items(2), tmp_path / "slice.tsv")
    result = run_cli("verify", tiny(family), out, "--bench", bench, "--json", "-", "--max-kl", "10", "--min-top1", "0",
                     "--max-acc-drop", "100")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["overall"]["n"] == 2


# -- transformers + gptqmodel on the native gemm output -------------------------------------------
NATIVE_AWQ_FAMILIES = ["InternVL2-Llama3-76B", "InternVL2-1B", "InternVL2-2B", "InternVL2-4B"]
LOAD_IDS = list(range(1, 25))
# argv: a JSON list of [checkpoint folder, file for gptqmodel's dequantized weights], then the backends
AWQ_LOAD_SCRIPT = """
import sys, json, torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AwqConfig
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
ids = torch.tensor([list(range(1, 25))])
reports = []
for folder, weights_file in json.loads(sys.argv[1]):
    report = {}
    for backend in sys.argv[2:]:
        extra = {} if backend == "auto" else {"quantization_config": AwqConfig(bits=4, backend=backend)}
        model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True, device_map="cpu", **extra)
        quantized = {name: m for name, m in model.named_modules() if hasattr(m, "qweight")}
        if backend == "auto":  # gptqmodel's own dequantizer on the loaded buffers, before a kernel repacks them
            save_file({name: dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, m.group_size).T.contiguous()
                       for name, m in quantized.items()}, weights_file)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        report[backend] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                           "kernels": sorted({type(m).__name__ for m in quantized.values()}), "quantized": sorted(quantized),
                           "vision": type(model.model.vision_tower.encoder.layer[0].attention.q_proj).__name__,
                           "head": type(model.lm_head).__name__, "dtype": str(model.dtype), "logits": logits[0].tolist()}
    reports.append(report)
print(json.dumps(reports))
"""


@pytest.fixture(scope="module")
def awq_loaded(tiny, awq_tiny, tmp_path_factory):
    """{family: (native AWQ folder, gptqmodel's dequantized weights file, report per backend)}: every
    family's native gemm output loaded in ONE .venv-gptq process (its imports take most of the time)."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    root = tmp_path_factory.mktemp("awq-native")
    jobs = []
    for family in NATIVE_AWQ_FAMILIES:
        native = root / family
        if family == "InternVL2-2B":  # InternLM2's fused wqkv gemm columns do not split: quantize the native checkpoint
            run("convert", tiny(family), "-o", root / f"{family}-bf16")
            run("quantize", root / f"{family}-bf16", "-o", native, *TINY_AWQ)
        else:
            run("convert", awq_tiny(family)[0], "-o", native)
        jobs.append([str(native), str(root / f"{family}-theirs.safetensors")])
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    proc = subprocess.run([str(GPTQ_PYTHON), "-c", AWQ_LOAD_SCRIPT, json.dumps(jobs), "auto", "torch_awq"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    return {family: (Path(native), Path(weights), report) for family, (native, weights), report in zip(NATIVE_AWQ_FAMILIES, jobs, reports)}


@pytest.mark.skipif(not GPTQ_PYTHON.exists(), reason="AWQ loading needs .venv-gptq (scripts/setup_gptq.sh: gptqmodel, whose AWQ "
                                                      "kernels transformers 5 loads AWQ checkpoints with)")
@pytest.mark.parametrize("family", NATIVE_AWQ_FAMILIES)
def test_transformers_loads_native_awq_output(family, awq_loaded):
    """The native-layout gemm output -> AutoModelForImageTextToText (transformers 5 + gptqmodel 7.7)
    on CPU, with the kernel it picks ("auto") and with its portable torch kernel ("torch_awq"):
    no missing keys, every decoder linear an AWQ module and nothing else, gptqmodel's dequantized
    weights bit for bit ours (rounded to fp16, the scales' dtype it dequantizes in), and logits
    within 2% of our runtime's (relative L2; both bf16; measured 0.6-0.8%)."""
    from safetensors.torch import load_file

    from internvl_tools.runtime.model import InternVLRuntime

    native, weights, report = awq_loaded[family]
    stored = all_tensors(native)
    stems = sorted(k.removesuffix(".qweight") for k in stored if k.endswith(".qweight"))
    theirs = load_file(weights)
    assert sorted(theirs) == stems
    for stem in stems:
        mine = independent_dequantize(stored[stem + ".qweight"], stored[stem + ".qzeros"], stored[stem + ".scales"])
        assert torch.equal(theirs[stem], mine.half()), stem
    ours = InternVLRuntime(native).logits(torch.tensor([LOAD_IDS]))[0]
    assert report["torch_awq"]["kernels"] == ["AwqTorchLinear"]
    for backend, facts in report.items():
        assert facts["missing"] == [] and facts["unexpected"] == [], backend
        assert facts["quantized"] == stems and facts["vision"] == "Linear" and facts["head"] == "Linear", backend
        logits = torch.tensor(facts["logits"])
        assert (logits - ours).norm() / ours.norm() < 0.02, (backend, facts["kernels"])


# -- compressed-tensors W4A16 -------------------------------------------------------------------
@pytest.mark.requires("compressed_tensors")
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_compressed_tensors_w4a16_loads_in_transformers(method, tiny, tmp_path, run_cli):
    """A native-layout input quantized to pack-quantized W4A16 (symmetric, group 32): transformers
    + compressed-tensors load it with no missing keys and compute what our runtime computes."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoModelForImageTextToText

    from internvl_tools.runtime.model import InternVLRuntime

    native, out = tmp_path / "hf", tmp_path / "ct"
    assert run_cli("convert", tiny("InternVL2-Llama3-76B"), "-o", native).exit_code == 0
    result = run_cli("quantize", native, "-o", out, "--method", method, "--format", "compressed-tensors", "--group-size", "32",
                     "--num-samples", "3", "--seq-len", "48")
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["format"] == "pack-quantized" and weights["num_bits"] == 4 and weights["symmetric"] is True
    assert weights["strategy"] == "group" and weights["group_size"] == 32
    report = json.loads(run_cli("inspect", out, "--json").stdout)["quantization"]
    assert report == {"format": "compressed_tensors", "quant_method": "compressed-tensors", "bits": 4, "strategy": "group",
                      "group_size": 32, "symmetric": True}
    assert qc["ignore"][:2] == ["re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    dst = all_tensors(out)
    key = "model.language_model.layers.1.mlp.down_proj"
    assert dst[key + ".weight_scale"].dtype == all_tensors(native)[key + ".weight"].dtype  # the model's dtype
    codes = unpack_from_int32(dst[key + ".weight_packed"], 4, torch.Size(dst[key + ".weight_shape"].tolist()))
    assert codes.min() >= -8 and codes.max() <= 7
    ours = InternVLRuntime(out)
    ids = torch.arange(1, 30)[None]
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        theirs = model(input_ids=ids).logits.float()
    loaded = model.model.language_model.layers[1].mlp.down_proj.weight
    expected = codes.float() * dst[key + ".weight_scale"].float().repeat_interleave(32, dim=1)
    torch.testing.assert_close(loaded.float(), expected.to(loaded.dtype).float(), rtol=0, atol=0)
    want = ours.logits(ids)
    assert (theirs[0] - want[0]).norm() / want[0].norm() < 0.02


def test_native_input_gives_the_converted_original_output(tiny, awq_tiny, tmp_path, run_cli):
    """AWQ on a native-layout input writes the native layout, bit for bit what converting the
    original-layout AWQ output gives (config with native modules_to_not_convert included)."""
    family = "InternVL2-Llama3-76B"
    native, direct, converted = tmp_path / "hf", tmp_path / "direct", tmp_path / "converted"
    assert run_cli("convert", tiny(family), "-o", native).exit_code == 0
    assert run_cli("quantize", native, "-o", direct, *TINY_AWQ).exit_code == 0
    assert run_cli("convert", awq_tiny(family)[0], "-o", converted).exit_code == 0
    mine, theirs = all_tensors(direct), all_tensors(converted)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    qc = json.loads((direct / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((converted / "config.json").read_text())["quantization_config"]
    # the calibration record travels into the converted config.json (verify reads it there) and back
    record = json.loads((direct / "config.json").read_text())["quantization_calibration"]
    assert record["method"] == "awq" and json.loads((converted / "config.json").read_text())["quantization_calibration"] == record
    assert run_cli("convert", converted, "-o", tmp_path / "back", "--to", "original").exit_code == 0
    assert (tmp_path / "back" / "config.json").read_bytes() == (awq_tiny(family)[0] / "config.json").read_bytes()
    assert {"model.vision_tower", "model.multi_modal_projector", "lm_head"} <= set(qc["modules_to_not_convert"])
