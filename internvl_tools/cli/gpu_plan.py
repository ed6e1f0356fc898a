"""CLI side of multi-GPU planning: options, the per-GPU table, the does-not-fit message."""

from __future__ import annotations

from dataclasses import dataclass

import click
from rich.table import Table

from ..errors import InputError
from ..io.writer import parse_size
from ..planners.device_map import GIB, DevicePlan
from .common import human_bytes, stdout


@dataclass(frozen=True)
class GpuOptions:
    """What the user asked for with --gpus and friends."""

    gpus: int
    gpu_bytes: int
    reserve_bytes: int
    context: int
    batch: int

    def planner_kwargs(self) -> dict:
        return {"reserve_bytes": self.reserve_bytes, "context_tokens": self.context, "batch": self.batch}


def gpu_options(func):
    """Add --gpus, --gpu-memory, --reserve, --context and --batch to a command."""
    options = [
        click.option("--gpus", type=click.IntRange(1, 64), default=None, help="plan a layout over this many GPUs"),
        click.option("--gpu-memory", default="80GiB", show_default=True, help="memory of each GPU"),
        click.option("--reserve", default="2GiB", show_default=True, help="per-GPU reserve: CUDA context, allocator slack, activations"),
        click.option("--context", type=click.IntRange(min=1), default=8192, show_default=True, help="tokens of KV cache to keep room for"),
        click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="sequences of KV cache to keep room for"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def parse_gpu_options(gpus: int | None, gpu_memory: str, reserve: str, context: int, batch: int) -> GpuOptions | None:
    """Validated options, or None when --gpus was not given (then --gpu-memory, --reserve, --context
    and --batch, which only size a GPU plan, are refused when given: InputError)."""
    if gpus is None:
        ctx = click.get_current_context(silent=True)
        for name in ("gpu_memory", "reserve", "context", "batch"):
            if ctx is not None and ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None):
                raise InputError(f"--{name.replace('_', '-')} sizes a multi-GPU plan and applies only with --gpus N; "
                                 "add --gpus or remove it")
        return None
    gpu_bytes, reserve_bytes = parse_size(gpu_memory), parse_size(reserve, allow_zero=True)
    if reserve_bytes >= gpu_bytes:
        raise InputError(f"--reserve {reserve} leaves nothing of --gpu-memory {gpu_memory}; lower the reserve")
    return GpuOptions(gpus, gpu_bytes, reserve_bytes, context, batch)


def plan_json(plan: DevicePlan) -> dict:
    """A DevicePlan as JSON."""
    return {
        "fits": plan.fits,
        "gpus_needed": plan.gpus_needed,
        "gpus": [
            {"gpu": g.gpu, "layers": list(g.layers), "weight_bytes": g.weight_bytes, "kv_bytes": g.kv_bytes,
             "activation_bytes": g.activation_bytes, "reserve_bytes": g.reserve_bytes,
             "capacity_bytes": g.capacity_bytes, "free_bytes": g.free_bytes, "holds_vision": g.holds_vision}
            for g in plan.gpus
        ],
        "device_map": plan.device_map,
    }


def print_plan(plan: DevicePlan, options: GpuOptions) -> None:
    """The per-GPU table."""
    title = f"layout on {options.gpus} x {human_bytes(options.gpu_bytes)} ({options.context} tokens x {options.batch} of KV cache)"
    table = Table(title=title)
    for column in ("GPU", "holds", "layers", "weights", "KV cache", "activations + reserve", "headroom left"):
        table.add_column(column, justify="right" if column not in ("holds", "layers") else "left")
    for g in plan.gpus:
        holds = "vision, mlp1, embed, norm, head" if g.holds_vision else ""
        table.add_row(str(g.gpu), holds, _ranges(g.layers), human_bytes(g.weight_bytes), human_bytes(g.kv_bytes),
                      human_bytes(g.activation_bytes + g.reserve_bytes),
                      ("" if g.free_bytes >= 0 else "[red]") + human_bytes(g.free_bytes))
    stdout.print(table)


def does_not_fit_message(plan: DevicePlan, options: GpuOptions, alternatives: dict[str, DevicePlan]) -> str:
    """One line: how far over it is, how many GPUs would do, which quantization would fit."""
    worst = min(plan.gpus, key=lambda g: g.free_bytes)
    parts = [f"the model does not fit on {options.gpus} x {human_bytes(options.gpu_bytes)}: GPU {worst.gpu} is "
             f"{human_bytes(-worst.free_bytes)} over"]
    if plan.gpus_needed:
        parts.append(f"it needs {plan.gpus_needed} GPUs of this size")
    else:
        parts.append("no number of GPUs of this size fits (GPU 0's fixed share is too large)")
    fitting = [m for m, alt in alternatives.items() if alt.fits]
    if fitting:
        names = {"int8": "`quantize --method int8`", "int4": "`quantize --method gptq --bits 4`"}
        parts.append(f"or quantize the LLM: {names[fitting[0]]} fits on {options.gpus}")
    return "; ".join(parts)


def _ranges(layers: tuple[int, ...]) -> str:
    """Decoder layers as a count and index ranges: "2 (0-1)", "1 (#0)", "none"."""
    if not layers:
        return "none"
    spans, start, prev = [], layers[0], layers[0]
    for layer in layers[1:]:
        if layer != prev + 1:
            spans.append((start, prev))
            start = layer
        prev = layer
    spans.append((start, prev))
    text = ", ".join(f"#{a}" if a == b else f"{a}-{b}" for a, b in spans)
    return f"{len(layers)} ({text})"


__all__ = ["GIB", "GpuOptions", "gpu_options", "parse_gpu_options", "plan_json", "print_plan", "does_not_fit_message"]
