"""`internvl-tools verify`: the command, its report (terminal, JSON, markdown, PNG) and torchrun split."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.table import Table

from ..errors import InputError, about_checkpoint
from ..io.writer import check_apart
from .common import checkpoint_folder, emit_json, stdout

METRICS = ("n", "ref_accuracy", "cand_accuracy", "answer_agreement", "mean_kl", "top1_agreement", "image_cosine")


@click.command("verify")
@click.argument("reference", type=click.Path(path_type=Path), callback=checkpoint_folder)
@click.argument("candidate", type=click.Path(path_type=Path), required=False, callback=checkpoint_folder)
@click.option("--bench", "bench", type=click.Path(path_type=Path), required=True, help="a VLMEvalKit .tsv or a .jsonl slice")
@click.option("--limit", type=int, default=200, show_default=True, help="first N items of the slice")
@click.option("--max-acc-drop", type=float, default=1.0, show_default=True, help="accuracy points the candidate may lose")
@click.option("--max-kl", type=click.FloatRange(min=0), default=0.05, show_default=True, help="mean KL(ref || cand) along the reference answers")
@click.option("--min-top1", type=float, default=90.0, show_default=True,
              help="% of answer positions where the candidate's top-1 token equals the reference's")
@click.option("--min-image-cosine", type=float, default=0.99, show_default=True,
              help="mean cosine of the candidate's image embeddings to the reference's")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--ref-cache", type=click.Path(path_type=Path, file_okay=False), help="folder to keep and reuse the reference's outputs")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="write the report as JSON here ('-' for stdout)")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path, dir_okay=False), help="write the report as markdown here")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), help="write a PNG of per-category accuracy and drift")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="fp32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
@click.option("--allow-overlap", is_flag=True,
              help="measure even when slice rows are in the candidate's calibration set (refused by default: exit 2)")
@click.option("--engine", type=click.Choice(["runtime", "vllm"]), default="runtime", show_default=True,
              help="what serves CANDIDATE: this toolkit's runtime, or vLLM (its CPU build in .venv-vllm, built by "
                   "scripts/setup_vllm.sh; run in a subprocess). REFERENCE always runs in the runtime")
@click.option("--vision-onnx", type=click.Path(path_type=Path), default=None,
              help="an `export --format onnx` folder: the candidate's vision tower + projector run in onnxruntime "
                   "(its LLM is CANDIDATE's, or REFERENCE's when CANDIDATE is omitted)")
def verify_cmd(reference: Path, candidate: Path | None, bench: Path, limit: int, max_acc_drop: float, max_kl: float,
               min_top1: float, min_image_cosine: float, max_new_tokens: int,
               ref_cache: Path | None, json_path: Path | None, markdown_path: Path | None, plot_path: Path | None, dtype: str,
               device: str, vision_onnx: Path | None, allow_overlap: bool, engine: str = "runtime") -> None:
    """Accuracy and drift of CANDIDATE against REFERENCE on a benchmark slice; exit 1 past a threshold.

    With --vision-onnx EXPORT and no CANDIDATE, the candidate is REFERENCE's LLM fed by the ONNX export.
    With --engine vllm, CANDIDATE runs in vLLM (same report and thresholds)."""
    import torch

    from ..io.slices import read_slice
    from ..evaluate.verify import (cache_key, calibration_hint, calibration_overlap, calibration_record,
                                   load_or_run_reference, summarize, verdict)

    if candidate is None:
        if vision_onnx is None:
            raise InputError("missing CANDIDATE: pass a checkpoint folder, or --vision-onnx EXPORT to check an ONNX vision export "
                             "with the reference's LLM")
        candidate = reference
    for folder in (reference, candidate):
        if not (Path(folder) / "config.json").exists():
            raise InputError(f"{folder}: no config.json; pass checkpoint folders as REFERENCE and CANDIDATE")
    from ..io.slices import slice_files

    inputs = [reference, candidate, vision_onnx, *slice_files(bench)]  # the slice and every image it names
    for option, path in (("--json", json_path), ("--markdown", markdown_path), ("--plot", plot_path), ("--ref-cache", ref_cache)):
        if path is not None and str(path) != "-":
            # before any work: a report never overwrites what it measures; the cache folder (written
            # into, like quantize -o) must not be or contain REF, CAND, the slice or its images
            check_apart(path, inputs, option, contains=option == "--ref-cache")
    vllm_python = None
    if engine == "vllm":
        from ..evaluate.vllm_engine import require_vllm_python

        if vision_onnx is not None:
            raise InputError("--engine vllm serves CANDIDATE whole in vLLM; --vision-onnx applies to --engine runtime")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("--engine vllm runs in one process; start verify without torchrun")
        vllm_python = require_vllm_python()  # before the reference runs: fail fast
        from ..evaluate.vllm_engine import dtype_note

        note = dtype_note(candidate, dtype)  # GPTQ / AWQ / W4A16 run in bf16 in vLLM whatever --dtype says
        if note:
            click.echo(f"warning: {note}", err=True)
    items = read_slice(bench, limit)
    if not items:
        raise InputError(f"{bench}: the slice has no items")
    overlap = calibration_overlap(candidate, items)
    if overlap:
        source = (calibration_record(candidate) or {}).get("source", "?")
        message = (f"{bench}: {len(overlap)} of {len(items)} rows (first: index {overlap[0]}) are in the calibration set "
                   f"{candidate} was quantized with ({source}): verify on rows it was not calibrated on")
        if not allow_overlap:
            raise InputError(message + ", or pass --allow-overlap to measure anyway")
        click.echo(f"warning: {message}; measuring anyway (--allow-overlap): these scores flatter the candidate", err=True)
    rank, world = distributed_setup()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if device == "cuda" and world > 1:
            device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    mine = items[rank::world]
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    key = cache_key(reference, bench, limit, max_new_tokens)
    with about_checkpoint(reference):
        records = load_or_run_reference(reference, mine, ref_cache, key, max_new_tokens, torch_dtype,
                                        f"-rank{rank}of{world}" if world > 1 else "", device)
    facts = {"dtype": dtype}  # the dtype the candidate ran in (vLLM may run it in another)
    with about_checkpoint(candidate):
        rows = _candidate_rows(candidate, mine, records, max_new_tokens, dtype, torch_dtype, device, engine, vllm_python,
                               vision_onnx, facts)
    rows = gather(rows, world, [i.index for i in items])
    if rank != 0:
        return
    summary = summarize(rows)
    failures = verdict(summary, max_acc_drop, max_kl, min_image_cosine, min_top1)
    report = {"reference": str(reference), "candidate": str(candidate), "engine": engine,
              "dtype": dtype, "candidate_dtype": facts["dtype"],
              "vision_onnx": str(vision_onnx) if vision_onnx else None,
              "bench": str(bench), "items": len(rows), **summary,
              "thresholds": {"max_acc_drop": max_acc_drop, "max_kl": max_kl, "min_top1": min_top1,
                             "min_image_cosine": min_image_cosine}, "passed": not failures, "failures": failures,
              "calibration_overlap": overlap, "hint": calibration_hint(candidate) if failures else None,
              "rows": rows}
    if json_path is not None and str(json_path) == "-":
        emit_json(report)
    else:
        print_report(report)
        if json_path:
            json_path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(markdown(report))
    if plot_path:
        plot(report, plot_path)
    if failures:
        raise click.exceptions.Exit(1)


def _candidate_rows(candidate: Path, items: list, records: list[dict], max_new_tokens: int, dtype: str, torch_dtype, device: str,
                    engine: str, vllm_python, vision_onnx: Path | None, facts: dict | None = None) -> list[dict]:
    """The candidate's rows against the reference records, in the runtime or in vLLM (`facts["dtype"]`
    set to the dtype vLLM ran it in)."""
    if engine == "vllm":
        from ..evaluate.vllm_engine import compare_candidate_vllm

        rows = compare_candidate_vllm(candidate, items, records, max_new_tokens, dtype, python=vllm_python, facts=facts)
        mismatched = [r["index"] for r in rows if not r.pop("prompt_match")]
        if mismatched:
            click.echo(f"warning: vLLM tokenized or tiled the prompt of {len(mismatched)} item(s) differently from the runtime "
                       f"(first: index {mismatched[0]}); their scores mix preprocessing and weights", err=True)
        return rows
    from ..evaluate.verify import compare_candidate
    from ..export.onnx_runner import onnx_vision
    from ..runtime.model import InternVLRuntime

    runtime = InternVLRuntime(candidate, dtype=torch_dtype, device=device, vision_features=onnx_vision(vision_onnx, device))
    return compare_candidate(runtime, items, records, max_new_tokens)


def distributed_setup() -> tuple[int, int]:
    """(rank, world size): under torchrun the slice is split across ranks (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def gather(rows: list[dict], world: int, order: list[str]) -> list[dict]:
    """All ranks' rows on every rank, in slice order; the process group is destroyed afterwards."""
    if world <= 1:
        return rows
    import torch.distributed as dist

    parts: list[list[dict]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(parts, rows)
    # every rank has every row now: leave the group together and tear it down before any rank exits
    # (a rank exiting while gloo's threads still hold the other's connection can abort it: SIGABRT)
    dist.barrier()
    dist.destroy_process_group()
    position = {index: n for n, index in enumerate(order)}
    return sorted((r for part in parts for r in part), key=lambda r: position[r["index"]])


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    if metric in ("mean_kl", "image_cosine"):
        return f"{value:.4f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def candidate_label(report: dict) -> str:
    """CANDIDATE, or its LLM with the ONNX vision export that feeds it; in vLLM, with the dtype it ran in
    where that is not the reference's (GPTQ / AWQ in bf16 under --dtype fp32)."""
    if report.get("vision_onnx"):
        return f"{report['candidate']} (LLM) + {report['vision_onnx']} (ONNX vision)"
    if report.get("engine") == "vllm":
        ran = report.get("candidate_dtype")
        return f"{report['candidate']} (in vLLM" + (f", {ran}, reference {report['dtype']})" if ran and ran != report.get("dtype") else ")")
    return report["candidate"]


def print_report(report: dict) -> None:
    """The per-category table and the verdict."""
    table = Table(title=f"verify: {candidate_label(report)} vs {report['reference']} on {report['bench']} ({report['items']} items)")
    for column in ("category", "n", "ref acc %", "cand acc %", "answers agree %", "mean KL", "top-1 agree %", "image cosine"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, block in [*report["categories"].items(), ("overall", report["overall"])]:
        table.add_row(name, *(_fmt(block[m], m) for m in METRICS))
    stdout.print(table)
    stdout.print("PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"]))
    if report.get("hint"):
        stdout.print(f"note: {report['hint']}", markup=False, highlight=False, soft_wrap=True)
    if report.get("calibration_overlap"):
        stdout.print(f"warning: {len(report['calibration_overlap'])} of these rows are in the candidate's calibration set",
                     markup=False, highlight=False, soft_wrap=True)


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    lines = [f"# verify: `{candidate_label(report)}` vs `{report['reference']}`", "",
             f"Slice `{report['bench']}`, {report['items']} items. Verdict: **{'PASS' if report['passed'] else 'FAIL'}**"
             + ("" if report["passed"] else " (" + "; ".join(report["failures"]) + ")"), "",
             *([f"Note: {report['hint']}", ""] if report.get("hint") else []),
             "| category | n | ref acc % | cand acc % | answers agree % | mean KL | top-1 agree % | image cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for name, block in [*report["categories"].items(), ("overall", report["overall"])]:
        lines.append("| " + " | ".join([name, *(_fmt(block[m], m) for m in METRICS)]) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Per-category accuracy of both models and KL, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from exc
    names = list(report["categories"])
    blocks = [report["categories"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [b["ref_accuracy"] for b in blocks], width=0.4, label="reference")
    left.bar([i + 0.2 for i in x], [b["cand_accuracy"] for b in blocks], width=0.4, label="candidate")
    left.set_xticks(list(x), names, rotation=30, ha="right")
    left.set_ylabel("accuracy %")
    left.legend()
    right.bar(list(x), [b["mean_kl"] for b in blocks], color="tab:red")
    right.set_xticks(list(x), names, rotation=30, ha="right")
    right.set_ylabel("mean KL(ref || cand)")
    fig.suptitle(f"verify: {'PASS' if report['passed'] else 'FAIL'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
