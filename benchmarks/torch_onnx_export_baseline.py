"""The reference path: a plain torch.onnx.export of the same tower (model in memory, fp32).

Builds vision tower + pixel shuffle + projector from the checkpoint with the runtime's
transformers modules, then calls torch.onnx.export (the default dynamo exporter, or the
TorchScript one with --legacy) with a dynamic batch and external data.

Run: python benchmarks/torch_onnx_export_baseline.py CHECKPOINT OUT_FOLDER [--legacy]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from internvl_tools.runtime.model import InternVLRuntime, pixel_shuffle


class Tower(nn.Module):
    """pixel_values -> image embeddings, as InternVLChatModel.extract_feature does."""

    def __init__(self, runtime: InternVLRuntime):
        super().__init__()
        self.vision, self.projector = runtime.vision, runtime.projector
        self.ratio = runtime.config.get("downsample_ratio", 0.5)
        self.version = runtime.config.get("ps_version", "v1")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        side = int(hidden.shape[1] ** 0.5)
        grid = pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), self.ratio, self.version)
        return self.projector(grid.reshape(grid.shape[0], -1, grid.shape[-1]))


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    legacy = "--legacy" in sys.argv
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runtime = InternVLRuntime(checkpoint, dtype=torch.float32, load_llm=False)
    model = Tower(runtime).eval()
    size = runtime.config.get("force_image_size") or runtime.config["vision_config"]["image_size"]
    example = torch.randn(2, 3, size, size)
    common = dict(input_names=["pixel_values"], output_names=["image_embeds"], opset_version=18, external_data=True)
    with torch.no_grad():
        if legacy:
            torch.onnx.export(model, (example,), out / "model.onnx", dynamic_axes={"pixel_values": {0: "batch"}}, dynamo=False, **common)
        else:
            torch.onnx.export(model, (example,), out / "model.onnx", dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
                              dynamo=True, **common)
    print(f"exported in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
