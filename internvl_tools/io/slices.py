"""Benchmark slices: VLMEvalKit TSV files and a simple JSONL format, validated row by row.

TSV (VLMEvalKit's MMBench / MME / SEED / AI2D / ScienceQA files): columns `index`, `image`
(base64), `question`, option columns `A`..`D` where present, `answer`, optional `category`
and `hint`. JSONL: one object a line, `{"image": "relative/path.jpg", "question": ...,
"answer": ..., "category": ..., "options": {"A": ..., ...}}`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import InputError

OPTION_LETTERS = ("A", "B", "C", "D", "E", "F")


@dataclass(frozen=True)
class BenchItem:
    """One question of a benchmark slice."""

    index: str
    question: str
    answer: str
    image: Image.Image | None = None
    options: dict[str, str] = field(default_factory=dict)
    category: str = "all"
    hint: str = ""

    @property
    def kind(self) -> str:
        """multiple_choice, yes_no or short."""
        if self.options:
            return "multiple_choice"
        return "yes_no" if self.answer.strip().lower() in ("yes", "no") else "short"


def read_slice(path: str | Path, limit: int | None = None) -> list[BenchItem]:
    """Read a .tsv or .jsonl slice (the first `limit` rows)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such benchmark slice; pass a VLMEvalKit .tsv or a .jsonl file")
    if path.suffix == ".tsv":
        try:
            return _read_tsv(path, limit)
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); VLMEvalKit slices are "
                             "UTF-8: re-save it as UTF-8") from None
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path, limit)
    raise InputError(f"{path}: unknown slice format {path.suffix!r}; use a VLMEvalKit .tsv or a .jsonl")


def slice_files(path: str | Path) -> list[Path]:
    """The files a slice reads: the slice itself and, for a .jsonl, every image file its rows name
    (all rows, not only the first `--limit`), resolved as `_read_jsonl` does (relative to the slice's
    folder). Unparsable lines are skipped here; read_slice reports them. Used to refuse report paths
    that would overwrite an input."""
    path = Path(path)
    files = [path]
    if path.suffix in (".jsonl", ".json") and path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("image"), str) and row["image"]:
                files.append(path.parent / row["image"])
    return files


def _read_tsv(path: Path, limit: int | None) -> list[BenchItem]:
    """Rows of a VLMEvalKit TSV. An `image` field that is a row index rather than base64 (MMBench's
    circular copies, index >= 1000000, point at the row holding the picture, as VLMEvalKit
    resolves them: a field of at most 64 characters is a reference) is resolved, with a second
    pass over the file when the picture lies beyond `limit`."""
    csv.field_size_limit(sys.maxsize)
    rows: list[tuple[str, dict]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"index", "question", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path}: header lacks {sorted(missing)}; a VLMEvalKit slice has index, image, question, answer")
        for number, row in enumerate(reader, 2):
            if limit is not None and len(rows) >= limit:
                break
            where = f"{path} row {number} (index {row.get('index')})"
            if not row.get("question"):
                raise InputError(f"{where}: empty question")
            rows.append((where, row))
    pictures = {str(row["index"]): row.get("image") for _, row in rows if not _is_reference(row.get("image"))}
    wanted = {row["image"].strip() for _, row in rows if _is_reference(row.get("image"))} - set(pictures)
    if wanted:
        pictures.update(_pictures_of(path, wanted))
    items = []
    for where, row in rows:
        options = {k: row[k] for k in OPTION_LETTERS if row.get(k) not in (None, "", "nan")}
        answer = (row.get("answer") or "").strip()
        if options and answer not in options:
            raise InputError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
        image = row.get("image")
        if _is_reference(image):
            if pictures.get(image.strip()) is None or _is_reference(pictures[image.strip()]):
                raise InputError(f"{where}: image refers to row index {image.strip()}, which is not in the file or holds no picture")
            image = pictures[image.strip()]
        items.append(BenchItem(str(row["index"]), row["question"], answer, _decode_image(image, where), options,
                               row.get("category") or "all", row.get("hint") or ""))
    return items


def _is_reference(image: str | None) -> bool:
    """A VLMEvalKit image field that names another row's index instead of holding base64."""
    return bool(image) and len(image) <= 64 and image.strip().isdigit()


def _pictures_of(path: Path, indices: set[str]) -> dict[str, str]:
    """The image fields of the rows with these indices (one more pass over the file)."""
    found = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if str(row.get("index")) in indices and not _is_reference(row.get("image")):
                found[str(row["index"])] = row.get("image")
    return found


def _decode_image(data: str | None, where: str) -> Image.Image | None:
    if not data:
        return None
    try:
        raw = base64.b64decode(data, validate=True)
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{where}: image is not valid base64 ({exc})") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{where}: image bytes are not a picture PIL can read ({exc})") from exc


# the type of each field a .jsonl row may carry (verify rows and calibration rows): checked where
# rows are parsed, so that a wrong type is a one-line error naming file:line and the field
TEXT, SCALAR = (str,), (str, int, float)
ROW_FIELDS = {"image": TEXT, "question": TEXT, "prompt": TEXT, "text": TEXT, "hint": TEXT,
              "answer": SCALAR, "index": SCALAR, "category": SCALAR}
