"""Calibration samples for GPTQ / AWQ: image + text pairs and text-only samples, offline.

The built-in set (`builtin-v3`, calibrate/builtin.py) is what InternVL is used for: real CC0
photographs shipped in calibrate/data/, rendered documents, charts, tables and text-in-image
crops at several aspect ratios (so dynamic tiling is exercised), multi-turn conversations,
and English, Chinese and other-language text instructions; drawn with a fixed seed. A third of
the pictures are asked short-answer questions in verify's formats (a word, a number, yes / no,
an option's letter); `builtin-v2`, the same set without them, stays available for comparisons. The first
built-in set (`builtin-v1`: drawn shapes with colour questions, and Python docstrings) stays
available as `builtin_samples_v1` for comparisons.

`--calib PATH` (load_calibration) reads the files `verify --bench` reads, plus the calibration
JSONL formats:
- a VLMEvalKit .tsv slice, or a .jsonl of verify rows `{"image", "question", "answer", "options"}`:
  each row becomes the prompt verify asks (options, hint, answer-format suffix) and its answer;
- a .jsonl of `{"image": "a.jpg", "prompt": "...", "answer": "..."}`, `{"text": "..."}`, or
  InternVL's training format {"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}, ...]} (every turn is kept);
- a folder: every *.jsonl and *.tsv in it, in name order (images relative to each file).

Every sample carries the fingerprint of its row (io.slices.row_fingerprint: question +
picture), which quantize records so that verify can refuse a slice it was calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import InputError

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "rectangle")
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank while the sun sets behind the hills.",
    "Large language models are trained on vast amounts of text and can answer questions, write code and summarise documents.",
    "A vision-language model combines an image encoder with a language model so that it can describe pictures and answer questions about them.",
    "Quantization stores weights with fewer bits; good methods keep the model's answers almost unchanged while the memory shrinks several times.",
    "The museum opens at nine in the morning. Tickets cost twelve dollars for adults and five dollars for children under twelve.",
    "To make bread, mix flour, water, yeast and salt, knead the dough for ten minutes, let it rise for an hour and bake it until golden.",
    "The chart shows quarterly revenue growing from 1.2 million in the first quarter to 2.8 million in the fourth quarter of the year.",
    "In 1969 the Apollo 11 mission landed on the Moon, and Neil Armstrong became the first person to walk on its surface.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water and release oxygen.",
    "The train from Berlin to Munich takes about four hours; the first one leaves at six o'clock and the last one at ten at night.",
    "Please read the receipt carefully: the total is 48.50, including tax of 3.20, paid by card on the third of March.",
]


@dataclass(frozen=True)
class Sample:
    """One calibration sample: an optional image, a question, an answer, more turns, its kind.

    `source_question` is the row's own question when the prompt was built from it (a verify
    row: options and suffix added); the fingerprint uses it."""

    question: str
    answer: str
    image: Image.Image | None = None
    kind: str = "custom"
    turns: tuple[tuple[str, str], ...] = ()
    source_question: str | None = None

    def text(self, template: str, tokens_per_tile: int = 0, num_tiles: int = 0, system: bool = True) -> str:
        """The whole conversation in the model's chat template (image tokens in the first turn);
        `system=False`: without the system prompt (the template with an empty system message)."""
        from dataclasses import replace

        from ..models.templates import build_prompt, get_template, image_placeholder

        chat = get_template(template)
        if system:
            text = build_prompt(template, self.question, tokens_per_tile, num_tiles)
        else:  # build_prompt's image line and question, under an empty system message
            image = image_placeholder(tokens_per_tile, num_tiles) + "\n" if num_tiles else ""
            text = replace(chat, system="{system_message}", system_message="").prompt(image + self.question)
        text += self.answer + chat.sep
        for question, answer in self.turns:
            if chat.user == "USER":  # vicuna style
                text += f"USER: {question} ASSISTANT: {answer}{chat.sep}"
            else:
                text += f"{chat.user}{question}{chat.sep}{chat.assistant}{answer}{chat.sep}"
        return text if system else text.lstrip()

    def fingerprint(self) -> str:
        """io.slices.row_fingerprint of the row this sample came from."""
        from ..io.slices import row_fingerprint

        question = self.source_question if self.source_question is not None else (self.question or self.answer)
        return row_fingerprint(question, self.image)


def draw_image(rng: random.Random) -> tuple[Image.Image, str, str]:
    """A synthetic picture with its colour and shape."""
    width, height = rng.choice([(448, 448), (896, 448), (448, 896), (640, 480), (1344, 448), (700, 700)])
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for y in range(0, height, rng.randint(20, 80)):  # gradients and stripes give texture
        shade = tuple(min(255, c + rng.randint(-30, 30)) for c in background)
        draw.rectangle([0, y, width, y + rng.randint(2, 10)], fill=shade)
    color_name = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    cx, cy, r = width // 2 + rng.randint(-width // 5, width // 5), height // 2 + rng.randint(-height // 5, height // 5), min(width, height) // rng.randint(4, 7)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color_name])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color_name])
    elif shape == "rectangle":
        draw.rectangle([cx - 2 * r, cy - r // 2, cx + 2 * r, cy + r // 2], fill=COLORS[color_name])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color_name])
    return image, color_name, shape


CORPUS_MODULES = ("asyncio", "calendar", "codecs", "concurrent.futures", "configparser", "contextlib", "dataclasses", "datetime",
                  "decimal", "difflib", "doctest", "enum", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq",
                  "html.parser", "imaplib", "ipaddress", "itertools", "locale", "mailbox", "mimetypes", "operator", "optparse",
                  "pickle", "pprint", "queue", "random", "sched", "secrets", "shelve", "shlex", "shutil", "smtplib", "socket",
                  "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "threading", "timeit", "tokenize",
                  "traceback", "turtle", "typing", "urllib.parse", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile")


def corpus_paragraphs() -> list[str]:
    """English prose shipped with Python itself: the docstrings of standard-library modules and
    their public classes and functions (offline, varied, real text), split into paragraphs."""
    import importlib
    import inspect

    paragraphs: list[str] = list(TEXTS)
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # a module missing on this platform is simply skipped
            continue
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(obj) or "" for attr, obj in vars(module).items()
                 if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name]
        for doc in docs:
            paragraphs += [p.strip() for p in doc.split("\n\n") if len(p.strip()) > 200]
    return paragraphs


BUILTIN = "builtin-v3"
BUILTIN_V2 = "builtin-v2"
BUILTIN_V1 = "builtin-v1"


def builtin_samples(count: int, seed: int = 0, version: str = BUILTIN) -> list[Sample]:
    """The built-in set (`builtin-v3`, calibrate/builtin.py): photos, documents, charts, tables,
    text-in-image, multi-turn, English and Chinese text, in a fixed proportion, drawn with `seed`,
    a third of the pictures asked short-answer questions in verify's formats. `version="builtin-v2"`:
    the previous set (no short-answer turns), for comparisons."""
    from .builtin import generate

    return [Sample(question, answer, image, kind, turns)
            for kind, image, question, answer, turns in generate(count, seed, corpus_paragraphs(), version)]


def short_answer_turns(sample: Sample) -> int:
    """How many of the sample's questions are asked in a short-answer format of verify's
    (io.slices.prompt_of: they end with its multiple-choice, yes / no or word-or-phrase suffix)."""
    from ..io.slices import MC_SUFFIX, SHORT_SUFFIX, YES_NO_SUFFIX

    questions = [sample.question] + [question for question, _ in sample.turns]
    return sum(q.rstrip().endswith((MC_SUFFIX, YES_NO_SUFFIX, SHORT_SUFFIX)) for q in questions)


def builtin_samples_v1(count: int, seed: int = 0) -> list[Sample]:
    """The first built-in set (`builtin-v1`): half drawn shapes with colour / shape questions, half
    continuations of standard-library docstrings. Kept to measure the new set against it."""
    rng = random.Random(seed)
    corpus = corpus_paragraphs()
    samples = []
    for index in range(count):
        if index % 2 == 0:
            image, color, shape = draw_image(rng)
            question, answer = rng.choice([
                ("Describe the image in detail.", f"The image shows a {color} {shape} on a textured background with horizontal stripes."),
                ("What shape is in the picture?", f"It is a {shape}."),
                ("What color is the main object?", f"The main object is {color}."),
                (f"Is there a {rng.choice(SHAPES)} in the image? Answer yes or no.", "yes" if rng.random() < 0.5 else "no"),
            ])
            samples.append(Sample(question, answer, image, "shapes"))
        else:
            start = rng.randrange(len(corpus))
            text = "\n\n".join(corpus[start : start + 6])
            samples.append(Sample("Continue the text: " + text[:200], text[200:], None, "text_en"))
    return samples


def load_calibration(path: Path, count: int) -> list[Sample]:
    """The first `count` samples of `--calib PATH` (see the module docstring): a folder, a .tsv or a
    .jsonl. InputError naming the file and row for anything unreadable."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".tsv") and p.is_file())
        if not files:
            raise InputError(f"{path}: no *.jsonl or *.tsv file; --calib takes a folder of JSONL (+ images), "
                             "a VLMEvalKit .tsv, or a .jsonl")
    elif path.is_file():
        if path.suffix not in (".jsonl", ".tsv", ".json"):
            raise InputError(f"{path}: --calib takes a folder, a VLMEvalKit .tsv or a .jsonl, not a {path.suffix or 'suffix-less'} file")
        files = [path]
    else:
        raise InputError(f"{path}: no such file or folder for --calib")
    samples: list[Sample] = []
    for file in files:
        if len(samples) >= count:
            break
        samples += _read_file(file, count - len(samples))
    if not samples:
        raise InputError(f"{path}: no calibration rows")
    return samples


