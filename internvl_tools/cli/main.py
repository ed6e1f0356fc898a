"""The `internvl-tools` command line: thin commands over the library."""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from pathlib import Path

import click
from rich.table import Table

from .. import __version__
from ..models.families import FAMILIES
from ..models.layout import build_layout
from ..errors import InputError
from ..io.reader import CheckpointReader
from ..io.writer import check_apart, check_output, parse_size
from ..formats.views import open_view
from ..planners.gpu_layout import native_device_map, order_by_gpu, plan_for_checkpoint
from ..evaluate.inspect import summarize
from ..transforms.shard import reshard
from .gpu_plan import GpuOptions, does_not_fit_message, gpu_options, parse_gpu_options, plan_json, print_plan
from .common import STOP, ToolGroup, fast_exit, import_torch, interrupted_line, stop_handler, stop_signals, checkpoint_folder, group_size, output_folder, regexes, pipeline_log, byte_progress, layer_progress, emit_json, human_bytes, human_count, stdout

SIZE_HELP = "largest shard, e.g. 5GB, 500MB, 2GiB"


@click.group(cls=ToolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks instead of one-line errors")
@click.option("--follow-symlinks", is_flag=True,
              help="read shards that are symlinks to files outside the checkpoint folder (refused by default)")
@click.version_option(__version__)
@click.pass_context
def cli(ctx: click.Context, debug: bool, follow_symlinks: bool) -> None:
    """Convert, shard and quantize InternVL checkpoints with bounded memory."""
    ctx.obj = {"debug": debug}
    CheckpointReader.follow_symlinks = follow_symlinks


@cli.command("inspect")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.option("--json", "as_json", is_flag=True, help="print a JSON report")
@gpu_options
def inspect_cmd(checkpoint: Path, as_json: bool, **gpu_args) -> None:
    """Show family, towers, dtypes, sizes, LoRA and memory needs of CHECKPOINT (--gpus N: its GPU layout)."""
    report = summarize(checkpoint)
    options = parse_gpu_options(**gpu_args)
    plan = None
    if options:
        plan, alternatives, _layout = _plan(checkpoint, options)
        report["gpu_plan"] = plan_json(plan)
    if as_json:
        emit_json(report)
    else:
        print_report(report)
        if plan:
            print_plan(plan, options)
            if not plan.fits:
                stdout.print(does_not_fit_message(plan, options, alternatives))


def _plan(checkpoint: Path, options: GpuOptions):
    """The GPU plan of a checkpoint, the plans of its quantized versions when it does not fit, its layout."""
    with open_view(checkpoint) as view:
        config = view.config()
        layout = build_layout(config, view.specs())
        plan, _sizes, alternatives = plan_for_checkpoint(view, config, layout, options.gpus, options.gpu_bytes,
                                                         **options.planner_kwargs())
        if view.layout_name == "native":  # device_map.json in the module names from_pretrained sees
            plan = native_device_map(plan, layout)
            groups = order_by_gpu(layout, plan, view)
        else:
            groups = order_by_gpu(layout, plan)
        return plan, alternatives, groups


def finish(summary: dict, as_json: bool, line: str) -> None:
    """End a command: the JSON summary, or one human line."""
    if as_json:
        emit_json(summary)
    else:
        stdout.print(line)


def print_report(report: dict) -> None:
    """Render an inspect report as tables."""
    vision, llm = report["vision"], report["llm"]
    table = Table(title=f"{report['path']}: {report['family']}", show_header=False)
    table.add_row("template / pixel shuffle", f"{report['template']} / {report['ps_version']}")
    table.add_row("vision", f"{vision['style']}: width {vision['hidden_size']}, {vision['layers']} layers, {vision['heads']} heads, "
                            f"MLP {vision['intermediate_size']}, select_layer {vision['select_layer']}, "
                            f"{vision['image_size']}px tiles -> {vision['tokens_per_tile']} tokens")
    table.add_row("llm", f"{llm['architecture']} ({llm['dialect']}): width {llm['hidden_size']}, {llm['layers']} layers, "
                         f"{llm['heads']} heads / {llm['kv_heads']} kv, MLP {llm['intermediate_size']}, vocab {llm['vocab_size']}")
    if llm.get("experts"):  # a sparse LLM (Qwen3-MoE)
        moe = llm["experts"]
        table.add_row("experts", f"{moe['count']} per layer x {moe['sparse_layers']} layers, top-{moe['top_k']}"
                                 f"{' renormalised' if moe['norm_topk_prob'] else ''}, width {moe['intermediate_size']}: "
                                 f"{human_count(moe['params'])} params ({human_bytes(moe['bytes'])}), "
                                 f"{human_count(moe['active_params'])} active per token; router kept unquantized")
    table.add_row("tensors / shards", f"{report['tensors']} in {report['shards']} shard(s)")
    table.add_row("dtypes", ", ".join(f"{k}: {v['tensors']} ({human_bytes(v['bytes'])})" for k, v in report["dtypes"].items()))
    sizes = report["bytes"]
    params = report["params"]
    for family in ("vision", "projector", "llm"):
        if family in sizes:
            table.add_row(f"{family}", f"{human_bytes(sizes[family])}, {human_count(params.get(family, 0))} params")
    table.add_row("total", f"{human_bytes(sizes['total'])}, {human_count(params['total'])} params")
    if "active" in params:
        table.add_row("active per token", f"{human_count(params['active'])} params (top-k experts + attention, embeddings, head, vision)")
    layers = report["llm_layer_bytes"]
    if layers:
        table.add_row("per decoder layer", f"{human_bytes(min(layers))} .. {human_bytes(max(layers))}")
    big = report["largest_tensor"]
    table.add_row("largest tensor", f"{big['name']} {big['shape']} ({human_bytes(big['bytes'])})")
    for family, lora in report["lora"].items():
        table.add_row(f"LoRA ({family})", f"rank {lora['rank']} (alpha {lora['alpha']}) on {lora['modules']} modules: "
                                          f"{', '.join(lora['targets'])}; config flag {lora['config_flag']}")
    if not report["lora"]:
        table.add_row("LoRA", "none")
    for mismatch in report.get("lora_flags", []):
        table.add_row("LoRA flag mismatch", mismatch)
    if report["quantization"]:
        table.add_row("quantization", ", ".join(f"{k}={v}" for k, v in report["quantization"].items()))
    if report.get("calibration"):
        from ..calibrate.samples import describe

        table.add_row("calibrated on", describe(report["calibration"]))
    if report["memory_estimate"]:
        mem = report["memory_estimate"]
        table.add_row("weights in memory", f"bf16 {human_bytes(mem['bf16'])}, LLM int8 {human_bytes(mem['int8'])}, "
                                           f"LLM GPTQ int4 g128 {human_bytes(mem['int4_g128'])} (vision stays bf16)")
    stdout.print(table)


def _family_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """make-tiny's FAMILY: a name of FAMILIES, any case, or the hub's spelling (models.families.get_family)."""
    from ..models.families import get_family

    try:
        return get_family(value).name
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="FAMILY") from None


