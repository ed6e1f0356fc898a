"""`merge-lora`: merge embedded and PEFT LoRA adapters into the base, tensor by tensor.

Each merged weight is W + sum(scale x B @ A) computed in float32 (over blocks of rows when
nothing else touches it) and cast back to W's dtype once; keys lose peft's wrapping;
use_llm_lora / use_backbone_lora become 0. What each adapter means is decided by
transforms/adapters.py, exactly as peft means it; every adapter is validated (options, keys,
shapes, ranks, NaN/Inf) before anything is written, and a result with NaN or Inf stops the run
with nothing written.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, InputError
from ..io.buffers import output_like
from ..io.reader import CheckpointReader
from ..models.layout import Layout, build_layout
from ..formats.views import open_view
from .adapters import (FLAGS, AdapterSet, BaseModel, Op, embedded_deltas, factor_shape_error, flag_mismatches, load_bin,
                       open_peft_adapter, peft_ops, plain_key, quantized_base)
from ..formats.registry import detect
from .stream import Output, run_transform

BLOCK_ELEMENTS = 1 << 18  # elements per block of rows in the blocked merge: 1 MiB of float32 per buffer, cache-sized (5-6% faster than 4 MiB on a 768 x 2048 expert and an 8192^2 linear here; the same bytes)
CHECK_WINDOW = 16 << 20  # bytes per read when checking an adapter's tensors for NaN / Inf (one reused buffer)
CHECK_GAP = 1 << 20  # the most unneeded bytes read between two checked tensors of one window


class TensorSources:
    """Adapter tensors by (source, key): the checkpoint itself or an adapter file, read on demand."""

    def __init__(self, checkpoint):
        self.readers: dict[str, object] = {"embedded": checkpoint}

    def _reader(self, source: str):
        if source not in self.readers:
            if source.endswith(".safetensors"):
                self.readers[source] = CheckpointReader(source)
            else:  # a small adapter_model.bin, loaded whole
                self.readers[source] = _InMemory(load_bin(Path(source)))
        return self.readers[source]

    def get(self, source: str, key: str):
        return self._reader(source).get(key)

    def shape(self, source: str, key: str) -> tuple[int, ...]:
        reader = self._reader(source)
        return tuple(reader.spec(key).shape) if hasattr(reader, "spec") else tuple(reader.get(key).shape)

    def nonfinite(self, source: str, keys: list[str]) -> set[str]:
        """The keys among `keys` (tensors of `source`) holding NaN or Inf (torch.isfinite).

        A safetensors file read by a CheckpointReader (an adapter's weights, a plain checkpoint's
        embedded factors) is read in file order, several tensors per pread into one reused
        buffer of CHECK_WINDOW bytes, so thousands of small factors cost a few large reads and
        no allocation each; a tensor larger than the window, and every other source, is read
        on its own."""
        import torch

        reader = self._reader(source)
        bad: set[str] = set()
        if type(reader) is not CheckpointReader:
            return {key for key in dict.fromkeys(keys) if not torch.isfinite(reader.get(key)).all()}
        stored = sorted((reader.stored(key) for key in dict.fromkeys(keys)), key=lambda t: (str(t.path), t.offset))
        buffer = None
        index = 0
        while index < len(stored):
            first = stored[index]
            if first.nbytes > CHECK_WINDOW:
                if not torch.isfinite(reader.get(first.spec.name)).all():
                    bad.add(first.spec.name)
                index += 1
                continue
            stop = index + 1  # the tensors of this window: same file, within CHECK_WINDOW of the first, small gaps
            while (stop < len(stored) and stored[stop].path == first.path
                   and stored[stop].offset - (stored[stop - 1].offset + stored[stop - 1].nbytes) <= CHECK_GAP
                   and stored[stop].offset + stored[stop].nbytes - first.offset <= CHECK_WINDOW):
                stop += 1
            length = stored[stop - 1].offset + stored[stop - 1].nbytes - first.offset
            if buffer is None:
                buffer = bytearray(CHECK_WINDOW)
            window = memoryview(buffer)[:length]
            with open(first.path, "rb", buffering=0) as handle:
                got = os.preadv(handle.fileno(), [window], first.offset)
            if got != length:
                raise CheckpointError(f"{first.path}: file ended after {got} of {length} bytes at offset {first.offset}; "
                                      "the file was truncated while reading")
            for tensor in stored[index:stop]:
                if tensor.nbytes and tensor.spec.torch_dtype.is_floating_point:
                    start = tensor.offset - first.offset
                    values = torch.frombuffer(window[start:start + tensor.nbytes], dtype=tensor.spec.torch_dtype)
                    if not torch.isfinite(values).all():
                        bad.add(tensor.spec.name)
            index = stop
        return bad

    def close(self) -> None:
        for name, reader in self.readers.items():
            if name != "embedded" and hasattr(reader, "close"):
                reader.close()


class _InMemory:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get(self, key: str):
        return self.tensors[key]


@dataclass
class MergePlan:
    """What merge-lora would write: outputs, the changes by base key, the output config, warnings."""

    outputs: list[Output]
    adapters: AdapterSet
    config: dict
    sources: TensorSources
    base: BaseModel
    layout_name: str
    warnings: list[str] = field(default_factory=list)
    config_update: dict | None = None

    @property
    def refused(self):
        return self.adapters.refused

    def rows(self) -> list[dict]:
        """One row per change: what is merged into which base tensor, with which rank, alpha and scale."""
        rows = []
        for key, ops in self.adapters.ops.items():
            for op in ops:
                rows.append({"target": self.base.part_name(key, op.part), "base_key": key, "module": op.module, "kind": op.kind,
                             "rank": op.rank or None, "alpha": op.alpha or None, "scale": op.scale or None,
                             "init": op.init, "source": op.adapter})
        return rows


def plan_merge(reader, adapters: list[Path], alpha: float | None) -> MergePlan:
    """Validate everything and return the output stream (nothing is written here; refusals are collected)."""
    config = reader.config()
    layout = build_layout(config, reader.specs())
    shapes = {spec.name: tuple(spec.shape) for spec in reader.specs()}
    if alpha is not None and not layout.lora:
        raise InputError(f"--alpha sets the alpha of LoRA embedded in {reader.folder}, which has none; a PEFT --adapter "
                         "carries its own lora_alpha (adapter_config.json), which is used: remove --alpha")
    plan = embedded_deltas(layout, shapes, alpha)
    base_of = {plain_key(k): k for k, info in layout.keys.items() if info.lora is None}
    base = BaseModel(config, shapes, base_of)
    fmt = detect(config, shapes)
    if fmt.name != "plain":
        base.quant_format, base.quant_marker = fmt.name, fmt.marker
    sources = TensorSources(reader)
    for folder in adapters:
        try:
            adapter = open_peft_adapter(folder)
        except InputError as exc:
            plan.refuse(str(folder), "", str(exc))  # the reason names the file
            continue
        peft_ops(adapter, base, plan, lambda key, w=str(adapter.weights): sources.shape(w, key))
    _refuse_quantized(plan, base)
    _check_tensors(plan, base, sources)
    if not plan.ops and not plan.refused:
        sources.close()
        raise InputError(f"{reader.folder}: no embedded LoRA and no --adapter given; nothing to merge" if not adapters else
                         f"{', '.join(map(str, adapters))}: no LoRA tensors in the adapter(s); nothing to merge")
    outputs = []
    for plain, key in base_of.items():
        ops = plan.ops.get(plain)
        if ops:
            link = base.link(plain) if any(op.part is not None for op in ops) else None
            outputs.append(Output(plain, (key,), lambda t, o=tuple(ops), p=plain, k=link: apply_ops(t, o, sources, k, p)))
        else:
            outputs.append(Output(plain, (key,)))
    warnings = [f"{message}; corrected: the output has {flag} = 0"
                for message, flag in zip(flag_mismatches(config, layout), _mismatched_flags(config, layout))]
    warnings += plan.notes
    native = getattr(reader, "layout_name", "original") == "native"
    update = {flag: None for flag, _family, _label in FLAGS if config.get(flag)} if native else None
    return MergePlan(outputs, plan, dict(config, use_llm_lora=0, use_backbone_lora=0), sources, base,
                     "native" if native else "original", warnings, update or None)


def _mismatched_flags(config: dict, layout: Layout) -> list[str]:
    return [flag for flag, family, _label in FLAGS if bool(config.get(flag)) != (family in layout.lora)]


def _refuse_quantized(plan: AdapterSet, base: BaseModel) -> None:
    """Changes whose base linear is stored quantized (int8 weights with SCB, ...) are refused: a
    LoRA delta cannot be added to quantized codes."""
    for key in [k for k in plan.ops if base.quantized(k)]:
        for op in plan.ops.pop(key):
            plan.refuse(op.source, f"LoRA for {base.part_name(key, op.part)!r}", quantized_base(base.quant_format))


def _check_tensors(plan: AdapterSet, base: BaseModel, sources: TensorSources) -> None:
    """Embedded factor shapes, finite scales and tensors; refusals collected, offending changes dropped.

    Every tensor of a change is checked for NaN / Inf once (TensorSources.nonfinite: an
    adapter file is read in file order, a few large reads), then the refusals are made in the
    order of the changes, as one change at a time would make them."""
    problems: dict[tuple[str, int], str | None] = {}
    wanted: dict[str, list[str]] = {}
    for key, ops in plan.ops.items():
        for number, op in enumerate(ops):
            problem = None
            if op.kind == "lora" and op.source == "embedded":
                problem = factor_shape_error(base.shape(key, None), sources.shape("embedded", op.a), sources.shape("embedded", op.b), False)
                problem = problem and f"{problem}; is the checkpoint damaged?"
            if problem is None and op.scale and not abs(op.scale) < 3.4e38:
                problem = f"its scale alpha/r = {op.scale:g} is beyond float32; check r and lora_alpha"
            problems[key, number] = problem
            if problem is None:
                wanted.setdefault(op.source, []).extend(name for name in (op.a, op.b, op.tensor) if name is not None)
    bad = {source: sources.nonfinite(source, names) for source, names in wanted.items()}
    for key in list(plan.ops):
        kept = []
        for number, op in enumerate(plan.ops[key]):
            problem = problems[key, number]
            for name in (op.a, op.b, op.tensor):
                if problem is None and name is not None and name in bad[op.source]:
                    problem = f"{name} holds NaN or Inf; the adapter is broken"
            if problem:
                plan.refuse(op.source, f"LoRA for {base.part_name(key, op.part)!r}", problem)
            else:
                kept.append(op)
        if kept:
            plan.ops[key] = kept
        else:
            del plan.ops[key]


# -- the merge itself --------------------------------------------------------------------------
def apply_ops(weight, ops: tuple[Op, ...], sources: TensorSources, link, key: str):
    """The base tensor with every change applied in order: float32, cast back to its dtype once
    (peft's residual inits and loaded full tensors are cast to it where peft casts them)."""
    import torch

    if weight.device.type == "meta":
        return weight
    dtype = weight.dtype
    if all(op.part is None and op.kind in ("lora", "embedding") for op in ops):
        return _blocked(weight, ops, sources, key)
    start = max((i for i, op in enumerate(ops) if op.kind == "replace" and op.part is None), default=None)
    if start is not None:
        weight, ops = sources.get(ops[start].source, ops[start].tensor).to(dtype), ops[start + 1:]
        if not ops:
            return _finite(weight, key)
    if all(op.part is None and op.kind == "rows" for op in ops):  # token rows: no float32 copy of the table
        out = weight.clone()
        for op in ops:
            out[list(op.indices)] = sources.get(op.source, op.tensor).to(dtype)
        return _finite(out, key)
    work = weight.float()
    for op in ops:
        if op.part is None:
            work = _apply(work, op, sources, dtype)
        else:
            parts = list(link.split(work))
            parts[op.part] = _apply(parts[op.part], op, sources, dtype)
            work = link.merge(*parts)
    if not torch.isfinite(work).all():
        raise InputError(f"merging LoRA into {key!r} gives NaN or Inf; the adapter is broken or its alpha is wrong")
    return work.to(dtype).contiguous()


def _finite(tensor, key: str):
    import torch

    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InputError(f"merging LoRA into {key!r} gives NaN or Inf; the adapter is broken or its alpha is wrong")
    return tensor


def _apply(work, op: Op, sources: TensorSources, dtype):
    """One change on a float32 tensor (a whole base tensor or one native part of it)."""
    if op.kind == "lora":
        a, b = sources.get(op.source, op.a).float(), sources.get(op.source, op.b).float()
        return work + (b @ a) * op.scale
    if op.kind == "embedding":
        a, b = sources.get(op.source, op.a).float(), sources.get(op.source, op.b).float()
        return work + (b @ a).T * op.scale
    if op.kind == "lora_bias":
        return work + sources.get(op.source, op.tensor).float() * op.scale
    if op.kind == "replace":
        return sources.get(op.source, op.tensor).to(dtype).float()
    if op.kind == "rows":
        out = work.clone()
        out[list(op.indices)] = sources.get(op.source, op.tensor).to(dtype).float()
        return out
    if op.kind == "residual":
        return residual(work.to(dtype).float(), op.init, op.rank, op.scale).to(dtype).float()
    raise AssertionError(op.kind)


def residual(weight, init: str, rank: int, scale: float):
    """The base peft rebuilds on load for PiSSA / OLoRA (LoraLayer.pissa_init / olora_init), float32.

    PiSSA: W - scale x B0 A0 with A0 = sqrt(S_r / scale) Uh_r, B0 = V_r sqrt(S_r / scale) from
    W's SVD, the same float32 operations as peft. OLoRA: W - scale x Q_r R_r, Q_r R_r the first
    r columns of W's QR times their rows of R; Q_r comes from the first r columns alone (the
    same Householder reflectors) and R_r = Q_r^T W, so a 70B-wide weight needs no full QR."""
    import torch

    if init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :rank], s[:rank] / scale, uh[:rank]
        lora_a = torch.diag(torch.sqrt(sr)) @ uhr
        lora_b = vr @ torch.diag(torch.sqrt(sr))
        return weight - scale * lora_b @ lora_a
    if init == "olora":
        q, _r = torch.linalg.qr(weight[:, :rank])
        return weight - scale * q @ (q.T @ weight)
    raise AssertionError(init)


