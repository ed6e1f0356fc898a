"""Streaming checkpoint reader: index and headers validated up front, tensors read on demand.

Only one shard file is open at a time and a tensor's bytes are read only when asked for,
so memory stays at the size of the tensors the caller holds, whatever the checkpoint size.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError
from .safetensors_format import ShardHeader, StoredTensor, TensorSpec, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MMAP_THRESHOLD = 1 << 20


class CheckpointReader:
    """A checkpoint folder read as a stream of named tensors.

    The folder holds either `model.safetensors` or shards listed by
    `model.safetensors.index.json`. Everything is validated when the reader is created.
    """

    follow_symlinks = False  # the CLI's --follow-symlinks sets it for the run

    def __init__(self, folder: str | os.PathLike[str], *, follow_symlinks: bool | None = None):
        """`folder` is a checkpoint folder, or one .safetensors file (e.g. a PEFT adapter's).

        A shard or side file (tokenizer, remote code, ...: what outputs copy) that is a symlink
        to a file outside the folder is refused (CheckpointError) unless `follow_symlinks`
        (default: the class attribute, set by `--follow-symlinks`);
        links into the Hugging Face cache's own `blobs/` folder (what `huggingface_hub`
        downloads look like) are allowed."""
        self.folder = Path(folder)
        follow = CheckpointReader.follow_symlinks if follow_symlinks is None else follow_symlinks
        if self.folder.is_file() and self.folder.suffix == ".safetensors":
            self.shards: list[ShardHeader] = [read_header(self.folder)]
        elif not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder; pass the checkpoint folder (the one with config.json)")
        else:
            self.shards = _load_shards(self.folder)
            if not follow:
                for shard in self.shards:
                    _check_symlink(self.folder, shard.path)
                for path in symlinked_side_files(self.folder):  # tokenizer, remote code, ...: copied into outputs
                    _check_symlink(self.folder, path)
        self._tensors: dict[str, StoredTensor] = {}
        for shard in self.shards:
            self._tensors.update(shard.tensors)
        self._open_path: Path | None = None
        self._handle = None
        self._lock = threading.Lock()  # the open shard handle is shared: get() may run in several threads

    # -- metadata (no tensor bytes) -------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor name, in shard order then file order."""
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def spec(self, name: str) -> TensorSpec:
        """Dtype and shape of a tensor, from its header."""
        return self._stored(name).spec

    def specs(self) -> list[TensorSpec]:
        """Specs of every tensor, in reading order."""
        return [t.spec for t in self._tensors.values()]

    def stored(self, name: str) -> StoredTensor:
        """Where a tensor's bytes lie: its shard file and byte offset."""
        return self._stored(name)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(t.nbytes for t in self._tensors.values())

    def config(self) -> dict:
        """The folder's config.json as a dict."""
        return read_json(self.folder / "config.json")

    # -- data --------------------------------------------------------------------------
    def get(self, name: str):
        """Read one tensor (a writable CPU torch tensor that the caller owns).

        Large tensors are mapped copy-on-write from the page cache (no copy until written,
        unmapped when the tensor is freed); small ones are read with one pread.
        """
        import torch

        stored = self._stored(name)
        spec = stored.spec
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.torch_dtype)
        with self._lock:
            if spec.nbytes >= MMAP_THRESHOLD:
                data = self._map(stored)
            else:
                data = bytearray(spec.nbytes)
                got = os.preadv(self._open(stored.path).fileno(), [data], stored.offset)
                if got != spec.nbytes:
                    raise CheckpointError(f"{stored.path}: key {name!r}: file ended after {got} of {spec.nbytes} bytes; the shard was truncated while reading")
        return torch.frombuffer(data, dtype=spec.torch_dtype).reshape(spec.shape)

    def _map(self, stored: StoredTensor) -> memoryview:
        handle = self._open(stored.path)
        if os.fstat(handle.fileno()).st_size < stored.offset + stored.nbytes:
            raise CheckpointError(f"{stored.path}: key {stored.spec.name!r}: the shard was truncated while reading")
        start = stored.offset - stored.offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(handle.fileno(), stored.offset + stored.nbytes - start, offset=start, access=mmap.ACCESS_COPY)
        return memoryview(mapping)[stored.offset - start :]

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, object]]:
        """Yield (name, tensor) one at a time, in shard order unless names are given."""
        for name in names if names is not None else self.keys():
            yield name, self.get(name)

    def close(self) -> None:
        """Close the open shard file, if any."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._open_path = None, None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stored(self, name: str) -> StoredTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: no tensor named {name!r}; run `internvl-tools inspect` to list the checkpoint's keys") from None

    def _open(self, path: Path):
        if self._open_path != path:
            self._close()
            self._handle = open(path, "rb", buffering=0)
            self._open_path = path
        return self._handle


def require_checkpoint_folder(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, or CheckpointError (one line) when it is a file: every command takes the
    checkpoint folder, not one of its shards or its config.json. A missing path is left to the reader."""
    if Path(path).is_file():
        raise CheckpointError(f"{path}: a file; pass the checkpoint folder (the one with config.json and the weights)")
    return Path(path)


