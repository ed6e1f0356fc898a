"""Fixtures: tiny checkpoints of every family, generated once per test session; the `requires` marker."""

from __future__ import annotations

import functools
import importlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from internvl_tools.models.families import FAMILIES
from internvl_tools.cli.main import cli
from internvl_tools.tiny.generator import make_checkpoint

# The seed families: every per-family test runs on all of them.
ALL_FAMILIES = ["InternVL-Chat-V1-1", "InternVL-Chat-V1-2", "InternVL-Chat-V1-2-Plus", "InternVL2-1B", "InternVL2-2B",
                "InternVL2-4B", "InternVL2-8B", "InternVL2-26B", "InternVL2-40B", "InternVL2-Llama3-76B"]
# One family per dialect added with InternVL2.5 / 3 / 3.5 (Qwen3 twice: head_dim 32 != 64 / 4 heads in 3.5-1B, 16 in
# 3.5-2B), plus the newer releases of existing dialects: they join the key per-dialect tests only (layout, runtime vs
# reference, convert round trip and native loading, GPTQ, embedded LoRA), so the suite stays fast.
NEW_DIALECTS = ["InternVL3-9B-InternLM3", "InternVL3.5-1B", "InternVL3.5-30B-A3B"]
NEW_FAMILIES = ["InternVL2.5-1B", "InternVL3-9B", "InternVL3-9B-InternLM3", "InternVL3.5-1B", "InternVL3.5-2B", "InternVL3.5-30B-A3B"]
DIALECT_FAMILIES = ALL_FAMILIES + NEW_FAMILIES
assert set(DIALECT_FAMILIES) <= set(FAMILIES)


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(*modules): the test needs these optional packages (bitsandbytes, onnx, "
                                       "peft, ...); it alone is skipped when one cannot be imported")
    config.addinivalue_line("markers", "gpu_acceptance: the GPU acceptance dry run (deselect with -m 'not gpu_acceptance')")
    config.addinivalue_line("markers", "vllm_full: the whole vLLM acceptance matrix (tests/test_vllm.py), beyond the default "
                                       "subset; deselected unless INTERNVL_TOOLS_VLLM_FULL=1 or -m names vllm_full")


@functools.cache
def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.requires("bitsandbytes", "accelerate") skips just the marked test (or parameter set) when a
    package is missing; test modules import optional packages inside the tests, so the rest still runs.
    Tests marked vllm_full are deselected unless INTERNVL_TOOLS_VLLM_FULL=1 or the -m expression names vllm_full."""
    if os.environ.get("INTERNVL_TOOLS_VLLM_FULL") != "1" and "vllm_full" not in (config.option.markexpr or ""):
        full = [item for item in items if item.get_closest_marker("vllm_full")]
        if full:
            config.hook.pytest_deselected(items=full)
            items[:] = [item for item in items if not item.get_closest_marker("vllm_full")]
    for item in items:
        missing = [m for mark in item.iter_markers("requires") for m in mark.args if _missing(m)]
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"optional package not installed: {', '.join(dict.fromkeys(missing))}"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """tiny(family, lora="none", shards=2) -> path of a cached generated checkpoint (never modify it)."""
    cache: dict[tuple, Path] = {}

    def make(family: str, lora: str = "none", shards: int = 2) -> Path:
        key = (family, lora, shards)
        if key not in cache:
            cache[key] = make_checkpoint(family, tiny_root / f"{family}-{lora}-{shards}", lora=lora, shards=shards)
        return cache[key]

    return make


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(path) -> a private copy of a checkpoint folder that a test may damage."""

    def copy(path: Path) -> Path:
        dest = tmp_path / ("copy-" + path.name)
        shutil.copytree(path, dest)
        return dest

    return copy


@pytest.fixture
def run_cli():
    """run_cli(*args) -> click Result, run in-process."""
    import signal

    runner = CliRunner()

    def run(*args: str):
        # the CLI installs its stop handlers (SIGINT / SIGTERM) in the process: put pytest's back
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    return run
