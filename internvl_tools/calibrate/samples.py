"""Calibration samples for GPTQ: image + text pairs and text-only samples, offline.

The built-in set draws its images (shapes, colours, gradients, text-like stripes, at several
aspect ratios so that dynamic tiling is exercised) and pairs them with questions and answers;
text-only samples come from a built-in paragraph list. `--calib DIR` reads DIR/*.jsonl, one
sample per line: {"image": "a.jpg", "prompt": "...", "answer": "..."}, {"text": "..."}, or
InternVL's training format {"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}.
"""

from __future__ import annotations

import json
import random
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
    """One calibration sample: an optional image, a question, and an answer."""

    question: str
    answer: str
    image: Image.Image | None = None


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


def builtin_samples(count: int, seed: int = 0) -> list[Sample]:
    """Half image + question/answer pairs, half text-only samples (several paragraphs each)."""
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
            samples.append(Sample(question, answer, image))
        else:
            start = rng.randrange(len(corpus))
            text = "\n\n".join(corpus[start : start + 6])
            samples.append(Sample("Continue the text: " + text[:200], text[200:]))
    return samples


def load_samples(folder: Path, count: int) -> list[Sample]:
    """Samples from DIR/*.jsonl (see the module docstring)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise InputError(f"{folder}: no *.jsonl file; --calib needs a folder with a JSONL of prompts and its images")
    samples: list[Sample] = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            samples.append(_parse(path, number, line, folder))
            if len(samples) >= count:
                return samples
    return samples


def _parse(path: Path, number: int, line: str, folder: Path) -> Sample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{number}: not JSON ({exc.msg}); each line is one sample object") from exc
    image = None
    if row.get("image"):
        image_path = folder / row["image"]
        try:
            image = Image.open(image_path).convert("RGB")
        except OSError as exc:
            raise InputError(f"{path}:{number}: cannot read image {image_path} ({exc})") from exc
    if "conversations" in row:
        turns = row["conversations"]
        question = next((t["value"] for t in turns if t.get("from") == "human"), "")
        answer = next((t["value"] for t in turns if t.get("from") == "gpt"), "")
        return Sample(question.replace("<image>\n", "").replace("<image>", ""), answer, image)
    if "text" in row:
        return Sample("", row["text"], image)
    if "prompt" in row:
        return Sample(row["prompt"], row.get("answer", ""), image)
    raise InputError(f"{path}:{number}: needs 'prompt', 'text' or 'conversations'")
