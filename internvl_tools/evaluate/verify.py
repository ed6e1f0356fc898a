"""`verify`: accuracy drift of a converted checkpoint against its reference on a benchmark slice.

One model is in memory at a time. The reference runs first (or comes from --ref-cache) and
leaves, per item: its greedy answer and answer tokens, the top-k log-probabilities of its
next-token distributions along that answer (KL is taken over those k tokens plus one bucket
for the rest of the vocabulary), and its image features projected to a fixed
256-dimensional random basis (cosines are preserved to about 1/sqrt(256)); then the
candidate runs, is scored the same way and compared position by position.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io.slices import BenchItem, MC_SUFFIX, SHORT_SUFFIX, YES_NO_SUFFIX, prompt_of  # noqa: F401
from ..errors import InputError

TOP_K = 32
PROJECTION_DIM = 256
def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def score(item: BenchItem, answer: str) -> bool:
    """Multiple choice by option letter (or option text), yes/no by its first word, else exact match."""
    if item.kind == "multiple_choice":
        match = re.search(r"\b([A-F])\b", answer.strip())
        if match and match.group(1) in item.options:
            return match.group(1) == item.answer
        return normalize(answer) == normalize(item.options[item.answer])
    if item.kind == "yes_no":
        words = normalize(answer).split()
        return bool(words) and words[0] == item.answer.strip().lower()
    return normalize(answer) == normalize(item.answer)


@dataclass
class ItemResult:
    """What one model did on one item."""

    index: str
    category: str
    answer: str
    correct: bool
    answer_ids: list[int]


def projection(dim: int, seed: int = 1234) -> torch.Tensor:
    """The fixed random basis image features are projected on (same for every model)."""
    generator = torch.Generator().manual_seed(seed + dim)
    return torch.randn(dim, PROJECTION_DIM, generator=generator) / PROJECTION_DIM**0.5


def run_reference(runtime, items: list[BenchItem], max_new_tokens: int) -> list[dict]:
    """Answers, top-k distributions along the answer, projected image features."""
    records = []
    for item in items:
        text, ids = runtime.generate(prompt_of(item), item.image, max_new_tokens=max_new_tokens)
        logprobs, features = _teacher_forced(runtime, item, ids)
        logprobs, features = logprobs.cpu(), None if features is None else features.float().cpu()
        top = logprobs.topk(min(TOP_K, logprobs.shape[-1]), dim=-1)
        records.append({
            "result": asdict(ItemResult(item.index, item.category, text, score(item, text), ids)),
            "top_ids": top.indices, "top_logprobs": top.values,
            "features": None if features is None else features @ projection(features.shape[-1]),
        })
    return records


def compare_candidate(runtime, items: list[BenchItem], reference: list[dict], max_new_tokens: int) -> list[dict]:
    """The candidate's answers and its drift from the reference, item by item."""
    rows = []
    for item, ref in zip(items, reference):
        text, ids = runtime.generate(prompt_of(item), item.image, max_new_tokens=max_new_tokens)
        logprobs, features = _teacher_forced(runtime, item, ref["result"]["answer_ids"])
        logprobs, features = logprobs.cpu(), None if features is None else features.float().cpu()
        ref_lp, ref_ids = ref["top_logprobs"].float(), ref["top_ids"].long()
        kl = topk_kl(ref_lp, logprobs.gather(-1, ref_ids))
        top1 = (logprobs.argmax(-1) == ref_ids[:, 0]).float()
        cosine = None
        if features is not None and ref["features"] is not None:
            projected = features @ projection(features.shape[-1])
            cosine = float(torch.nn.functional.cosine_similarity(projected.float(), ref["features"].float(), dim=-1).mean())
        rows.append({
            "index": item.index, "category": item.category,
            "ref_answer": ref["result"]["answer"], "cand_answer": text,
            "ref_correct": ref["result"]["correct"], "cand_correct": score(item, text),
            "agree": normalize(text) == normalize(ref["result"]["answer"]),
            "kl": float(kl.mean()) if kl.numel() else 0.0, "top1": float(top1.mean()) if top1.numel() else 1.0,
            "cosine": cosine,
        })
    return rows


