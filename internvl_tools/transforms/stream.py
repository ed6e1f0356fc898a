"""A streamed checkpoint transform: each output tensor is a function of a few input tensors.

Output specs are found by running every function on meta tensors first (no data read), so
shapes and dtypes are validated and the writer's shards planned before any real work. The work
then runs as a pipeline (transforms/pipeline.py): the next tensors are read while the current
ones are computed and the previous ones written; unchanged tensors are copied in the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..io.reader import CheckpointReader
from ..io.safetensors_format import TensorSpec, spec_of
from ..io.writer import CheckpointWriter
from .pipeline import Item, cores, pipeline_budget, run_pipeline
from ..models.layout import lora_flag_fixes
from ..models.native_layout import is_native
from ..models.native_map import SIDECAR
from ..formats.views import open_view
from ..models.views import link_for


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
    config_update: dict[str, object] | None = None,
    names: str = "stored",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `outputs` computed from checkpoint `source` into a new checkpoint `out`.

    `names="stored"`: output and source names are the checkpoint's own keys (any layout).
    `names="view"`: sources are original-layout keys read through models.views (either
    layout), outputs are written under the names given.
    `names="original"`: they are original-layout keys; a native-layout input is read through
    models.views.NativeView and the outputs are written back in the native layout (renamed,
    fused tensors split), with `internvl_original.json` updated to the new keys and config.
    `files` adds or replaces side files (None leaves one out), as CheckpointWriter.finalize;
    `config_update` sets (None: deletes) top-level fields of the output's config.json, in the
    output's layout."""
    view = open_view(source) if names in ("original", "view") else CheckpointReader(source)
    with view:
        original_names = [o.name for o in outputs]
        native_out = names == "original" and getattr(view, "layout_name", "original") == "native"
        if native_out:
            outputs = to_layout_outputs(view, outputs)
        specs = output_specs(view, outputs)
        files = dict(files or {})
        if config_update:
            files["config.json"] = _updated(files.get("config.json") or _stored_config(source), config_update)
        if native_out:
            files[SIDECAR] = {**view.sidecar_extra, "config": _updated(view.config(), dict(config_update or {})),
                              "keys": original_names}
        files = fix_lora_flags(files, source, [o.name for o in outputs])
        items = plan_items(view, outputs, specs)
        largest = max([spec.nbytes for spec in view.specs()] + [spec.nbytes for spec in specs], default=0)
        with CheckpointWriter(out, specs, max_shard_size=max_shard_size, inputs=[Path(source)], overwrite=overwrite) as writer, \
                compute_threads():
            # progress in input bytes consumed, so the bar ends at the input's size
            run_pipeline(view, writer, items, budget=pipeline_budget(items, largest), progress=progress)
            if progress:
                progress(max(view.total_bytes - sum(item.input_bytes for item in items), 0))
            return writer.finalize(side_files_from=Path(source), files=files)


def plan_items(view, outputs: list[Output], specs: list[TensorSpec]) -> list[Item]:
    """The pipeline's work list (transforms/pipeline.py): a tensor stored unchanged is one copy
    item (in the kernel); consecutive outputs of the same sources (an int8 weight and its
    scales, the parts of a split tensor) are one computed item, their sources read once."""
    nbytes = {spec.name: spec.nbytes for spec in specs}
    items: list[Item] = []
    seen: set[str] = set()
    for out in outputs:
        consumed = sum(view.spec(s).nbytes for s in dict.fromkeys(out.sources) if s not in seen)
        seen.update(out.sources)
        stored = view.stored(out.sources[0]) if out.fn is None else None
        if stored is not None:
            items.append(Item([(out.name, None)], out.sources, stored, input_bytes=consumed))
        elif items and items[-1].stored is None and items[-1].sources == out.sources:
            items[-1].outputs.append((out.name, out.fn))
            items[-1].output_bytes += nbytes[out.name]
            items[-1].input_bytes += consumed
        else:
            items.append(Item([(out.name, out.fn)], out.sources, None, sum(view.spec(s).nbytes for s in out.sources),
                              nbytes[out.name], consumed))
    return items


