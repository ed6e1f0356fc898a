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

echo "== shard: re-shard losslessly into 100 KB shards"
$BIN shard "$WORK/76b" -o "$WORK/76b-resharded" --max-shard-size 100KB
$BIN inspect "$WORK/76b-resharded" --json | .venv/bin/python -c "import json,sys; r=json.load(sys.stdin); print('re-sharded:', r['shards'], 'shards,', r['tensors'], 'tensors,', r['bytes']['total'], 'bytes')"
echo "demo finished: outputs in $WORK/"