def read_json(path: Path) -> dict:
    """Read a JSON object file, with a one-line error naming the file when it is bad."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _load_shards(folder: Path) -> list[ShardHeader]:
    index_path = folder / INDEX_NAME
    single = folder / SINGLE_NAME
    if index_path.exists():
        if single.exists():
            raise CheckpointError(f"{folder}: holds both {SINGLE_NAME} and {INDEX_NAME}, so which weights are meant is "
                                  f"ambiguous; remove {SINGLE_NAME} or the index (and its shards)")
        return _load_indexed(folder, index_path)
    if single.exists():
        _check_unindexed(folder, None, {SINGLE_NAME: []})
        return [read_header(single)]
    raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}; pass a folder with safetensors weights")


def _load_indexed(folder: Path, index_path: Path) -> list[ShardHeader]:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map object; the index is corrupt, regenerate it")
    files: dict[str, list[str]] = {}
    for key, filename in weight_map.items():
        _check_relative(index_path, key, filename)
        files.setdefault(filename, []).append(key)
    _check_unindexed(folder, index_path, files)
    shards: list[ShardHeader] = []
    owner: dict[str, Path] = {}
    for filename, keys in files.items():
        path = folder / filename
        if not path.is_file():
            raise CheckpointError(f"{index_path}: key {keys[0]!r} maps to shard {filename!r}, which is missing; copy the shard or fix the index")
        header = read_header(path)
        for key in keys:
            if key not in header.tensors:
                raise CheckpointError(f"{index_path}: key {key!r} maps to {filename!r}, but that shard does not hold it; regenerate the index")
        for key in header.tensors:
            if key in owner:
                raise CheckpointError(f"{path}: key {key!r} is also in {owner[key].name}; a key must be in one shard only")
            if weight_map.get(key) != filename:
                raise CheckpointError(f"{path}: key {key!r} is in this shard but the index maps it to {weight_map.get(key)!r}; regenerate the index")
            owner[key] = path
        shards.append(header)
    return shards


NEVER_READ = (".bin", ".bin.index.json", ".pt", ".pth")  # weights this toolkit neither reads nor copies


def symlinked_side_files(folder: Path) -> Iterator[Path]:
    """The symlinks among the entries of a checkpoint folder that outputs may copy
    (io.writer.copy_side_files): all but hidden names and weights that are never read, down
    through sub-folders (a symlinked sub-folder is yielded, not entered)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(dirs + files):
            path = Path(root) / name
            if not name.startswith(".") and not name.endswith(NEVER_READ) and path.is_symlink():
                yield path


def _check_symlink(folder: Path, path: Path, what: str = "checkpoint folder") -> None:
    """Refuse a shard or side file that resolves outside the checkpoint folder (but a HF-cache blob);
    `what` names the folder in the message (e.g. "adapter folder")."""
    if not path.is_symlink():
        return
    target, home = path.resolve(), folder.resolve()
    if home in target.parents:
        return
    if home.parent.name == "snapshots" and target.parent == home.parent.parent / "blobs":
        return  # huggingface_hub cache: snapshots/<rev>/file -> ../../blobs/<hash>
    raise CheckpointError(f"{path}: a symlink to {target}, outside the {what}; pass --follow-symlinks if that is intended")


def _check_unindexed(folder: Path, index_path: Path | None, files: dict[str, list[str]]) -> None:
    """Refuse any *.safetensors file of the folder that would not be read (the index lists none
    of its keys; or, without an index, it is not model.safetensors): its tensors would be
    dropped silently from every output."""
    for path in sorted(folder.glob("*.safetensors")):
        if path.name in files:
            continue
        if index_path is not None:
            raise CheckpointError(f"{index_path}: lists none of the keys of shard {path.name}; regenerate the index "
                                  "(or remove the stray shard)")
        raise CheckpointError(f"{path}: not read: without {INDEX_NAME} only {SINGLE_NAME} is; write the index "
                              "(or move the file out of the checkpoint folder)")


def _check_relative(index_path: Path, key: str, filename: object) -> None:
    if not isinstance(filename, str) or not filename:
        raise CheckpointError(f"{index_path}: key {key!r} maps to {filename!r}, not a file name; the index is corrupt")
    pure = PurePosixPath(filename.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or Path(filename).is_absolute() or ":" in pure.parts[0]:
        raise CheckpointError(f"{index_path}: key {key!r} maps to {filename!r}, a path outside the checkpoint folder; shard names must be relative")