@cli.command("make-tiny")
@click.argument("family", metavar="FAMILY", callback=_family_name)
@click.argument("out", type=click.Path(path_type=Path), callback=output_folder)
@click.option("--lora", type=click.Choice(["none", "embedded", "embedded-llm", "embedded-vision", "peft"]), default="none",
              show_default=True, help="embed InternVL-style LoRA (peft-wrapped keys, alpha = 2r) in the LLM and/or vision tower; "
              "peft: also write a PEFT adapter for the bare LLM in OUT-peft-adapter/")
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True, help="LoRA rank")
@click.option("--shards", type=click.IntRange(min=1), default=2, show_default=True, help="number of shards")
@click.option("--wide", is_flag=True, help="the family's true widths with 2 layers per tower (benchmarks; GBs)")
@click.option("--llm-layers", type=click.IntRange(min=1), default=None,
              help="with --wide: LLM decoder layers instead of 2 (a MoE layer of InternVL3.5-30B-A3B is 1.2 GB)")
@click.option("--seed", default=0, show_default=True)
@click.option("--head-dim", type=click.IntRange(min=2), default=None,
              help="channels per LLM attention head (tiny default 16; vLLM's CPU attention takes 32, 64, 80, ...): the width becomes heads x this")
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable JSON summary instead of text")
def make_tiny_cmd(family: str, out: Path, lora: str, rank: int, shards: int, wide: bool, llm_layers: int | None, seed: int,
                  head_dim: int | None, overwrite: bool, as_json: bool) -> None:
    """Write a random-weight checkpoint of FAMILY with its real key layout, config and tokenizer.

    FAMILY: InternVL-Chat-V1-1/-V1-2/-V1-2-Plus, InternVL2-1B ... InternVL2-Llama3-76B, InternVL2.5-1B ... -78B,
    InternVL3-1B ... -78B, InternVL3-9B-InternLM3, InternVL3.5-1B ... -38B, InternVL3.5-30B-A3B; any case,
    or as the hub spells them (OpenGVLab/InternVL2_5-8B)."""
    from ..tiny.generator import make_checkpoint, make_peft_adapter

    started = time.perf_counter()
    if lora == "none" and click.get_current_context().get_parameter_source("rank") != click.core.ParameterSource.DEFAULT:
        raise InputError("--rank sets the rank of the LoRA that --lora adds; it does not apply without --lora "
                         "(embedded, embedded-llm, embedded-vision or peft): add --lora or remove --rank")
    if llm_layers is not None and not wide:
        raise InputError("--llm-layers sets the depth of a --wide checkpoint (tiny ones have the family's own small depth): "
                         "add --wide or remove --llm-layers")
    with byte_progress("generating", 0, enabled=wide and not as_json) as advance:
        if head_dim is not None and (wide or head_dim % 2):
            raise InputError("--head-dim takes an even number and applies to tiny checkpoints (not --wide)")
        if lora == "peft":  # OUT-peft-adapter/ is an output too: never written over silently
            check_output(out.with_name(out.name + "-peft-adapter"), [], overwrite)
        path = make_checkpoint(family, out, lora="none" if lora == "peft" else lora, rank=rank, shards=shards, wide=wide, seed=seed,
                               overwrite=overwrite, progress=advance, head_dim=head_dim, llm_layers=llm_layers or 2,
                               planned_bytes=getattr(advance, "set_total", None))
    if lora == "peft":
        adapter = make_peft_adapter(path, path.with_name(path.name + "-peft-adapter"), rank=rank, alpha=2 * rank, seed=seed + 1)
        stdout.print(f"wrote PEFT adapter {adapter}")
    report = summarize(path)
    summary = {"out": str(path), "family": family, "tensors": report["tensors"], "shards": report["shards"],
               "bytes": report["bytes"]["total"], "seconds": round(time.perf_counter() - started, 2)}
    finish(summary, as_json, f"wrote {path}: {family}{' (wide)' if wide else ''}, {summary['tensors']} tensors, "
                             f"{summary['shards']} shard(s), {human_bytes(summary['bytes'])} in {summary['seconds']} s")