def _blocked(weight, ops: tuple[Op, ...], sources: TensorSources, key: str):
    """W + sum of deltas, float32 per block of rows, cast back once; NaN/Inf refused.

    Blocks of about BLOCK_ELEMENTS elements in a float32 buffer reused from block to block (W's
    rows, then each B A product, scaled and added in place); the same float32 operations, in the
    same order, as W.float() + (B @ A) x scale per row (a block has at least MIN_BLOCK_ROWS rows:
    with fewer, MKL sums in another order). A scale that is a power of two multiplies
    A once instead (B (A s) == (B A) s bit for bit: every product and partial sum is scaled by
    2^k, exactly, at any LoRA magnitude). The products go through `_thin_matmul`.

    Raises InputError naming `key` and the rows when the result holds NaN or Inf."""
    import torch

    factors = []
    for op in ops:
        a, b = sources.get(op.source, op.a).float(), sources.get(op.source, op.b).float()
        scale = op.scale
        if _power_of_two(scale):
            a, scale = a * scale, None
        factors.append((a, b, scale, op.kind == "embedding", _inner_product_weight(a, op.kind)))
    rows, cols = weight.shape
    step = max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(cols, 1))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < MIN_BLOCK_ROWS:
        starts.pop()  # a ragged last block of a few rows joins the one before
    work = _scratch(min(rows, step + MIN_BLOCK_ROWS) * cols).view(-1, cols)
    out = output_like(weight)  # reused from item to item in a pipeline run
    for start, stop in zip(starts, starts[1:] + [rows]):
        block = work[: stop - start].copy_(weight[start:stop])
        for a, b, scale, transposed, a_rows in factors:
            if transposed:  # (B A).T rows start:stop
                update = torch.mm(a[:, start:stop].T, b.T)
            else:  # (B A) rows start:stop
                update = _thin_matmul(b[start:stop], a, a_rows)
            block.add_(update if scale is None else update.mul_(scale))
        merged = out[start:stop].copy_(block)
        if _nonfinite(merged):  # checked after the cast: a float16 output can overflow in it
            raise InputError(f"merging LoRA into {key!r} gives NaN or Inf (rows {start}..{stop}); "
                             "the adapter is broken or its alpha is wrong")
    return out


