"""Helpers shared by the benchmark scripts: wide checkpoints, timed runs with peak RSS, tables."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("BENCH_WORK", ROOT / "bench-work"))
GIB = 2**30


def wide_checkpoint(family: str = "InternVL2-Llama3-76B", shards: int = 3, llm_layers: int = 2) -> Path:
    """Build (once) a checkpoint with the family's true widths and 2 layers per tower (`llm_layers`
    LLM decoder layers: the folder is then FAMILY-wide-LN)."""
    out = WORK / f"{family}-wide{wide_suffix(llm_layers)}"
    if not (out / "config.json").exists():
        WORK.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "internvl_tools", "make-tiny", family, str(out), "--wide", "--shards", str(shards), "--overwrite",
             *(["--llm-layers", str(llm_layers)] if llm_layers != 2 else [])])
    return out


def wide_suffix(llm_layers: int) -> str:
    """The folder-name suffix of a wide checkpoint with `llm_layers` LLM layers ("" for the default 2)."""
    return "" if llm_layers == 2 else f"-L{llm_layers}"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing loudly."""
    return subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, measured by GNU time in a child."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return seconds, peak_kib * 1024


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    """Bytes of the weight files in a folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(suffix))


def cp_weights(src: Path, dst: Path) -> list[str]:
    """The cp command that copies a checkpoint's weight files, then syncs them to disk."""
    files = " ".join(f"'{p}'" for p in sorted(src.glob("*.safetensors")))
    return ["bash", "-c", f"mkdir -p '{dst}' && cp {files} '{dst}/' && sync '{dst}'/*"]


def fresh(path: Path) -> Path:
    """Remove a previous output."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def self_peak_rss() -> int:
    """Peak RSS of this process in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