@cli.command("shard")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.option("-o", "--out", type=click.Path(path_type=Path), callback=output_folder, help="output folder (not needed with --plan-only)")
@click.option("--max-shard-size", default="5GB", show_default=True, help=SIZE_HELP)
@gpu_options
@click.option("--plan-only", is_flag=True, help="print the GPU layout and write nothing")
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable JSON summary instead of text")
def shard_cmd(checkpoint: Path, out: Path | None, max_shard_size: str, plan_only: bool, overwrite: bool, as_json: bool, **gpu_args) -> None:
    """Re-shard CHECKPOINT into OUT losslessly; with --gpus N also plan a multi-GPU layout.

    With --gpus, OUT gets device_map.json (for from_pretrained(OUT, device_map=...)) and its
    shards are grouped so that no shard file holds weights of two GPUs.
    """
    limit = parse_size(max_shard_size)
    options = parse_gpu_options(**gpu_args)
    if plan_only and not options:
        raise InputError("--plan-only needs --gpus N")
    if out is None and not plan_only:
        raise InputError("missing -o/--out OUT: the folder to write (or pass --plan-only with --gpus)")
    summary: dict = {}
    groups = files = None
    if options:
        plan, alternatives, ordered = _plan(checkpoint, options)
        summary["gpu_plan"] = plan_json(plan)
        if not as_json:
            print_plan(plan, options)
        if not plan.fits:
            if as_json:
                emit_json(summary)
            raise InputError(does_not_fit_message(plan, options, alternatives))
        if plan_only:
            if as_json:
                emit_json(summary)
            return
        groups = ordered
        files = {"device_map.json": plan.device_map}
    check_output(out, [checkpoint], overwrite)
    total = summarize(checkpoint)["bytes"]["total"]
    started = time.perf_counter()
    with byte_progress("re-sharding", total, enabled=not as_json) as advance:
        result = reshard(checkpoint, out, max_shard_size=limit, groups=groups, files=files, overwrite=overwrite, progress=advance)
    seconds = time.perf_counter() - started
    summary.update({"out": str(result.out), "shards": result.shards, "tensors": result.tensors, "bytes": result.bytes,
                    "seconds": round(seconds, 3), "throughput_mb_s": round(result.bytes / max(seconds, 1e-9) / 1e6, 1)})
    if as_json:
        emit_json(summary)
    else:
        extra = " and device_map.json" if files else ""
        stdout.print(f"wrote {result.out}: {result.tensors} tensors in {result.shards} shard(s){extra}, "
                     f"{human_bytes(result.bytes)} in {seconds:.1f} s ({summary['throughput_mb_s']} MB/s)")


@cli.command("convert")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.option("-o", "--out", type=click.Path(path_type=Path), callback=output_folder, required=True, help="output folder")
@click.option("--to", "target", type=click.Choice(["hf", "original"]), default="hf", show_default=True,
              help="hf: transformers-native InternVLForConditionalGeneration; original: back to the remote-code layout")
@click.option("--max-shard-size", default="5GB", show_default=True, help=SIZE_HELP)
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable JSON summary instead of text")
def convert_cmd(checkpoint: Path, out: Path, target: str, max_shard_size: str, overwrite: bool, as_json: bool) -> None:
    """Convert CHECKPOINT between the original and the transformers-native layout, streaming."""
    from ..transforms.convert import to_hf, to_original

    limit = parse_size(max_shard_size)
    check_output(out, [checkpoint], overwrite)
    with CheckpointReader(checkpoint) as reader:
        total = reader.total_bytes
    started = time.perf_counter()
    with byte_progress(f"converting to {target}", total, enabled=not as_json) as advance:
        convert = to_hf if target == "hf" else to_original
        path = convert(checkpoint, out, max_shard_size=limit, overwrite=overwrite, progress=advance)
    seconds = time.perf_counter() - started
    with CheckpointReader(path) as reader:
        summary = {"out": str(path), "to": target, "tensors": len(reader), "shards": len(reader.shards),
                   "bytes": reader.total_bytes, "seconds": round(seconds, 3)}
    finish(summary, as_json, f"wrote {path} ({target} layout): {summary['tensors']} tensors in {summary['shards']} shard(s), "
                             f"{human_bytes(summary['bytes'])} in {seconds:.1f} s")


@cli.command("quantize")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.option("-o", "--out", type=click.Path(path_type=Path), callback=output_folder, required=True, help="output folder")
@click.option("--method", type=click.Choice(["int8", "gptq", "awq"]), default=None,
              help="int8: LLM.int8() weights; gptq / awq: layer-by-layer GPTQ / AWQ with multimodal calibration")
@click.option("--recipe", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="YAML file of option values (recipes/)")
@click.option("--format", "fmt", type=click.Choice(["bnb", "gptq", "awq", "compressed-tensors", "w8a8"]), default=None,
              help="int8: bnb (default; bitsandbytes load_in_8bit layout), compressed-tensors (vLLM's W8A16) or w8a8 "
                   "(compressed-tensors int-quantized: int8 weights per channel, int8 activations per token); gptq: gptq "
                   "(default; GPTQ v1) or compressed-tensors; awq: awq (default; AutoAWQ gemm) or compressed-tensors "
                   "(pack-quantized W4A16, symmetric, per group)")