def _power_of_two(scale: float) -> bool:
    """Whether multiplying by `scale` is exact in float32 (a positive power of two: LoRA's usual
    alpha / r of 2, 1, 0.5, ...)."""
    import math

    return scale > 0 and math.isfinite(scale) and math.frexp(scale)[0] == 0.5


def _nonfinite(rows) -> bool:
    """Whether a block holds NaN or +-Inf: one summing pass (any NaN or Inf makes the sum NaN or
    Inf), and the exact test only when the sum is not finite (a sum can overflow where no element
    does). About 4x faster than aminmax on a 1 MiB block; float16 rows are summed in float32."""
    import math

    import torch

    total = rows.sum(dtype=torch.float32) if rows.dtype == torch.float16 else rows.sum()
    return not math.isfinite(total.item()) and not bool(torch.isfinite(rows).all())


THIN_MATMUL_MIN = 1 << 15  # outputs from which oneDNN's inner product beats MKL (its fixed cost is ~10 us)
MIN_BLOCK_ROWS = 8  # MKL's sgemm sums B A in another order for 1-3 rows (measured): no block is that small
_ONEDNN: dict[int, bool] = {}  # LoRA rank -> whether oneDNN's inner product gives torch.mm's numbers


def _inner_product_weight(a, kind: str):
    """A [r, in] as oneDNN's inner product wants it ([in, r], contiguous), when `_thin_matmul`
    will use it for this rank; else None."""
    return a.T.contiguous() if kind == "lora" and _onednn_ok(a.shape[0]) else None


