#!/usr/bin/env bash
# The main job end to end on a generated checkpoint: every command that has landed, in order.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin/internvl-tools
WORK=${DEMO_DIR:-demo-work}
rm -rf "$WORK" && mkdir -p "$WORK"

echo "== make-tiny: an InternVL2-Llama3-76B-layout checkpoint with embedded LoRA, 3 shards"
$BIN make-tiny InternVL2-Llama3-76B "$WORK/76b" --lora embedded --shards 3

echo "== inspect"
$BIN inspect "$WORK/76b"

$BIN make-tiny InternVL2-Llama3-76B "$WORK/76b-plain" --shards 1

echo "== shard: re-shard losslessly into 100 KB shards"
$BIN shard "$WORK/76b" -o "$WORK/76b-resharded" --max-shard-size 100KB
$BIN inspect "$WORK/76b-resharded" --json | .venv/bin/python -c "import json,sys; r=json.load(sys.stdin); print('re-sharded:', r['shards'], 'shards,', r['tensors'], 'tensors,', r['bytes']['total'], 'bytes')"
echo "== shard --gpus: plan InternVL2-Llama3-76B-layout weights over 3 (tiny) GPUs and write device_map.json"
$BIN shard "$WORK/76b-plain" -o "$WORK/76b-3gpu" --gpus 3 --gpu-memory 600KB --reserve 1KB --context 4

echo "== convert to the transformers-native layout and back"
$BIN convert "$WORK/76b-plain" -o "$WORK/76b-hf"
.venv/bin/python - "$WORK/76b-hf" <<'PY'
import sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32)
print("transformers loaded", type(model).__name__, "without remote code")
PY
$BIN convert "$WORK/76b-hf" -o "$WORK/76b-back" --to original
cmp "$WORK/76b-plain/model.safetensors" "$WORK/76b-back/model.safetensors" && echo "round trip: bit-identical"

echo "== merge-lora: the embedded LoRA (LLM + vision) merged into the base, streamed"
$BIN merge-lora "$WORK/76b" -o "$WORK/76b-merged"

echo "== quantize the merged LLM to int8 (bitsandbytes format; InternViT stays bf16)"
$BIN quantize "$WORK/76b-merged" -o "$WORK/76b-int8" --method int8
$BIN convert "$WORK/76b-plain" -o "$WORK/76b-hf-for-int8" >/dev/null
$BIN quantize "$WORK/76b-hf-for-int8" -o "$WORK/76b-hf-int8" --method int8
.venv/bin/python - "$WORK/76b-hf-int8" <<'PY'
import sys
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
print("transformers + bitsandbytes loaded the int8 checkpoint:", type(model.model.language_model.layers[0].mlp.down_proj).__name__)
PY

echo "== export the vision tower + projector to ONNX (fp16, onnxruntime parity check at batch 1 and 3)"
$BIN export "$WORK/76b-merged" -o "$WORK/76b-vit-onnx" --dtype fp16
$BIN export "$WORK/76b-merged" -o "$WORK/76b-vit-trt" --format tensorrt || echo "(exit code $?: TensorRT needs an NVIDIA GPU and its package)"

echo "== chat on the runtime (random tiny weights: the answer is noise, the pipeline is real)"
.venv/bin/python -c "from PIL import Image; Image.new('RGB', (640, 320), (200, 30, 30)).save('$WORK/red.png')"
$BIN chat "$WORK/76b-merged" "What color is the image?" --image "$WORK/red.png" --max-new-tokens 8
$BIN chat "$WORK/76b-int8" "What color is the image?" --image "$WORK/red.png" --max-new-tokens 8
$BIN chat "$WORK/76b-merged" "What color is the image?" --image "$WORK/red.png" --max-new-tokens 8 --vision-onnx "$WORK/76b-vit-onnx"
echo "== verify: the int8 checkpoint against the merged bf16 one on a small generated slice"
.venv/bin/python - "$WORK/slice.tsv" <<'PY'
import random, sys
from pathlib import Path
from internvl_tools.io.slices import BenchItem, write_tsv
from internvl_tools.calibrate.samples import draw_image
rng = random.Random(0)
items = []
for i in range(4):
    image, color, shape = draw_image(rng)
    items.append(BenchItem(str(i), f"Is the object {color}?", "yes", image.resize((112, 112)), {}, "color"))
write_tsv(items, Path(sys.argv[1]))
PY
$BIN verify "$WORK/76b-merged" "$WORK/76b-int8" --bench "$WORK/slice.tsv" --max-new-tokens 4 --markdown "$WORK/verify.md" || echo "(verify exit code $?: a random tiny model drifts)"
echo "== verify: the ONNX vision export feeding the reference's own LLM"
$BIN verify "$WORK/76b-merged" --vision-onnx "$WORK/76b-vit-onnx" --bench "$WORK/slice.tsv" --max-new-tokens 4
echo "demo finished: outputs in $WORK/"