@click.option("--only", multiple=True, callback=regexes, help="int8: regex, quantize only weights whose key matches (repeatable)")
@click.option("--skip", multiple=True, callback=regexes, help="int8: regex, leave weights whose key matches unquantized (repeatable)")
@click.option("--force", is_flag=True, help="allow a vision-tower selection below 8 bits")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True, help="gptq (awq: 4 only)")
@click.option("--group-size", type=int, default=128, callback=group_size, show_default=True,
              help="gptq / awq: inputs per scale group (gptq: -1 per row)")
@click.option("--desc-act", is_flag=True, help="gptq: act-order (columns by decreasing Hessian diagonal; g_idx follows)")
@click.option("--act-group-aware/--no-act-group-aware", default=True, show_default=True,
              help="gptq: GAR, quantize whole groups by importance (static groups, so every loader reads it); off with --desc-act")
@click.option("--sym/--asym", default=True, show_default=True, help="gptq: symmetric or asymmetric zero points")
@click.option("--zero-point/--no-zero-point", default=None,
              help="awq: asymmetric codes with zero points (default for --format awq) or symmetric ones (the only "
                   "choice for --format compressed-tensors)")
@click.option("--damp", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True, help="gptq: dampening, fraction of the mean Hessian diagonal")
@click.option("--calib", type=click.Path(path_type=Path, exists=True),
              help="gptq / awq: in-domain calibration data, the files verify --bench reads: a VLMEvalKit .tsv, a .jsonl "
                   "(verify rows, prompts, texts or InternVL conversations), or a folder of them with their images "
                   "(default: the built-in set of photos, documents, charts, tables, text-in-image, multi-turn and "
                   "English/Chinese text)")
@click.option("--num-samples", type=click.IntRange(min=1), default=128, show_default=True, help="gptq / awq: calibration samples")
@click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True, help="gptq / awq: tokens per sample at most")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="gptq / awq: where layers run")
@click.option("--forward-dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="gptq / awq: dtype of the decoder layers' calibration forwards (auto: bf16 where the device computes it "
                   "natively, CUDA or a CPU with AVX512-BF16/AMX, else fp32); Hessians and the quantizer's math stay fp32")