def _thin_matmul(b, a, a_rows):
    """B @ A in float32, B [m, r] and A [r, n] with r the LoRA rank: a new [m, n] tensor.

    Large products go through oneDNN's inner product (torch.ops.mkldnn._linear_pointwise, the
    kernel torch.compile's CPU backend uses for a linear; `a_rows` is A.T contiguous, from
    `_inner_product_weight`), which on the AVX-512 AMD CPU of the README's benchmarks is 1.6-2x
    faster than MKL's sgemm for these thin shapes (r = 16: 128 x 2048 in 54 us instead of 97 us)
    with the same float32 results: each output is its r products accumulated in the same order.
    That equality is a property of the two kernels, not a promise, so it is checked per rank on
    a probe at first use (with r = 256 they sum in another order: that rank stays on torch.mm, as
    do small products). Called by name because torch.mm has no way to choose the kernel; a torch
    without the op gets torch.mm."""
    import torch

    if a_rows is not None and b.shape[0] * a.shape[1] >= THIN_MATMUL_MIN:
        return torch.ops.mkldnn._linear_pointwise(b, a_rows, None, "none", [], "")
    return torch.mm(b, a)


def _onednn_ok(rank: int) -> bool:
    """Whether oneDNN's inner product gives torch.mm's float32 numbers for LoRA rank `rank` (a
    probe of 64 x rank @ rank x 1024, once per rank)."""
    if rank not in _ONEDNN:
        ok = False
        try:
            import torch

            g = torch.Generator().manual_seed(rank)
            b, a = torch.randn(64, rank, generator=g), torch.randn(rank, 1024, generator=g)
            ok = torch.equal(torch.ops.mkldnn._linear_pointwise(b, a.T.contiguous(), None, "none", [], ""), torch.mm(b, a))
        except (AttributeError, RuntimeError, TypeError):
            ok = False
        _ONEDNN[rank] = ok
    return _ONEDNN[rank]


