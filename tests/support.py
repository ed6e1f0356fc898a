"""Helpers shared by several test modules.

Test modules import shared code from here (or from conftest / reference_internvl), never from
another test_*.py file: each test module must import, collect and skip on its own.
This module needs only the required dependencies; optional packages are imported by the tests
that need them (see the `requires` marker in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from internvl_tools.models.families import FAMILIES
from internvl_tools.models.layout import build_layout
from internvl_tools.planners.device_map import ModelSizes
from internvl_tools.planners.gpu_layout import model_sizes, quantized_sizes
from internvl_tools.tiny.generator import llm_tensors, make_config, projector_tensors, vision_tensors


def sample_image(seed=0, size=(120, 80)):
    """A deterministic noise RGB image (PIL) of `size` (width, height)."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a checkpoint folder, by key."""
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def all_bytes(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """key -> (dtype, shape, raw bytes) of every tensor in a checkpoint folder (bit-exact comparisons)."""
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                t = handle.get_tensor(key)
                out[key] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


class HeaderOnly:
    """A reader stand-in that knows tensor specs only (what the planner reads)."""

    def __init__(self, specs):
        self._specs = {s.name: s for s in specs}

    def spec(self, name):
        return self._specs[name]


def real_sizes(family: str, method: str | None = None) -> ModelSizes:
    """The planner's sizes of a family at its real (full) shapes, from specs alone (no tensors)."""
    fam = FAMILIES[family]
    specs = [p.spec for p in vision_tensors(fam) + llm_tensors(fam) + projector_tensors(fam)]
    config = make_config(fam)
    layout = build_layout(config, specs)
    reader = HeaderOnly(specs)
    sizes = model_sizes(reader, config, layout)
    return quantized_sizes(sizes, reader, layout, method) if method else sizes


def make_items(count: int = 6, seed: int = 0):
    """A small verify slice of drawn shapes: multiple choice, yes/no and short answers."""
    import random

    from internvl_tools.calibrate.samples import draw_image
    from internvl_tools.io.slices import BenchItem

    rng = random.Random(seed)
    items = []
    for i in range(count):
        image, color, shape = draw_image(rng)
        image = image.resize((image.width // 8, image.height // 8))
        if i % 3 == 0:
            items.append(BenchItem(str(i), "What shape is shown?", "B", image, {"A": "circle", "B": shape, "C": "star", "D": "line"}, "shape"))
        elif i % 3 == 1:
            items.append(BenchItem(str(i), f"Is the object {color}?", "yes", image, {}, "color"))
        else:
            items.append(BenchItem(str(i), "Name the color.", color, image, {}, "color"))
    return items


# -- AWQ (tests/test_awq.py, tests/test_awq_moe.py) --------------------------------------------------
GPTQ_PYTHON = Path(__file__).resolve().parent.parent / ".venv-gptq" / "bin" / "python"  # transformers + gptqmodel
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # DESIGN §3: nibble i of an int32 holds output column AWQ_ORDER[i]


def awq_independent_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AWQ gemm read with numpy from the format's statement: W^T = (q - z) x s per group of input rows."""
    def nibbles(packed):
        words = packed.numpy().astype(np.int64) & 0xFFFFFFFF
        out = np.zeros((words.shape[0], words.shape[1] * 8), dtype=np.int64)
        for c in range(words.shape[1]):
            for i, column in enumerate(AWQ_ORDER):
                out[:, 8 * c + column] = (words[:, c] >> (4 * i)) & 0xF
        return out

    q, z = nibbles(qweight), nibbles(qzeros)  # [in, out], [groups, out]
    group = q.shape[0] // z.shape[0]
    s = scales.float().numpy()
    w_t = (q - np.repeat(z, group, axis=0)) * np.repeat(s, group, axis=0)
    return torch.from_numpy(w_t.T.astype(np.float32))


def decoder_layer_of(folder: Path, index: int, hidden: list[torch.Tensor], tmp_path: Path, dtype: torch.dtype = torch.float32,
                     attention: str = "eager", experts: bool = False):
    """(the pipeline's DecoderLayer of layer `index` over the samples `hidden`, the dialect record);
    `experts`: a sparse layer's experts handed to it as the pipeline does."""
    from internvl_tools.calibrate.activations import Activations
    from internvl_tools.calibrate.pipeline import DecoderLayer
    from internvl_tools.models.layout import build_layout
    from internvl_tools.models.native_map import links
    from internvl_tools.models.views import open_view
    from internvl_tools.runtime.build import build_decoder_layer

    with open_view(folder, native_dialect=True) as view:
        config = view.config()
        layout = build_layout(config, view.specs())
        module, rotary = build_decoder_layer(view, config, layout, index, dtype, attention=attention)
        stems = {layout.keys[k].module: k.removesuffix(f".{layout.keys[k].param}") for k in layout.llm_layer_keys(index)}
        all_links = {link.original: link for link in links(config, layout, adapt_v1=False)}
    acts = Activations(tmp_path / "acts", 2**30)
    for h in hidden:
        acts.append(h)
    return DecoderLayer(index, module, rotary, acts, stems, all_links, "cpu", layout.record.experts if experts else None), layout.record


def transformers_and_runtime_logits(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformers', our runtime's) float32 logits of one image prompt on a native-layout folder,
    after asserting that AutoModelForImageTextToText loads it with no missing, unexpected or
    mismatched keys."""
    from transformers import AutoModelForImageTextToText

    from internvl_tools.runtime.model import InternVLRuntime

    model, info = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, device_map="cpu")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    runtime = InternVLRuntime(folder, dtype=torch.float32)
    pixels = runtime.pixel_values(sample_image(5))
    ids = runtime.prompt_ids("Describe the image.", pixels.shape[0])
    with torch.no_grad():
        theirs = model(input_ids=ids, pixel_values=pixels).logits
    return theirs, runtime.logits(ids, pixels)