@click.option("--resume", is_flag=True, help="gptq / awq: continue an interrupted run from its last finished layer")
@click.option("--max-shard-size", default="5GB", show_default=True, help=SIZE_HELP)
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable JSON summary instead of text")
@click.pass_context
def quantize_cmd(ctx: click.Context, checkpoint: Path, out: Path, recipe: Path | None, as_json: bool, **options) -> None:
    """Quantize the LLM of CHECKPOINT (the vision tower, mlp1, embeddings and head stay as they are)."""
    from_recipe: set[str] = set()
    if recipe:
        options, from_recipe = apply_recipe(ctx, recipe, options)
    if options["method"] is None:
        raise InputError("missing --method: int8, gptq or awq (or a --recipe that sets it)")
    _refuse_options_of_other_methods(ctx, options, from_recipe, recipe)
    options["fmt"] = _output_format(options["method"], options["fmt"])
    limit = parse_size(options["max_shard_size"])
    inputs = [checkpoint, options["calib"], recipe]  # -o must not replace calibration data either
    if not options["resume"]:
        check_output(out, inputs, options["overwrite"])
    else:
        check_apart(out, inputs, "output", replaced=True)
    if options["resume"] and out.is_dir() and any(out.iterdir()) and not out.with_name(out.name + ".partial").exists():
        raise InputError(f"{out} is already complete: there is no {out.name}.partial to resume; "
                         "pass --overwrite (without --resume) to redo it")
    with CheckpointReader(checkpoint) as reader:
        total = reader.total_bytes
    started = time.perf_counter()
    if options["method"] in ("gptq", "awq"):
        # SIGTERM (a scheduler's kill, `timeout`) stops as Ctrl-C does, once (common.stop_handler: a
        # second signal during the cleanup is told, not raised)
        previous = signal.signal(signal.SIGTERM, stop_handler) if threading.current_thread() is threading.main_thread() else None
        try:
            summary = (_run_gptq if options["method"] == "gptq" else _run_awq)(checkpoint, out, options, limit, as_json)
        except KeyboardInterrupt:
            stopped = STOP["signal"] == signal.SIGTERM
            if out.with_name(out.name + ".partial").is_dir():
                click.echo(f"\n{'terminated' if stopped else 'interrupted'}: {out.name}.partial keeps the finished layers; run "
                           "the same command with --resume to continue from there", err=True)
            else:
                click.echo(f"\n{interrupted_line()}", err=True)
            ctx.exit(143 if stopped else 130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    else:
        summary = _run_int8(checkpoint, out, options, limit, total, as_json)
    summary.update({"bytes_in": total, "seconds": round(time.perf_counter() - started, 3)})
    if options["method"] in ("gptq", "awq"):
        _add_calibration(summary, out)
    with CheckpointReader(out) as reader:
        summary["bytes_out"] = reader.total_bytes
    if as_json:
        emit_json(summary)
    else:
        stdout.print(f"wrote {out} ({options['method']}): {human_bytes(total)} -> {human_bytes(summary['bytes_out'])} "
                     f"in {summary['seconds']:.1f} s; {summary['detail']}")


# the methods each quantize option applies to (options not listed apply to all)
OPTION_METHODS = {
    "only": ("int8",), "skip": ("int8",), "force": ("int8",),
    "bits": ("gptq", "awq"), "group_size": ("gptq", "awq"), "desc_act": ("gptq",), "act_group_aware": ("gptq",),
    "sym": ("gptq",), "damp": ("gptq",), "zero_point": ("awq",), "calib": ("gptq", "awq"), "num_samples": ("gptq", "awq"),
    "seq_len": ("gptq", "awq"), "device": ("gptq", "awq"), "resume": ("gptq", "awq"),
    "forward_dtype": ("gptq", "awq"),
}


def _refuse_options_of_other_methods(ctx: click.Context, options: dict, from_recipe: set[str] = frozenset(),
                                     recipe: Path | None = None) -> None:
    """An option given on the command line, or set by the --recipe, that the chosen method ignores
    is an error, not a no-op."""
    method = options["method"]
    for name, methods in OPTION_METHODS.items():
        source = ctx.get_parameter_source(name)
        given = source not in (click.core.ParameterSource.DEFAULT, None)
        if method not in methods and (given or name in from_recipe):
            flag = "--" + name.replace("_", "-")
            param = next((p for p in ctx.command.params if p.name == name), None)
            if given and param is not None and getattr(param, "secondary_opts", None) and options[name] is False:
                flag = param.secondary_opts[0]  # the flag typed: --asym, --no-act-group-aware, --no-zero-point
            if given and name in ("only", "skip") and method == "gptq":
                continue  # _run_gptq explains the vision-tower case itself
            where = "" if given else f" (set by the recipe {recipe})"
            raise InputError(f"{flag}{where} does not apply to --method {method} (it is for --method {' / '.join(methods)}); "
                             + ("remove it" if given else "use a recipe for this method, or drop --recipe"))


def apply_recipe(ctx: click.Context, recipe: Path, options: dict) -> tuple[dict, set[str]]:
    """Recipe values for every option left at its default (command-line values win), and the
    names the recipe set. A recipe whose `method` differs from the command line's --method is
    refused (InputError): its other values are that method's."""
    import yaml

    try:
        values = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())  # PyYAML's messages run over several lines
        raise InputError(f"{recipe}: not valid YAML ({where}{reason})") from exc
    if not isinstance(values, dict):
        raise InputError(f"{recipe}: not a mapping of quantize options (method: gptq, bits: 4, ...)")
    merged, applied = dict(options), set()
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in options:
            raise InputError(f"{recipe}: unknown option {key!r}; recipes set quantize options such as method, bits, group_size")
        if ctx.get_parameter_source(name) in (click.core.ParameterSource.DEFAULT, None):
            param = next(p for p in ctx.command.params if p.name == name)
            try:  # the option's own type and range checks (bits: 4 or 8, group_size, damp > 0, ...)
                merged[name] = param.process_value(ctx, str(value) if name == "bits" else value)
            except click.BadParameter as exc:
                raise InputError(f"{recipe}: {key}: {exc.format_message()}") from exc
            applied.add(name)
        elif name == "method" and value != options["method"]:
            raise InputError(f"--method {options['method']} conflicts with the recipe {recipe} (method: {value}); its other "
                             f"values are for {value}: drop --method, or use a recipe for --method {options['method']}")
    return merged, applied


VISION_BELOW_8 = ("quantizing the vision tower below 8 bits is refused: InternViT-6B produces nonsense under 4-bit "
                  "(the model cards say so); keep it bf16")


OUTPUT_FORMATS = {"int8": ("bnb", "compressed-tensors", "w8a8"), "gptq": ("gptq", "compressed-tensors"), "awq": ("awq", "compressed-tensors")}


def _output_format(method: str, fmt: str | None) -> str:
    """The --format of a method (its own format when not given); InputError for one it cannot write."""
    choices = OUTPUT_FORMATS[method]
    if fmt is None:
        return choices[0]
    if fmt not in choices:
        raise InputError(f"--method {method} writes --format {' or '.join(choices)}, not {fmt}")
    return fmt


def _check_calibrated(options: dict, method: str) -> None:
    """Options a calibrated method (GPTQ, AWQ) refuses: --only/--skip, --device cuda without CUDA."""
    import torch

    if options["only"] or options["skip"]:
        if any(re.search(p, "vision_model.encoder.layers.0.attn.qkv.weight") for p in options["only"]):
            raise InputError(VISION_BELOW_8 + (f"; {method} of the vision tower is not supported even with --force" if options["force"] else ""))
        raise InputError(f"--only/--skip apply to --method int8; {method} quantizes every linear of the LLM's decoder layers")
    if options["device"] == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu")


def _llm_layers(checkpoint: Path) -> int:
    with open_view(checkpoint) as view:
        return view.config().get("llm_config", {}).get("num_hidden_layers", 0)


def _add_calibration(summary: dict, out: Path) -> None:
    """The calibration record quantize wrote into OUT/config.json, in the summary and its line."""
    import json

    from ..calibrate.samples import describe

    record = json.loads((out / "config.json").read_text(encoding="utf-8")).get("quantization_calibration")
    if record:
        summary["calibration"] = record
        summary["detail"] += f"; calibrated on {describe(record)}"


def _warnings_only(line: str) -> None:
    if line.startswith("warning:"):
        click.echo(line, err=True)


