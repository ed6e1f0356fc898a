"""Run an exported vision ONNX model in place of the PyTorch vision tower (chat, verify)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models.native_config import image_tokens_per_tile
from .vision_onnx import META_FILE, MODEL_FILE, session_for


class OnnxVision:
    """pixel_values [tiles, 3, S, S] -> image embeddings [tiles, tokens, llm_hidden] with onnxruntime.

    Checks that the export belongs to a checkpoint with the same tile size, token count, LLM
    width, ps_version, select_layer and downsample_ratio (InputError otherwise); batches above the export's max_batch are run in chunks."""

    def __init__(self, folder: str | Path, config: dict, device: str = "cpu"):
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.exists() or not (folder / MODEL_FILE).exists():
            raise InputError(f"{folder}: no {MODEL_FILE} and {META_FILE}; pass a folder written by `internvl-tools export --format onnx`")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise InputError("running an ONNX vision export needs onnxruntime: pip install 'internvl-tools[onnx]'") from None
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("part") != "vision+projector":
            raise InputError(f"{folder}: the export is --part {self.meta.get('part')}; the LLM needs image embeddings "
                             "(export with --part vision+projector)")
        size = config.get("force_image_size") or config["vision_config"]["image_size"]
        expected = (size, image_tokens_per_tile(config), config["llm_config"]["hidden_size"])
        found = (self.meta["image_size"], self.meta["tokens_per_tile"], self.meta["output"]["shape"][-1])
        if found != expected:
            raise InputError(f"{folder}: the export takes {found[0]} px tiles -> {found[1]} tokens x {found[2]}, but the checkpoint needs "
                             f"{expected[0]} px -> {expected[1]} x {expected[2]}; export the vision tower of this checkpoint")
        # what else decides the embeddings and export.json records: the pixel shuffle, the ViT layer read, the ratio
        for field, wanted in (("ps_version", config.get("ps_version", "v1")), ("select_layer", config.get("select_layer", -1)),
                              ("downsample_ratio", config.get("downsample_ratio", 0.5))):
            if field in self.meta and self.meta[field] != wanted:
                raise InputError(f"{folder}: the export was made with {field} {self.meta[field]!r} but the checkpoint has "
                                 f"{field} {wanted!r} (config.json); export the vision tower of this checkpoint")
        self.session = session_for(folder / MODEL_FILE, device)
        self.np_dtype = np.float16 if self.meta["dtype"] == "fp16" else np.float32
        self.max_batch = max(1, int(self.meta.get("max_batch", 1)))

    def __call__(self, pixels):
        import torch

        array = pixels.detach().float().cpu().numpy().astype(self.np_dtype)
        parts = [self.session.run([self.meta["output"]["name"]], {self.meta["input"]["name"]: array[i:i + self.max_batch]})[0]
                 for i in range(0, array.shape[0], self.max_batch)]
        return torch.from_numpy(np.concatenate(parts).astype(np.float32))


def onnx_vision(folder: str | Path | None, device: str | None = None):
    """A `vision_features` factory for runtime.model.InternVLRuntime: config -> OnnxVision
    (None when `folder` is None, i.e. the PyTorch vision tower runs)."""
    if folder is None:
        return None
    return lambda config: OnnxVision(folder, config, device or "cpu")
