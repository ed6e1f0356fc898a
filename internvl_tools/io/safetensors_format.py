"""The safetensors file format: dtype table, header parsing and validation, header building.

Every header is untrusted input: `read_header` checks it completely before any tensor byte
is used, and errors name the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

# safetensors dtype code -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code (torch is imported only when tensors are)."""
    import torch

    return getattr(torch, _TORCH_NAMES[code])


def dtype_code(dtype) -> str | None:
    """The safetensors code of a torch dtype, or None when safetensors cannot store it."""
    name = str(dtype).removeprefix("torch.")
    return next((code for code, torch_name in _TORCH_NAMES.items() if torch_name == name), None)


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself applies
ALIGNMENT = 8


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype code and shape of one tensor: all a planner needs, no data."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor's spec plus where its bytes lie in a shard file."""

    spec: TensorSpec
    path: Path
    offset: int  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes


@dataclass(frozen=True)
class ShardHeader:
    """The validated header of one .safetensors file."""

    path: Path
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]


def spec_of(name: str, tensor) -> TensorSpec:
    """The TensorSpec of an in-memory torch tensor."""
    code = dtype_code(tensor.dtype)
    if code is None:
        raise CheckpointError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
    return TensorSpec(name, code, tuple(tensor.shape))


def read_header(path: Path) -> ShardHeader:
    """Read and fully validate the header of a safetensors file.

    Checks the header length against the file size, the JSON structure, every dtype and
    shape, and that each tensor's byte range matches dtype x shape, lies inside the file and
    overlaps no other tensor.
    """
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is {file_size} bytes, too short for a safetensors header; the shard is truncated, copy it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path}: header length {header_len} goes beyond the file ({file_size} bytes); the shard is truncated or corrupt, copy it again"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check the file exists and is readable") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}); the shard is corrupt, copy it again") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the shard is corrupt, copy it again")
    data_start = 8 + header_len
    data_len = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object of strings; the shard is corrupt")
    tensors = {name: _parse_entry(path, name, entry, data_start, data_len) for name, entry in header.items()}
    _check_no_overlap(path, tensors, data_start)
    used = max((t.offset + t.nbytes - data_start for t in tensors.values()), default=0)
    if used != data_len:  # the safetensors library refuses such a file too (MetadataIncompleteBuffer)
        raise CheckpointError(f"{path}: {data_len - used} bytes after the last tensor; the shard is corrupt or was "
                              "appended to, copy it again")
    return ShardHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> StoredTensor:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: key {name!r}: header entry is not an object; the shard is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{path}: key {name!r}: unknown dtype {dtype!r}; the shard is corrupt or uses a dtype this tool does not read")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: key {name!r}: shape {shape!r} is not a list of non-negative integers; the shard is corrupt")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{path}: key {name!r}: data_offsets {offsets!r} is not a pair of integers; the shard is corrupt")
    begin, end = offsets
    spec = TensorSpec(name, dtype, tuple(shape))
    if not 0 <= begin <= end:
        raise CheckpointError(f"{path}: key {name!r}: data_offsets [{begin}, {end}] are out of order; the shard is corrupt")
    if end - begin != spec.nbytes:
        raise CheckpointError(
            f"{path}: key {name!r}: data is {end - begin} bytes but {dtype} x {list(shape)} needs {spec.nbytes}; the shard is corrupt"
        )
    if end > data_len:
        raise CheckpointError(
            f"{path}: key {name!r}: data ends at byte {data_start + end}, beyond the file ({data_start + data_len} bytes); the shard is truncated, copy it again"
        )
    return StoredTensor(spec, path, data_start + begin)


def _check_no_overlap(path: Path, tensors: dict[str, StoredTensor], data_start: int) -> None:
    ranges = sorted((t.offset, t.offset + t.nbytes, name) for name, t in tensors.items() if t.nbytes)
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: keys {name_a!r} and {name_b!r} overlap in the data section; the shard is corrupt")


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Serialize a header for tensors stored back to back in `specs` order.

    Returns the header bytes (length prefix included, padded to 8-byte alignment) and each
    tensor's absolute byte offset in the file.
    """
    entries: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    relative: dict[str, int] = {}
    cursor = 0
    for spec in specs:
        entries[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [cursor, cursor + spec.nbytes]}
        relative[spec.name] = cursor
        cursor += spec.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % ALIGNMENT)
    start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, {name: start + off for name, off in relative.items()}