KIND_NAMES = {str: "a string", int: "a number", float: "a number", dict: "an object", list: "a list"}


def _kind(value: object) -> str:
    return "null" if value is None else "a boolean" if isinstance(value, bool) else KIND_NAMES.get(type(value), type(value).__name__)


def _check_type(where: str, field: str, value: object, types: tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        wanted = " or ".join(dict.fromkeys(KIND_NAMES[t] for t in types))
        shown = json.dumps(value, ensure_ascii=False)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise InputError(f"{where}: field {field!r} is {_kind(value)} ({shown}); it must be {wanted}")


def check_row(row: object, where: str) -> dict:
    """A parsed .jsonl row with every known field of the right type (ROW_FIELDS; `image` may also be
    null; `options` an object of letter -> string or number; `conversations` a list of objects whose
    `from` and `value` are strings), returned as it is. InputError naming `where` (file:line) and
    the field otherwise. Shared by verify's slices and quantize --calib."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: each line is one JSON object, not {_kind(row)}")
    for field, types in ROW_FIELDS.items():
        if field in row and not (field == "image" and row[field] is None):
            _check_type(where, field, row[field], types)
    if "options" in row and row["options"] is not None:
        _check_type(where, "options", row["options"], (dict,))
        for letter, text in row["options"].items():
            _check_type(where, f"options.{letter}", text, SCALAR)
    if "conversations" in row:
        _check_type(where, "conversations", row["conversations"], (list,))
        for turn_number, turn in enumerate(row["conversations"]):
            _check_type(where, f"conversations[{turn_number}]", turn, (dict,))
            for key in ("from", "value"):
                if key in turn:
                    _check_type(where, f"conversations[{turn_number}].{key}", turn[key], TEXT)
    return row


def jsonl_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", row) for each non-blank line of a .jsonl file, each row checked
    by check_row. InputError, one line naming file:line, for bytes that are not UTF-8, a line that
    is not JSON or not an object, and a field of the wrong type."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); a .jsonl is UTF-8, "
                         "one JSON object a line: re-save it as UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg}); each line is one JSON object") from None
        yield number, where, check_row(row, where)


def _read_jsonl(path: Path, limit: int | None) -> list[BenchItem]:
    items = []
    for number, where, row in jsonl_rows(path):
        if limit is not None and len(items) >= limit:
            break
        if not row.get("question") or "answer" not in row:
            raise InputError(f"{where}: needs 'question' and 'answer'")
        image = None
        if row.get("image"):
            image_path = path.parent / row["image"]
            try:
                image = Image.open(image_path).convert("RGB")
            except (UnidentifiedImageError, OSError) as exc:
                raise InputError(f"{where}: cannot read image {image_path} ({exc})") from exc
        options = {str(k): str(v) for k, v in (row.get("options") or {}).items()}
        answer = str(row["answer"]).strip()
        if options and answer not in options:
            raise InputError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
        items.append(BenchItem(str(row.get("index", number)), str(row["question"]), answer, image, options,
                               str(row.get("category", "all"))))
    return items


def write_tsv(items: list[BenchItem], path: Path) -> Path:
    """Write items as a VLMEvalKit-style TSV (for tests and demos)."""
    letters = sorted({k for item in items for k in item.options})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "image", "question", *letters, "answer", "category"])
        for item in items:
            image = ""
            if item.image is not None:
                buffer = io.BytesIO()
                item.image.save(buffer, format="PNG")
                image = base64.b64encode(buffer.getvalue()).decode()
            writer.writerow([item.index, image, item.question, *(item.options.get(k, "") for k in letters), item.answer, item.category])
    return path


def image_digest(image: Image.Image | None) -> str:
    """SHA-256 of a picture's decoded RGB pixels and size ("" for none): the same picture read from
    a TSV's base64 PNG or from a file on disk hashes the same."""
    if image is None:
        return ""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def row_fingerprint(question: str, image: Image.Image | None) -> str:
    """The identity of a benchmark or calibration row: its question (case and whitespace folded)
    and its picture's pixels, hashed to 16 hex digits. `quantize` records the fingerprints of its
    calibration rows; `verify` refuses a slice that shares one (calibrating on the test set)."""
    text = " ".join(question.split()).casefold()
    return hashlib.sha256(f"{text}\0{image_digest(image)}".encode()).hexdigest()[:16]


# the prompts InternVL's evaluation scripts ask (verify asks them; calibration from a slice reuses them)
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
YES_NO_SUFFIX = "Please answer yes or no."
SHORT_SUFFIX = "Answer the question using a single word or phrase."


def prompt_of(item: BenchItem) -> str:
    """The question as InternVL's evaluation scripts ask it."""
    if item.kind == "multiple_choice":
        hint = f"Hint: {item.hint}\n" if item.hint else ""
        options = "\n".join(f"{k}. {v}" for k, v in sorted(item.options.items()))
        return f"{hint}Question: {item.question}\nOptions:\n{options}\n{MC_SUFFIX}"
    return f"{item.question}\n{YES_NO_SUFFIX if item.kind == 'yes_no' else SHORT_SUFFIX}"