GPTQ_EXPERTS_NOTE = ("transformers (with optimum + gptqmodel) cannot load gptq-format experts: it converts nn.Linear "
                     "modules only and Qwen3-MoE's experts are fused 3-D parameters there; the output is for vLLM and this "
                     "toolkit's runtime (chat, verify); --format compressed-tensors gives experts that transformers loads")


def _run_gptq(checkpoint: Path, out: Path, options: dict, limit: int, as_json: bool) -> dict:
    from ..calibrate.gptq_quantizer import GPTQJob, GPTQQuantizer, quantize_gptq
    from ..calibrate.gptq import GPTQConfig

    _check_calibrated(options, "GPTQ")
    config = GPTQConfig(bits=int(options["bits"]), group_size=options["group_size"], sym=options["sym"],
                        desc_act=options["desc_act"], damp=options["damp"],
                        act_group_aware=options["act_group_aware"] and not options["desc_act"])
    job = GPTQJob(config, fmt=options["fmt"], num_samples=options["num_samples"], seq_len=options["seq_len"],
                  calib=str(options["calib"]) if options["calib"] else None, device=options["device"],
                  forward_dtype=options["forward_dtype"])
    layers = _llm_layers(checkpoint)
    quantizer = GPTQQuantizer(config, options["fmt"])
    with pipeline_log(enabled=not as_json) as log, layer_progress("GPTQ", layers, enabled=not as_json) as advance:
        quantize_gptq(checkpoint, out, job, max_shard_size=limit, overwrite=options["overwrite"], resume=options["resume"],
                      progress=advance, log=log, quantizer=quantizer)
    experts = quantizer.summary().get("experts")  # a sparse LLM: experts calibrated on their routed tokens, or RTN
    if experts:
        # transformers 5.24 + optimum + gptqmodel 7.7 replace nn.Linear modules only: a gptq-format expert's qweight is
        # "unexpected" and the fused Qwen3MoeExperts parameters stay "missing"; compressed-tensors' loader fills them
        experts["note"] = GPTQ_EXPERTS_NOTE if options["fmt"] == "gptq" else None
        if experts["note"]:
            click.echo(f"warning: {experts['note']}", err=True)
    return {"out": str(out), "method": "gptq", "format": options["fmt"], "bits": config.bits, "group_size": config.group_size,
            "sym": config.sym, "desc_act": config.desc_act, "layers": layers, **({"experts": experts} if experts else {}),
            "detail": f"{layers} decoder layers in GPTQ {config.bits}-bit, group {config.group_size}, {'sym' if config.sym else 'asym'} "
                      f"({options['fmt']})" + (f"; experts: {experts['gptq']} with GPTQ on their routed tokens, "
                                               f"{experts['round_to_nearest']} with round-to-nearest (fewer than "
                                               f"{experts['min_tokens_share']:.1%} of the calibration tokens); "
                                               f"routers kept unquantized: {ROUTERS_KEPT}" if experts else ""),
            **({"kept_routers": ROUTERS_KEPT} if experts else {})}


AWQ_EXPERTS_NOTE = ("transformers (with gptqmodel's AWQ kernels) cannot load awq-format experts: it converts nn.Linear "
                    "modules only and Qwen3-MoE's experts are fused 3-D parameters there; the output is for this toolkit's "
                    "runtime (chat, verify) and vLLM's AWQ MoE method (not run here); --format compressed-tensors "
                    "--no-zero-point gives experts that transformers loads")


def _run_awq(checkpoint: Path, out: Path, options: dict, limit: int, as_json: bool) -> dict:
    from ..calibrate.awq import AWQConfig
    from ..calibrate.awq_quantizer import AWQJob, AWQQuantizer, llm_facts, quantize_awq

    _check_calibrated(options, "AWQ")
    if options["desc_act"]:
        raise InputError("--desc-act applies to --method gptq; AWQ keeps the input order")
    zero_point = options["zero_point"] if options["zero_point"] is not None else options["fmt"] == "awq"
    config = AWQConfig(bits=int(options["bits"]), group_size=options["group_size"], zero_point=zero_point)
    job = AWQJob(config, fmt=options["fmt"], num_samples=options["num_samples"], seq_len=options["seq_len"],
                 calib=str(options["calib"]) if options["calib"] else None, device=options["device"],
                  forward_dtype=options["forward_dtype"])
    dialect, head_dim = llm_facts(checkpoint)
    if dialect is None:
        raise InputError(f"{checkpoint}/config.json: the checkpoint is already quantized; quantize the bf16 checkpoint")
    quantizer = AWQQuantizer(config, dialect, options["fmt"], head_dim)
    layers = _llm_layers(checkpoint)
    with pipeline_log(enabled=not as_json) as log, layer_progress("AWQ", layers, enabled=not as_json) as advance:
        quantize_awq(checkpoint, out, job, max_shard_size=limit, overwrite=options["overwrite"], resume=options["resume"],
                     progress=advance, log=log, quantizer=quantizer)
    facts = quantizer.summary()
    unscaled = sorted(facts["unscaled"])
    experts = facts.get("experts")  # a sparse LLM: experts calibrated on their routed tokens, or RTN
    if experts:
        # transformers 5.24 + gptqmodel 7.7 replace nn.Linear modules only: an awq-format expert's qweight is
        # "unexpected" and the fused Qwen3MoeExperts parameters stay "missing"; compressed-tensors' loader fills them
        experts["note"] = AWQ_EXPERTS_NOTE if options["fmt"] == "awq" else None
        if experts["note"]:
            click.echo(f"warning: {experts['note']}", err=True)
    return {"out": str(out), "method": "awq", "format": options["fmt"], "bits": config.bits, "group_size": config.group_size,
            "zero_point": zero_point, "layers": layers, **facts,
            "detail": f"{layers} decoder layers in AWQ {config.bits}-bit, group {config.group_size}, "
                      f"{'zero point' if zero_point else 'symmetric'} ({options['fmt']}); output error "
                      f"{facts['error_vs_rtn']} x round-to-nearest's on the scaled groups"
                      + (f"; kept unscaled (no exact fold): {', '.join(unscaled)}" if unscaled else "")
                      + (f"; experts: {experts['awq']} with AWQ on their routed tokens, {experts['round_to_nearest']} with "
                         f"round-to-nearest (fewer than {experts['min_tokens_share']:.1%} of the calibration tokens); "
                         f"routers kept unquantized: {ROUTERS_KEPT}" if experts else ""),
            **({"kept_routers": ROUTERS_KEPT} if experts else {})}


