"""VLMEvalKit slices: MMBench-style rows whose image field is another row's index."""

from __future__ import annotations

import base64
import io

import pytest

from internvl_tools.errors import InputError
from internvl_tools.io.slices import read_slice

from .support import sample_image


def _b64(seed: int) -> str:
    buffer = io.BytesIO()
    sample_image(seed, (32, 24)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write(path, rows):
    lines = ["index\timage\tquestion\tA\tB\tanswer\tcategory"]
    lines += ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_circular_copies_resolve_to_the_picture_of_the_row_they_name(tmp_path):
    picture = _b64(1)
    path = _write(tmp_path / "mmbench.tsv", [
        (7, picture, "What is it?", "cat", "dog", "A", "x"),
        (1000007, "7", "What is it?", "dog", "cat", "B", "x"),  # circular copy: options rotated
    ])
    items = read_slice(path)
    assert [i.index for i in items] == ["7", "1000007"]
    assert items[1].image is not None and list(items[1].image.getdata()) == list(items[0].image.getdata())


def test_reference_beyond_the_limit_is_found_in_a_second_pass(tmp_path):
    path = _write(tmp_path / "mmbench.tsv", [
        (1000003, "3", "Q?", "a", "b", "A", "x"),
        (3, _b64(2), "Q?", "b", "a", "B", "x"),
    ])
    items = read_slice(path, limit=1)
    assert len(items) == 1 and items[0].image is not None


def test_dangling_reference_names_the_row(tmp_path):
    path = _write(tmp_path / "bad.tsv", [(1000009, "9", "Q?", "a", "b", "A", "x")])
    with pytest.raises(InputError, match=r"row 2 \(index 1000009\).*row index 9"):
        read_slice(path)