def load_samples(folder: Path, count: int) -> list[Sample]:
    """Samples from a folder of *.jsonl (and *.tsv): load_calibration."""
    return load_calibration(folder, count)


def _read_file(path: Path, count: int) -> list[Sample]:
    from ..io.slices import jsonl_rows, read_slice

    if path.suffix == ".tsv":
        return [_from_item(item) for item in read_slice(path, count)]
    samples = []
    for number, where, row in jsonl_rows(path):  # UTF-8, JSON objects, field types checked there (shared with verify)
        if len(samples) >= count:
            break
        samples.append(_parse(where, number, row, path.parent))
    return samples


def _from_item(item) -> Sample:
    """A verify row as calibration: the prompt verify asks and the reference answer."""
    from ..io.slices import prompt_of

    return Sample(prompt_of(item), item.answer, item.image, "slice", source_question=item.question)


def _parse(where: str, number: int, row: dict, folder: Path) -> Sample:
    """One checked .jsonl row (io.slices.check_row: field types) as a sample; InputError naming `where`."""
    image = None
    if row.get("image"):
        image_path = folder / row["image"]
        try:
            image = Image.open(image_path).convert("RGB")
        except OSError as exc:
            raise InputError(f"{where}: cannot read image {image_path} ({exc})") from exc
    if "conversations" in row:
        turns = [t for t in row["conversations"] if t.get("from") in ("human", "gpt")]
        pairs = [(turns[i].get("value", ""), turns[i + 1].get("value", "")) for i in range(0, len(turns) - 1, 2)
                 if turns[i].get("from") == "human" and turns[i + 1].get("from") == "gpt"]
        if not pairs:
            raise InputError(f"{where}: 'conversations' needs a human turn followed by a gpt turn")
        (question, answer), rest = pairs[0], tuple(pairs[1:])
        question = question.replace("<image>\n", "").replace("<image>", "")
        return Sample(question, answer, image, "conversation" if not rest else "multi_turn", rest)
    if "text" in row:
        return Sample("", row["text"], image, "text")
    if "prompt" in row:
        return Sample(row["prompt"], str(row.get("answer", "")), image, "prompt")
    if "question" in row and "answer" in row:
        from ..io.slices import BenchItem

        options = {str(k): str(v) for k, v in (row.get("options") or {}).items()}
        answer = str(row["answer"]).strip()
        if options and answer not in options:
            raise InputError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
        return _from_item(BenchItem(str(row.get("index", number)), str(row["question"]), answer, image, options,
                                    str(row.get("category", "all")), str(row.get("hint", ""))))
    raise InputError(f"{where}: needs 'prompt', 'text', 'conversations', or 'question' and 'answer'")