# a sparse LLM's routers: every method keeps them in the checkpoint's dtype (formats/rules.router_regex)
ROUTERS_KEPT = "mlp.gate of every decoder layer"


def _run_int8(checkpoint: Path, out: Path, options: dict, limit: int, total: int, as_json: bool) -> dict:
    from ..transforms.int8 import quantize_int8

    with byte_progress("quantizing (int8)", total, enabled=not as_json) as advance:
        path, plan = quantize_int8(checkpoint, out, only=options["only"], skip=options["skip"], fmt=options["fmt"],
                                   max_shard_size=limit, overwrite=options["overwrite"], progress=advance)
    kept = ", ".join(plan.skip_modules[:4]) + (" ..." if len(plan.skip_modules) > 4 else "")
    experts = plan.experts  # a sparse LLM: expert linears quantized / kept, and what loaders do with them
    return {"out": str(path), "method": "int8", "format": options["fmt"], "layout": plan.layout, "quantized": len(plan.selected),
            "skip_modules": list(plan.skip_modules), **({"experts": experts} if experts else {}),
            **({"kept_routers": ROUTERS_KEPT} if experts else {}),
            "detail": f"{len(plan.selected)} linears in int8 ({options['fmt']}, {plan.layout} layout); kept unquantized: {kept}"
                      + (f"; experts: {experts['quantized']} in int8, {experts['kept']} kept in their dtype"
                         + (" (why: the warning above)" if experts["note"] else "") + f"; routers kept unquantized: {ROUTERS_KEPT}"
                         if experts else "")}


@cli.command("merge-lora")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.option("-o", "--out", type=click.Path(path_type=Path), callback=output_folder, default=None, help="output folder (not needed with --dry-run)")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=Path),
              help="a PEFT adapter folder (repeatable, merged in order after any embedded LoRA)")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None, help="alpha of the embedded LoRA (default 2r, as InternVL's training sets it); "
              "a PEFT --adapter uses its own lora_alpha, so --alpha is refused when CHECKPOINT has no embedded LoRA")
@click.option("--max-shard-size", default="5GB", show_default=True, help=SIZE_HELP)
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT")
@click.option("--dry-run", is_flag=True, help="show what would be merged (modules, rank, alpha, scale, source) and what "
              "would be refused, write nothing; exit 2 when something would be refused")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable JSON summary instead of text")
def merge_lora_cmd(checkpoint: Path, out: Path | None, adapters: tuple[Path, ...], alpha: float | None, max_shard_size: str,
                   overwrite: bool, dry_run: bool, as_json: bool) -> None:
    """Merge the LoRA embedded in CHECKPOINT and/or PEFT --adapter folders into the base weights."""
    from ..transforms.merge_lora import merge_lora

    limit = parse_size(max_shard_size)
    if dry_run:
        _path, plan = merge_lora(checkpoint, None, adapters=list(adapters), alpha=alpha, dry_run=True)
        _report_merge_plan(plan, as_json)
        if plan.refused:
            raise click.exceptions.Exit(2)
        return
    if out is None:
        raise click.UsageError("Missing option '-o' / '--out' (only --dry-run runs without it).")
    check_output(out, [checkpoint, *adapters], overwrite)
    with CheckpointReader(checkpoint) as reader:
        total = reader.total_bytes
    started = time.perf_counter()
    with byte_progress("merging LoRA", total, enabled=not as_json) as advance:
        path, plan = merge_lora(checkpoint, out, adapters=list(adapters), alpha=alpha, max_shard_size=limit,
                                overwrite=overwrite, progress=advance)
    seconds = time.perf_counter() - started
    deltas, replacements = plan.adapters.deltas, plan.adapters.replacements
    towers = sorted({key.split(".")[0] for key in deltas})
    summary = {"out": str(path), "merged_weights": len(deltas), "replaced": len(replacements),
               "towers": towers, "adapters": [str(a) for a in adapters], "warnings": plan.warnings, "seconds": round(seconds, 3)}
    if as_json:
        emit_json(summary)
    else:
        for warning in plan.warnings:
            click.echo(f"warning: {warning}", err=True)
        stdout.print(f"wrote {path}: LoRA merged into {len(deltas)} weights ({', '.join(towers)})"
                     f"{f', {len(replacements)} replaced' if replacements else ''} in {seconds:.1f} s")