@contextmanager
def compute_threads():
    """torch's intra-op threads for the pipeline's arithmetic: the CPUs this process may run on
    less one, left to the reader and output threads, whose kernel work (page faults, copies of
    what is not written with O_DIRECT) can take as much CPU time as the arithmetic; OMP_NUM_THREADS, when set, decides.
    Measured on the 2-core machine (InternVL2-Llama3-76B-wide, int8): 1 thread 6.6 s, 2 threads
    9.2 s (OpenMP's barriers wait for a thread the writer's copies took the core from). The
    previous setting is restored on exit."""
    import os

    import torch

    before = torch.get_num_threads()
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, cores() - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fix_lora_flags(files: dict[str, object], source: Path, keys: list[str]) -> dict[str, object]:
    """`files` with the output's LoRA flags made to agree with its tensors (models.layout.
    lora_flag_fixes), in config.json (original layout) or in internvl_original.json (native);
    each correction is printed as a `warning:` line on stderr."""
    import sys

    files = dict(files)
    config = files.get("config.json") if isinstance(files.get("config.json"), dict) else _stored_config(source)
    if is_native(config):
        sidecar = files.get(SIDECAR)
        if sidecar is None and (Path(source) / SIDECAR).exists():
            from ..io.reader import read_json

            sidecar = read_json(Path(source) / SIDECAR)
        if isinstance(sidecar, dict) and isinstance(sidecar.get("config"), dict):
            fixed, warnings = lora_flag_fixes(sidecar["config"], [])
            if warnings:
                files[SIDECAR] = dict(sidecar, config=fixed)
        else:
            warnings = []
    else:
        fixed, warnings = lora_flag_fixes(config, keys)
        if warnings:
            files["config.json"] = fixed
    for line in warnings:
        print(line, file=sys.stderr)
    return files


def to_layout_outputs(view, outputs: list[Output]) -> list[Output]:
    """Original-layout outputs renamed (and fused tensors split) into the native layout of `view`."""
    result = []
    for item in outputs:
        link = link_for(view, item.name)
        if link.split is None:
            result.append(Output(link.natives[0], item.sources, item.fn))
            continue
        shared = None if item.fn is None else _Shared(item.fn, len(link.natives))
        for index, native in enumerate(link.natives):
            result.append(Output(native, item.sources, _split_part(shared, link.split, index)))
    return result


def _split_part(fn: Callable | None, split: Callable, index: int) -> Callable:
    if fn is None:
        return lambda t: split(t)[index]
    return lambda *tensors: split(fn(*tensors))[index]


class _Shared:
    """An original-layout output computed once for all the native parts it is split into (the
    parts are consecutive outputs of one pipeline item, called with the same source tensors):
    the first part computes, the others reuse the result, which is let go after the last part,
    so the item holds one result (what its budget counts), not one per part."""

    def __init__(self, fn: Callable, parts: int):
        self.fn, self.parts = fn, parts
        self.args: tuple | None = None
        self.value = None
        self.served = 0

    def __call__(self, *tensors):
        if self.args is None or len(self.args) != len(tensors) or any(a is not b for a, b in zip(self.args, tensors)):
            self.args, self.value, self.served = tensors, self.fn(*tensors), 0
        value = self.value
        self.served += 1
        if self.served >= self.parts:
            self.args, self.value = None, None
        return value


def _stored_config(source: Path) -> dict:
    from ..io.reader import read_json

    return read_json(Path(source) / "config.json")


def _updated(config: dict, update: dict[str, object]) -> dict:
    result = dict(config)
    for key, value in update.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def to_native_outputs(link_list: list[Link]) -> list[Output]:
    """Outputs that build native tensors from an original checkpoint."""
    outputs = []
    for link in link_list:
        for index, native in enumerate(link.natives):
            fn = None if link.split is None else (lambda t, s=link.split, i=index: s(t)[i])
            outputs.append(Output(native, (link.original,), fn))
    return outputs


def to_original_outputs(link_list: list[Link]) -> list[Output]:
    """Outputs that rebuild the original tensors from a native checkpoint."""
    return [Output(link.original, link.natives, link.merge) for link in link_list]
