"""Every malformed input is refused before any tensor byte is used: exit 2, one line naming file and key."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from internvl_tools.errors import CheckpointError
from internvl_tools.io.reader import INDEX_NAME, CheckpointReader

FAMILY = "InternVL2-1B"


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _shard(folder: Path, k: int = 2) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[k - 1]


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_header(path: Path, header: dict) -> None:
    """Replace the header keeping the data section byte for byte (header padded to the old length)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n, "test header must not grow"
    body += b" " * (n - len(body))
    path.write_bytes(raw[:8] + body + raw[8 + n :])


def _assert_refused(run_cli, folder: Path, *needles: str) -> str:
    result = run_cli("inspect", folder)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


def test_truncated_shard(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    shard = _shard(folder)
    _, header = _header(shard)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    shard.write_bytes(shard.read_bytes()[:-100])
    _assert_refused(run_cli, folder, shard.name, last, "truncated")


def test_shard_shorter_than_its_header(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    shard = _shard(folder)
    shard.write_bytes(shard.read_bytes()[:50])
    _assert_refused(run_cli, folder, shard.name, "header length")


def test_corrupt_header_json(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    shard = _shard(folder, 1)
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"{not json!!!"
    shard.write_bytes(bytes(raw))
    _assert_refused(run_cli, folder, shard.name, "not valid JSON")


def test_header_offsets_do_not_match_shape(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    shard = _shard(folder)
    _, header = _header(shard)
    key = next(k for k in header if k != "__metadata__" and header[k]["shape"])
    header[key]["shape"] = [header[key]["shape"][0] + 1] + header[key]["shape"][1:]
    _rewrite_header(shard, header)
    _assert_refused(run_cli, folder, shard.name, key, "needs")


def test_header_offsets_overlap(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    shard = _shard(folder)
    _, header = _header(shard)
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = keys[0], keys[1]
    header[b] = dict(header[a])  # same byte range as a
    _rewrite_header(shard, header)
    _assert_refused(run_cli, folder, shard.name, "overlap")


def test_unknown_dtype(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    shard = _shard(folder)
    _, header = _header(shard)
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "Q9"
    _rewrite_header(shard, header)
    _assert_refused(run_cli, folder, shard.name, key, "dtype")


def test_missing_shard(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    shard = _shard(folder)
    shard.unlink()
    _assert_refused(run_cli, folder, INDEX_NAME, shard.name, "missing")


def test_index_maps_key_to_shard_without_it(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    index = _index(folder)
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][key] = files[1]
    _write_index(folder, index)
    _assert_refused(run_cli, folder, key, files[1])


def test_duplicate_key_across_shards(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    first, second = _shard(folder, 1), _shard(folder, 2)
    _, header_one = _header(first)
    _, header_two = _header(second)
    victim = next(k for k in header_two if k != "__metadata__")
    renamed = next(k for k in header_one if k != "__metadata__" and len(k) >= len(victim))
    # rename a key of shard 2 to a key that shard 1 holds (same length or shorter keeps the header size)
    header_two[renamed] = header_two.pop(victim)
    _rewrite_header(second, header_two)
    index = _index(folder)
    del index["weight_map"][victim]
    _write_index(folder, index)
    _assert_refused(run_cli, folder, renamed, first.name, "one shard only")


def test_key_in_shard_not_in_index(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    index = _index(folder)
    key = next(iter(index["weight_map"]))
    del index["weight_map"][key]
    _write_index(folder, index)
    _assert_refused(run_cli, folder, key, "regenerate the index")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors"])
def test_path_escape_in_index(tiny, copy_of, run_cli, bad):
    folder = copy_of(tiny(FAMILY))
    index = _index(folder)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = bad
    _write_index(folder, index)
    line = _assert_refused(run_cli, folder, key)
    assert "outside" in line or "missing" in line


def test_bad_index_json(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    (folder / INDEX_NAME).write_text("{ weight_map: ")
    _assert_refused(run_cli, folder, INDEX_NAME, "JSON")


def test_index_without_weight_map(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    _write_index(folder, {"metadata": {}})
    _assert_refused(run_cli, folder, INDEX_NAME, "weight_map")


def test_folder_without_weights(tmp_path, run_cli):
    (tmp_path / "config.json").write_text("{}")
    _assert_refused(run_cli, tmp_path, "model.safetensors")


def test_single_file_beside_an_index_is_ambiguous(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY))
    single = copy_of(tiny(FAMILY, shards=1))
    (single / "model.safetensors").rename(folder / "model.safetensors")
    _assert_refused(run_cli, folder, str(folder), "model.safetensors", INDEX_NAME, "ambiguous")


@pytest.mark.parametrize("stray", ["extra.safetensors", "model-00001-of-00003.safetensors", "adapter_model.safetensors"])
def test_unindexed_safetensors_file_is_refused(tiny, copy_of, run_cli, stray):
    """A weights file that no key points at would be dropped silently from every output."""
    folder = copy_of(tiny(FAMILY))
    (folder / stray).write_bytes(_shard(folder, 1).read_bytes())
    _assert_refused(run_cli, folder, stray, INDEX_NAME)


def test_stray_safetensors_beside_a_single_file_is_refused(tiny, copy_of, run_cli):
    folder = copy_of(tiny(FAMILY, shards=1))
    (folder / "extra.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    _assert_refused(run_cli, folder, "extra.safetensors", "not read")


def test_debug_shows_traceback(tiny, copy_of):
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    folder = copy_of(tiny(FAMILY))
    _shard(folder).unlink()
    result = CliRunner().invoke(cli, ["--debug", "inspect", str(folder)])
    assert isinstance(result.exception, CheckpointError)


def test_reader_reads_exact_tensors(tiny):
    """Every tensor read by the streaming reader equals what the safetensors library reads."""
    from safetensors import safe_open

    folder = tiny(FAMILY, shards=3)
    with CheckpointReader(folder) as reader:
        seen = 0
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as handle:
                for key in handle.keys():
                    assert torch.equal(handle.get_tensor(key), reader.get(key)), key
                    seen += 1
        assert seen == len(reader)