def topk_kl(ref_logprobs: torch.Tensor, cand_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || cand) over the reference's top-k tokens plus one bucket for all other tokens
    (exact when k covers the vocabulary). Computed in float64 and clamped at 0: a KL is never
    negative, and float rounding of two nearly equal distributions must not make it so.
    Shapes: [positions, k] in, [positions] float64 out (nats)."""
    ref_logprobs, cand_logprobs = ref_logprobs.double(), cand_logprobs.double()
    p, q = ref_logprobs.exp(), cand_logprobs.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q.sum(-1)).clamp_min(1e-12)
    return ((p * (ref_logprobs - cand_logprobs)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).clamp_min(0)


@torch.no_grad()
def _teacher_forced(runtime, item: BenchItem, answer_ids: list[int]):
    """Log-probabilities of the next token at every answer position, and the image features."""
    pixels = runtime.pixel_values(item.image) if item.image is not None else None
    prompt = runtime.prompt_ids(prompt_of(item), pixels.shape[0] if pixels is not None else 0)
    features = runtime.image_features(pixels) if pixels is not None else None
    ids = torch.cat([prompt, torch.tensor([answer_ids], dtype=prompt.dtype)], dim=1) if answer_ids else prompt
    logits = runtime.llm(inputs_embeds=runtime.embeddings(ids, features)).logits[0].float()
    steps = logits[prompt.shape[1] - 1 : prompt.shape[1] - 1 + len(answer_ids)]
    return torch.log_softmax(steps, dim=-1), features


def summarize(rows: list[dict]) -> dict:
    """Accuracy per model, agreement and drift, overall and per category."""
    def block(subset: list[dict]) -> dict:
        n = len(subset)
        cos = [r["cosine"] for r in subset if r["cosine"] is not None]
        return {
            "n": n,
            "ref_accuracy": 100.0 * sum(r["ref_correct"] for r in subset) / n,
            "cand_accuracy": 100.0 * sum(r["cand_correct"] for r in subset) / n,
            "answer_agreement": 100.0 * sum(r["agree"] for r in subset) / n,
            "mean_kl": sum(r["kl"] for r in subset) / n,
            "top1_agreement": 100.0 * sum(r["top1"] for r in subset) / n,
            "image_cosine": sum(cos) / len(cos) if cos else None,
        }

    categories = sorted({r["category"] for r in rows})
    return {"overall": block(rows), "categories": {c: block([r for r in rows if r["category"] == c]) for c in categories}}


def verdict(summary: dict, max_acc_drop: float, max_kl: float, min_image_cosine: float = -1.0, min_top1: float = 0.0) -> list[str]:
    """The thresholds a candidate exceeds (empty: it passes)."""
    overall = summary["overall"]
    failures = []
    drop = overall["ref_accuracy"] - overall["cand_accuracy"]
    if drop > max_acc_drop:
        failures.append(f"accuracy drops {drop:.1f} points (limit {max_acc_drop})")
    if overall["mean_kl"] > max_kl:
        failures.append(f"mean KL {overall['mean_kl']:.4f} (limit {max_kl})")
    if overall["top1_agreement"] < min_top1:
        failures.append(f"top-1 agreement {overall['top1_agreement']:.1f}% (limit {min_top1}%)")
    if overall["image_cosine"] is not None and overall["image_cosine"] < min_image_cosine:
        failures.append(f"image embeddings cosine {overall['image_cosine']:.4f} (limit {min_image_cosine})")
    return failures


def cache_key(reference: Path, slice_path: Path, limit: int | None, max_new_tokens: int) -> str:
    """Identifies a reference run: the reference's config and shard headers, the slice, the options."""
    digest = hashlib.sha256()
    for path in sorted(Path(reference).glob("*.json")) + sorted(Path(reference).glob("*.safetensors")):
        with open(path, "rb") as handle:
            digest.update(path.name.encode() + handle.read(1 << 16))
    digest.update(Path(slice_path).read_bytes())
    digest.update(json.dumps([limit, max_new_tokens, TOP_K, PROJECTION_DIM]).encode())
    return digest.hexdigest()[:16]


def load_or_run_reference(reference: Path, items: list[BenchItem], cache: Path | None, key: str, max_new_tokens: int,
                          dtype, rank_tag: str = "", device: str = "cpu") -> list[dict]:
    """The reference records, from --ref-cache when it matches, else computed (and cached)."""
    from ..runtime.model import InternVLRuntime

    path = cache / f"reference-{key}{rank_tag}.pt" if cache else None
    if path is not None and path.exists():
        records = torch.load(path, weights_only=False)
        if [r["result"]["index"] for r in records] != [i.index for i in items]:
            raise InputError(f"{path}: cached items differ from the slice; delete the cache or pass another --ref-cache")
        return records
    runtime = InternVLRuntime(reference, dtype=dtype, device=device)
    records = run_reference(runtime, items, max_new_tokens)
    del runtime
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(records, path)
    return records


def calibration_record(candidate: Path) -> dict | None:
    """What `quantize` recorded about the candidate's calibration (config.json's
    `quantization_calibration`), or None."""
    try:
        config = json.loads((Path(candidate) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    record = config.get("quantization_calibration")
    return record if isinstance(record, dict) else None


def calibration_overlap(candidate: Path, items: list[BenchItem]) -> list[str]:
    """Indices of the slice rows whose fingerprint (question + picture) is among the rows the
    candidate was calibrated on (its calibration_rows.json); empty when none or unrecorded."""
    from ..io.slices import row_fingerprint

    record = calibration_record(candidate) or {}
    path = Path(candidate) / record.get("rows_file", "calibration_rows.json")
    if not path.is_file():
        return []
    try:
        rows = set(json.loads(path.read_text(encoding="utf-8")).get("rows", []))
    except (OSError, json.JSONDecodeError, AttributeError):
        raise InputError(f"{path}: not the JSON quantize writes; delete it or re-quantize") from None
    return [item.index for item in items if row_fingerprint(item.question, item.image) in rows]


def calibration_hint(candidate: Path) -> str | None:
    """For a failing report on a calibrated 4-bit candidate: the calibration it was made with, and
    the suggestion to pass in-domain data."""
    from ..calibrate.samples import describe

    record = calibration_record(candidate)
    if record is None or record.get("bits", 4) != 4:
        return None
    method = str(record.get("method", "gptq")).upper()
    advice = ("pass in-domain data: quantize --calib YOUR_DATA.tsv|.jsonl|DIR (rows like your traffic, not this slice's)"
              if record.get("source") == "built-in" else
              "if that data is not like this slice, pass data that is: quantize --calib YOUR_DATA.tsv|.jsonl|DIR")
    return f"the candidate is {method} 4-bit calibrated on {describe(record)}; {advice}"