ROWS_FILE = "calibration_rows.json"


def calibration_record(samples: list[Sample], calib: str | None, seed: int, window: dict | None = None) -> tuple[dict, list[str]]:
    """What a quantized checkpoint was calibrated with: (the summary quantize writes into config.json
    as `quantization_calibration`, the row fingerprints it writes to calibration_rows.json).
    `samples`: the ones that reached the model; `window`: calibrate.window.Window.record()'s counts
    (seq_len, tokens, cut, system_prompt_dropped, retiled, dropped), added as they are."""
    rows = sorted({sample.fingerprint() for sample in samples})
    kinds = Counter(sample.kind for sample in samples)
    record = {
        "source": str(calib) if calib else "built-in",
        "set": "custom" if calib else BUILTIN,
        "samples": len(samples),
        "with_images": sum(sample.image is not None for sample in samples),
        "multi_turn": sum(bool(sample.turns) for sample in samples),
        "short_answer": sum(short_answer_turns(sample) > 0 for sample in samples),
        "kinds": dict(sorted(kinds.items())),
        "rows_file": ROWS_FILE,
        "rows_digest": hashlib.sha256("".join(rows).encode()).hexdigest()[:16],
    }
    if not calib:
        record["seed"] = seed
    record.update(window or {})
    return record, rows


def describe(record: dict) -> str:
    """One line: "the built-in set (builtin-v3, seed 0), 128 samples (photo 26, ...), 47 with short-answer
    questions, 61440 tokens (--seq-len 2048; 3 cut)" or "PATH, 64 samples (...), ..."."""
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(record.get("kinds", {}).items(), key=lambda kv: -kv[1]))
    source = f"the built-in set ({record.get('set')}, seed {record.get('seed', 0)})" if record.get("source") == "built-in" \
        else record.get("source", "?")
    count = record.get("samples", "?")
    line = f"{source}, {count} sample{'' if count == 1 else 's'}" + (f" ({kinds})" if kinds else "")
    if record.get("short_answer"):
        line += f", {record['short_answer']} with short-answer questions"
    if "tokens" in record:  # what reached the model within --seq-len (calibrate/window.py)
        lost = [f"{record[key]} {what}" for key, what in (("cut", "cut"), ("dropped", "dropped")) if record.get(key)]
        line += f", {record['tokens']} tokens (--seq-len {record['seq_len']}" + (f"; {', '.join(lost)}" if lost else "") + ")"
    if "forward_dtype" in record:
        line += f", {record['forward_dtype']} forwards"
    return line
