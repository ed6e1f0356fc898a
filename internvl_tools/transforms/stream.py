"""A streamed checkpoint transform: each output tensor is a function of a few input tensors.

Output specs are found by running every function on meta tensors first (no data read), so
shapes and dtypes are validated and the writer's shards planned before any real work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..io.reader import CheckpointReader
from ..io.safetensors_format import TensorSpec, spec_of
from ..io.writer import CheckpointWriter


@dataclass(frozen=True)
class Output:
    """One output tensor: its name, the input keys it needs, and how to compute it.

    `fn(*tensors)` gets the source tensors in order; `fn=None` with one source is a
    byte-exact copy (done in the kernel when writing a checkpoint).
    """

    name: str
    sources: tuple[str, ...]
    fn: Callable | None = None


def output_specs(reader: CheckpointReader, outputs: list[Output]) -> list[TensorSpec]:
    """Specs of every output, computed on meta tensors (no tensor bytes are read)."""
    import torch

    specs = []
    for out in outputs:
        if out.fn is None:
            src = reader.spec(out.sources[0])
            specs.append(TensorSpec(out.name, src.dtype, src.shape))
            continue
        metas = [torch.empty(reader.spec(s).shape, dtype=reader.spec(s).torch_dtype, device="meta") for s in out.sources]
        specs.append(spec_of(out.name, out.fn(*metas)))
    return specs


class SourceCache:
    """Reads source tensors, keeping the last one so a tensor split into several is read once."""

    def __init__(self, reader: CheckpointReader, size: int = 1):
        self.reader, self.size = reader, size
        self._items: dict[str, object] = {}

    def get(self, name: str):
        if name not in self._items:
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[name] = self.reader.get(name)
        return self._items[name]


def compute(cache: SourceCache, out: Output):
    """The tensor of one output."""
    tensors = [cache.get(s) for s in out.sources]
    return tensors[0] if out.fn is None else out.fn(*tensors)


def run_transform(
    source: Path,
    out: Path,
    outputs: list[Output],
    *,
    max_shard_size: int,
    overwrite: bool = False,
    files: dict[str, object] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `outputs` computed from checkpoint `source` into a new checkpoint `out`.

    `files` adds or replaces side files (None leaves one out), as CheckpointWriter.finalize."""
    with CheckpointReader(source) as reader:
        specs = output_specs(reader, outputs)
        cache = SourceCache(reader)
        with CheckpointWriter(out, specs, max_shard_size=max_shard_size, inputs=[Path(source)], overwrite=overwrite) as writer:
            seen: set[str] = set()
            for item in outputs:
                if item.fn is None:
                    writer.copy_stored(item.name, reader.stored(item.sources[0]))
                else:
                    writer.write(item.name, compute(cache, item).contiguous())
                if progress:  # in input bytes consumed, so the bar ends at the input's size
                    progress(sum(reader.spec(s).nbytes for s in item.sources if s not in seen))
                    seen.update(item.sources)
            if progress:
                progress(reader.total_bytes - sum(reader.spec(s).nbytes for s in seen))
            return writer.finalize(side_files_from=Path(source), files=files)