def _report_merge_plan(plan, as_json: bool) -> None:
    """`merge-lora --dry-run`: the changes (grouped over layers in the table) and the refusals."""
    rows = plan.rows()
    if as_json:
        emit_json({"dry_run": True, "layout": plan.layout_name, "merges": rows,
                   "refused": [{"source": r.source, "item": r.item, "reason": r.reason} for r in plan.refused],
                   "warnings": plan.warnings, "output_config": {k: plan.config.get(k) for k in ("use_llm_lora", "use_backbone_lora")}})
        return
    groups: dict[tuple, list[int]] = {}
    for row in rows:  # one line per (source, module with the layer number folded, kind, rank, alpha, scale)
        layer = re.search(r"\.(?:layers|layer)\.(\d+)\.", row["target"])
        target = re.sub(r"\.(layers|layer)\.\d+\.", r".\1.N.", row["target"]).removesuffix(".weight")
        key = (Path(row["source"]).name if row["source"] != "embedded" else "embedded", target,
               row["kind"] + (f" ({row['init']})" if row["init"] else ""), row["rank"], row["alpha"], row["scale"])
        groups.setdefault(key, []).append(int(layer.group(1)) if layer else -1)
    table = Table(title=f"merge-lora --dry-run ({plan.layout_name} layout): {len(rows)} changes to "
                        f"{len(plan.adapters.ops)} tensors")
    for column in ("adapter", "into", "kind", "layers", "rank", "alpha", "scale"):
        table.add_column(column, overflow="fold")
    for (source, target, kind, rank, alpha, scale), layers in groups.items():
        span = "" if layers == [-1] else (f"{min(layers)}..{max(layers)} ({len(layers)})" if len(layers) > 1 else str(layers[0]))
        table.add_row(source, target, kind, span, "" if rank is None else str(rank),
                      "" if alpha is None else f"{alpha:g}", "" if scale is None else f"{scale:.6g}")
    stdout.print(table)
    for refusal in plan.refused:
        stdout.print(f"refused: {refusal.message}", markup=False, highlight=False)
    for warning in plan.warnings:
        stdout.print(f"warning: {warning}", markup=False, highlight=False)
    if not plan.refused:
        stdout.print("nothing refused; nothing written (dry run)")


@cli.command("chat")
@click.argument("checkpoint", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.argument("question")
@click.option("--image", type=click.Path(path_type=Path), help="an image file")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--vision-onnx", type=click.Path(path_type=Path), default=None,
              help="an `export --format onnx` folder whose image embeddings replace the PyTorch vision tower")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable JSON summary instead of text")
def chat_cmd(checkpoint: Path, question: str, image: Path | None, max_new_tokens: int, dtype: str, vision_onnx: Path | None,
             as_json: bool) -> None:
    """Greedy answer of CHECKPOINT to QUESTION about an optional --image (runs on the CPU)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..export.onnx_runner import onnx_vision
    from ..runtime.model import InternVLRuntime

    picture = None
    if image is not None:
        if not image.is_file():  # one `error:` line (exit 2), not click's usage error
            raise InputError(f"{image}: {'a folder' if image.is_dir() else 'no such file'}; --image takes an image file")
        try:
            picture = Image.open(image).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{image}: not an image PIL can read ({exc})") from exc
    started = time.perf_counter()
    runtime = InternVLRuntime(checkpoint, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, vision_features=onnx_vision(vision_onnx))
    text, ids = runtime.generate(question, picture, max_new_tokens=max_new_tokens)
    seconds = round(time.perf_counter() - started, 2)
    if as_json:
        emit_json({"answer": text, "token_ids": ids, "seconds": seconds})
    else:
        stdout.print(text)


from .export_cmd import export_cmd  # noqa: E402
from .verify_cmd import verify_cmd  # noqa: E402

cli.add_command(export_cmd)
cli.add_command(verify_cmd)


# streaming commands that end the process without the interpreter's teardown (cli.common.fast_exit),
# and those of them that always compute with torch (imported up front with the cyclic GC paused)
FAST_EXIT = frozenset({"merge-lora", "quantize", "convert", "shard"})
TORCH_COMMANDS = frozenset({"merge-lora", "quantize", "convert"})


def main() -> None:
    """The CLI proper, called by the console script's entry point cli/launch.py (also `python -m
    internvl_tools`), which covers stop signals during the imports before it.

    For the streaming commands (FAST_EXIT): torch is imported first with the cyclic garbage
    collector paused, its objects then frozen (common.import_torch: ~0.1 s of collections
    saved), and the process ends through common.fast_exit once the command returned (atexit
    handlers run, stdout / stderr flushed, exit status kept; the ~0.3 s teardown of torch's
    modules is skipped). `--help` and the other commands run as before."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    stop_signals()
    if command not in FAST_EXIT or any(arg in ("-h", "--help", "--version") for arg in sys.argv[1:]):
        cli(prog_name="internvl-tools")
        return
    try:
        if command in TORCH_COMMANDS:
            import_torch()
    except KeyboardInterrupt:  # stopped while torch loads: nothing started yet
        print(f"\n{interrupted_line()}", file=sys.stderr)
        fast_exit(143 if STOP["signal"] == signal.SIGTERM else 130)
    try:
        cli(prog_name="internvl-tools")
    except SystemExit as exc:
        fast_exit(exc.code)
    fast_exit(0)