_SCRATCH = threading.local()


def _scratch(numel: int):
    """A float32 buffer of `numel` elements, kept per thread from call to call (the blocked merge's
    block buffer: no allocation, and no page faults, per tensor). Its contents are undefined; the
    largest ever asked for is kept."""
    import torch

    held = getattr(_SCRATCH, "buffer", None)
    if held is None or held.numel() < numel:
        held = _SCRATCH.buffer = torch.empty(numel, dtype=torch.float32)
    return held[:numel]


def merge_lora(source: Path, out: Path | None, *, adapters: list[Path] = (), alpha: float | None = None, max_shard_size: int = 0,
               overwrite: bool = False, progress: Callable[[int], None] | None = None, dry_run: bool = False) -> tuple[Path | None, MergePlan]:
    """Merge and write; returns the output path and the plan. `dry_run`: validate and plan only
    (refusals are in plan.refused, nothing is written). Otherwise the first refusal raises
    InputError before anything is written.

    Works on either layout: a native-layout checkpoint is merged through its original-layout
    view (models.views) and written back in the native layout."""
    with open_view(source) as reader:
        plan = plan_merge(reader, list(adapters), alpha)
        try:
            if dry_run:
                return None, plan
            if plan.refused:
                more = len(plan.refused) - 1
                raise InputError(plan.refused[0].message + (f" (and {more} more refusal{'s' * (more > 1)}; --dry-run lists them)" if more else ""))
            native = plan.layout_name == "native"
            path = run_transform(source, out, plan.outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                                 files={} if native else {"config.json": plan.config}, config_update=plan.config_update,
                                 names="original", progress=progress)
        finally:
            plan.sources.close()
    return path, plan
