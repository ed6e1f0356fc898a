"""`shard` re-shards losslessly: same keys, bit-identical tensors, same side files."""

from __future__ import annotations

import json

import pytest

from internvl_tools.io.reader import INDEX_NAME, CheckpointReader

from .conftest import ALL_FAMILIES
from .support import all_bytes


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_reshard_bit_identical(family, tiny, tmp_path, run_cli):
    src = tiny(family, lora="embedded" if family.endswith("B") else "none")
    out = tmp_path / "out"
    result = run_cli("shard", src, "-o", out, "--max-shard-size", "60KB", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == summary["shards"] > 2
    with CheckpointReader(out) as reader:
        for shard in reader.shards:
            data = sum(t.nbytes for t in shard.tensors.values())
            assert data <= 60_000 or len(shard.tensors) == 1
    assert all_bytes(src) == all_bytes(out)
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()


def test_reshard_to_single_file(tiny, tmp_path, run_cli):
    src = tiny("InternVL2-2B", shards=3)
    out = tmp_path / "single"
    assert run_cli("shard", src, "-o", out, "--max-shard-size", "5GB").exit_code == 0
    assert (out / "model.safetensors").exists() and not (out / INDEX_NAME).exists()
    assert all_bytes(src) == all_bytes(out)


def test_reshard_refuses_bad_outputs(tiny, tmp_path, run_cli):
    src = tiny("InternVL2-2B")
    for out in (src, src / "inside"):
        result = run_cli("shard", src, "-o", out)
        assert result.exit_code == 2 and "input" in result.output
    bad = run_cli("shard", src, "-o", tmp_path / "x", "--max-shard-size", "lots")
    assert bad.exit_code == 2 and "lots" in bad.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_input_never_modified(tiny, copy_of, tmp_path, run_cli):
    src = copy_of(tiny("InternVL2-26B"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir()}
    assert run_cli("shard", src, "-o", tmp_path / "o", "--max-shard-size", "100KB").exit_code == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir()} == before
