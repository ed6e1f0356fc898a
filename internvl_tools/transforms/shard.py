"""`shard`: lossless re-sharding, streamed byte range by byte range."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..io.reader import CheckpointReader
from ..io.writer import CheckpointWriter
from .pipeline import Item, run_pipeline
from .stream import fix_lora_flags


@dataclass(frozen=True)
class ReshardResult:
    """What a re-shard wrote."""

    out: Path
    shards: int
    tensors: int
    bytes: int


def reshard(
    source: str | Path,
    out: str | Path,
    *,
    max_shard_size: int,
    groups: list[list[str]] | None = None,
    overwrite: bool = False,
    files: dict[str, object] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReshardResult:
    """Copy a checkpoint into new shards of at most `max_shard_size` bytes.

    Tensor bytes are copied range by range (bodies with O_DIRECT, io/direct.py; the rest in the
    kernel where possible), so the tensors are bit-identical and memory does not grow with the
    model; the pipeline's output threads (transforms/pipeline.py) fill several output shards at
    once. `groups` (key lists, e.g. one
    per GPU) are written in order and never share a shard file; `files` adds or replaces side
    files such as device_map.json.
    """
    with CheckpointReader(source) as reader:
        names = [name for group in groups for name in group] if groups is not None else reader.keys()
        specs = [reader.spec(name) for name in names]
        spec_groups = [[reader.spec(name) for name in group] for group in groups] if groups is not None else None
        with CheckpointWriter(out, specs, max_shard_size=max_shard_size, inputs=[Path(source)], overwrite=overwrite,
                              groups=spec_groups) as writer:
            items = [Item([(name, None)], (name,), reader.stored(name), input_bytes=reader.spec(name).nbytes) for name in names]
            run_pipeline(reader, writer, items, budget=0, progress=progress)
            written = writer.finalize(side_files_from=Path(source), files=fix_lora_flags(files or {}, Path(source), names))
            return ReshardResult(written, len(writer.plan), len(specs), writer.bytes_written)
