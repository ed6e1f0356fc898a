"""Fixtures: tiny checkpoints of every family, generated once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from internvl_tools.models.families import FAMILIES
from internvl_tools.cli.main import cli
from internvl_tools.tiny.generator import make_checkpoint

ALL_FAMILIES = list(FAMILIES)


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
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return run
