"""`export --format onnx` on an InternViT-6B-shaped tower vs a plain torch.onnx.export of it.

The checkpoint has InternVL2-Llama3-76B's true widths (InternViT-6B-448px-V1-5: 3200 wide,
MLP 12800, mlp1 12800 -> 8192) with fewer vision layers (default 8) and one LLM layer. Both
exports are timed in fresh processes with peak RSS (GNU time); the full 45-layer figures are
projected linearly in weight bytes (our peak does not grow with depth: one tensor at a time).

Run: python benchmarks/bench_export_onnx.py [--vision-layers 8] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, ROOT, WORK, folder_bytes, fresh, markdown_table, timed  # noqa: E402

FAMILY = "InternVL2-Llama3-76B"


def vision_checkpoint(layers: int) -> Path:
    from internvl_tools.tiny.generator import make_checkpoint

    out = WORK / f"{FAMILY}-vision{layers}"
    if not (out / "config.json").exists():
        make_checkpoint(FAMILY, out, wide=True, vision_layers=layers, llm_layers=1, shards=4, overwrite=True)
    return out


def tower_bytes(checkpoint: Path) -> tuple[int, int, int]:
    """(bytes of vision + mlp1 tensors, bytes of one vision layer, largest of them) as stored (bf16)."""
    from internvl_tools.io.reader import CheckpointReader

    with CheckpointReader(checkpoint) as reader:
        specs = [s for s in reader.specs() if s.name.startswith(("vision_model.", "mlp1."))]
        layer0 = sum(s.nbytes for s in specs if s.name.startswith("vision_model.encoder.layers.0."))
        return sum(s.nbytes for s in specs), layer0, max(s.nbytes for s in specs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    from internvl_tools.models.families import FAMILIES

    checkpoint = vision_checkpoint(args.vision_layers)
    stored, per_layer, largest = tower_bytes(checkpoint)
    full_layers = FAMILIES[FAMILY].vision.num_hidden_layers
    full_stored = stored + (full_layers - args.vision_layers) * per_layer
    scale = full_stored / stored
    out = WORK / "export-onnx"
    rows = []
    for dtype in ("fp32", "fp16"):
        seconds, rss = timed([sys.executable, "-m", "internvl_tools", "export", str(checkpoint), "-o", str(fresh(out)),
                              "--dtype", dtype, "--no-check", "--json"])
        written = folder_bytes(out, ".data")
        copy = fresh(WORK / "export-onnx-cp")
        cp_seconds, _ = timed(["bash", "-c", f"mkdir -p '{copy}' && cp '{out}/model.onnx.data' '{copy}/' && sync '{copy}/model.onnx.data'"])
        fresh(copy)
        itemsize = 4 if dtype == "fp32" else 2
        bound = 1.5 * GIB + largest * itemsize // 2
        rows.append([f"internvl-tools export --dtype {dtype}", f"{written / GIB:.2f}", f"{seconds:.1f}", f"{cp_seconds / seconds:.2f}x",
                     f"{rss / GIB:.2f}", f"{bound / GIB:.2f}", f"{seconds * scale:.0f}", f"{rss / GIB:.2f}"])
    meta = json.loads((out / "export.json").read_text())
    check_seconds, check_rss = timed([sys.executable, "-m", "internvl_tools", "export", str(checkpoint), "-o", str(fresh(out)),
                                      "--dtype", "fp16", "--json", "--max-batch", "3"])
    parity = json.loads((out / "export.json").read_text())["parity"]
    fresh(out)
    if not args.skip_baseline:
        baseline = WORK / "export-torch-onnx"
        seconds, rss = timed([sys.executable, str(ROOT / "benchmarks" / "torch_onnx_export_baseline.py"), str(checkpoint), str(fresh(baseline))])
        written = sum(p.stat().st_size for p in baseline.iterdir())
        copy = fresh(WORK / "export-onnx-cp")
        cp_seconds, _ = timed(["bash", "-c", f"mkdir -p '{copy}' && cp '{baseline}'/* '{copy}/' && sync '{copy}'/*"])
        fresh(copy)
        rows.append(["torch.onnx.export (dynamo, fp32)", f"{written / GIB:.2f}", f"{seconds:.1f}", f"{cp_seconds / seconds:.2f}x",
                     f"{rss / GIB:.2f}", "-",
                     f"{seconds * scale:.0f}", f"{rss * scale / GIB:.1f}"])
        fresh(baseline)
    print(f"InternViT-6B-shaped tower with {args.vision_layers} of {full_layers} layers + mlp1 (76B widths): "
          f"{meta['params'] / 1e9:.2f}B parameters, {stored / GIB:.2f} GiB bf16 stored; full tower {full_stored / GIB:.2f} GiB "
          f"(x{scale:.2f}); largest tensor {largest / GIB:.2f} GiB bf16")
    print(markdown_table(["export", "GiB written", "seconds", "vs cp + sync of those bytes", "peak RSS GiB", "bound GiB", f"projected s ({full_layers} layers)",
                          f"projected peak RSS GiB ({full_layers} layers)"], rows))
    errors = ", ".join(f"batch {row['batch']}: {row['relative_error']:.1e}" for row in parity) if isinstance(parity, list) else parity["skipped"]
    print(f"\nfp16 export with the onnxruntime parity check: {check_seconds:.1f} s, peak RSS {check_rss / GIB:.2f} GiB; "
          f"relative error vs the fp32 PyTorch forward: {errors}")


if __name__ == "__main__":
    main()
