"""`internvl-tools export`: the vision tower (+ projector) to ONNX or a TensorRT engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.table import Table

from ..errors import InputError
from ..io.writer import check_output, staged_folder
from .common import byte_progress, checkpoint_folder, output_folder, console, emit_json, human_bytes, human_count, stdout


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.option("-o", "--out", type=click.Path(path_type=Path), callback=output_folder, required=True, help="output folder")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: model.onnx + model.onnx.data; tensorrt: also model.engine (needs tensorrt and a GPU)")
@click.option("--dtype", default="fp16", show_default=True, help="onnx: fp16 or fp32; tensorrt: engine precision fp16 or bf16")
@click.option("--part", type=click.Choice(["vision+projector", "vision"]), default="vision+projector", show_default=True,
              help="vision+projector: pixel_values -> LLM-ready image embeddings; vision: the tower's patch features")
@click.option("--max-batch", type=int, default=None, help="most tiles per call (default: the config's max_dynamic_patch + thumbnail)")
@click.option("--opt-batch", type=int, default=None, help="tensorrt: batch the profile is tuned for (default: --max-batch)")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset, 17 to 21")
@click.option("--workspace", type=float, default=4.0, show_default=True, help="tensorrt: builder workspace in GiB")
@click.option("--no-check", is_flag=True, help="skip the onnxruntime parity check")
@click.option("--check-segment-layers", type=int, default=0, show_default=True,
              help="check the graph in segments of N layers (bounded memory); 0: whole when it fits, else segments that fit")
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable JSON summary instead of text")
@click.pass_context
def export_cmd(ctx: click.Context, checkpoint: Path, out: Path, fmt: str, dtype: str, part: str, max_batch: int | None,
               opt_batch: int | None, opset: int, workspace: float, no_check: bool, check_segment_layers: int, overwrite: bool,
               as_json: bool) -> None:
    """Export CHECKPOINT's vision tower and projector: pixel_values [batch, 3, S, S] -> image embeddings.

    Weights stream tensor by tensor into external data (memory: about the largest tensor);
    the graph has a dynamic batch; the result is checked with onnx.checker and onnxruntime."""
    from ..export.tensorrt_engine import ENGINE_FILE, ONNX_DTYPE, PRECISIONS, build_engine, import_tensorrt, plan_engine
    from ..export.vision_onnx import (META_FILE, MODEL_FILE, available_memory, check_mode, default_max_batch, export_onnx,
                                      parity, parity_segments, plan_export, segment_memory_needed)

    if fmt != "tensorrt":  # options that only shape the TensorRT engine are refused, not ignored
        for name in ("opt_batch", "workspace"):
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None):
                raise InputError(f"--{name.replace('_', '-')} applies to --format tensorrt (the engine build); "
                                 f"--format {fmt} does not use it: remove it")
    check_output(out, [checkpoint], overwrite)
    for module in ("onnx",) if no_check else ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"export needs the {module} package: pip install 'internvl-tools[onnx]'"
                             + ("" if module == "onnx" else " (or pass --no-check to skip the onnxruntime parity check)")) from None
    if fmt == "tensorrt" and dtype not in PRECISIONS:
        raise InputError(f"--dtype {dtype} is not a TensorRT engine precision; choose fp16 or bf16")
    trt = import_tensorrt() if fmt == "tensorrt" else None  # fail before any work
    plan = plan_export(checkpoint, part, ONNX_DTYPE[dtype] if fmt == "tensorrt" else dtype, opset)
    if max_batch is None:
        max_batch = default_max_batch(plan.config)
    if max_batch < 1:
        raise InputError(f"--max-batch {max_batch} must be at least 1")
    engine_plan = plan_engine(dtype, "pixel_values", plan.shape.image_size, max_batch, opt_batch, workspace) if trt else None
    started = time.perf_counter()
    failed = False
    with staged_folder(out) as folder:
        with byte_progress(f"writing {plan.graph.dtype} ONNX weights", plan.weight_bytes, enabled=not as_json) as advance:
            meta = export_onnx(plan, folder, max_batch, advance)
        if no_check:
            meta["parity"] = {"skipped": "--no-check"}
        else:
            if check_segment_layers < 0:
                raise InputError(f"--check-segment-layers {check_segment_layers} must be 0 (automatic) or more")
            have = available_memory()
            mode, layers = check_mode(plan, have, check_segment_layers)
            batches = [1, 3]  # the graph is batch-dynamic whatever --max-batch says
            if mode == "skip":
                need = segment_memory_needed(plan, 1)
                meta["parity"] = {"skipped": f"even one layer at a time the check needs about {human_bytes(need)} and "
                                             f"{human_bytes(have)} is available; run it on a larger machine or pass --no-check"}
            else:
                if not as_json:
                    how = "whole" if mode == "full" else f"in segments of {layers} layer(s), one segment in memory at a time"
                    console.print(f"checking onnxruntime against the PyTorch forward ({how}) ...")
                if mode == "full":
                    meta["parity"] = parity(plan, folder / MODEL_FILE, batches)
                else:
                    meta["parity"] = parity_segments(plan, folder, batches, layers)
                failed = not all(row["passed"] for row in meta["parity"])
        if engine_plan is not None:
            if not as_json:
                console.print(f"building the TensorRT {dtype} engine (batch 1..{max_batch}) ...")
            engine_started = time.perf_counter()
            size = build_engine(engine_plan, folder / MODEL_FILE, folder / ENGINE_FILE, trt)
            meta["engine"] = {"file": ENGINE_FILE, "precision": dtype, "bytes": size, "min_shape": list(engine_plan.min_shape),
                              "opt_shape": list(engine_plan.opt_shape), "max_shape": list(engine_plan.max_shape),
                              "seconds": round(time.perf_counter() - engine_started, 3)}
        meta["seconds"] = round(time.perf_counter() - started, 3)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    summary = {"out": str(out), "format": fmt, **meta}
    if as_json:
        emit_json(summary)
    else:
        print_summary(summary, plan, out)
    if failed:
        click.echo(f"error: {out}: the ONNX output differs from the PyTorch forward beyond the tolerance (see the parity table); "
                   "the export is kept for inspection", err=True)
        ctx.exit(1)


def print_summary(summary: dict, plan, out: Path) -> None:
    """Files, shapes and the parity table."""
    from ..export.tensorrt_engine import plan_engine
    from ..export.vision_onnx import MODEL_FILE

    stdout.print(f"wrote {out}: {summary['part']} {summary['dtype']} ONNX, {human_count(summary['params'])} parameters, "
                 f"{human_bytes(summary['weight_bytes'])} of weights in {summary['seconds']:.1f} s")
    stdout.print(f"  {summary['input']['name']} {summary['input']['shape']} -> {summary['output']['name']} {summary['output']['shape']} "
                 f"({summary['tokens_per_tile']} tokens per tile, pixel shuffle {summary['ps_version']})")
    parity_rows = summary["parity"]
    if isinstance(parity_rows, dict):
        stdout.print(f"  parity check skipped: {parity_rows['skipped']}")
    else:
        mode = parity_rows[0].get("mode")
        table = Table(title="onnxruntime vs PyTorch (fp32)" + (f", {mode}, worst segment shown" if mode else ""))
        for column in ("batch", "max abs error", "relative error", "tolerance", "result"):
            table.add_column(column, justify="right")
        for row in parity_rows:
            table.add_row(str(row["batch"]), f"{row['max_abs_error']:.3g}", f"{row['relative_error']:.3g}", f"{row['tolerance']:g}",
                          "[green]pass[/green]" if row["passed"] else "[red]FAIL[/red]")
        stdout.print(table)
    if "engine" in summary:
        engine = summary["engine"]
        stdout.print(f"  TensorRT {engine['precision']} engine {engine['file']}: {human_bytes(engine['bytes'])}, "
                     f"batch {engine['min_shape'][0]}..{engine['max_shape'][0]}, built in {engine['seconds']:.1f} s")
    elif summary["format"] == "onnx":
        hint = plan_engine("fp16", summary["input"]["name"], summary["image_size"], summary["max_batch"])
        # one unwrapped line, so that it pastes into a shell as it is
        stdout.print(f"  TensorRT on a GPU machine: {hint.trtexec_command(str(out / MODEL_FILE), str(out / 'model.engine'))}",
                     soft_wrap=True, highlight=False, markup=False)
