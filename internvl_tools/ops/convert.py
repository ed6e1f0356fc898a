"""`convert`: original remote-code layout <-> transformers-native InternVL layout, streamed.

--to hf writes InternVLForConditionalGeneration's keys and config (loadable with
AutoModelForImageTextToText, no remote code) plus `internvl_original.json`, which keeps the
original config and key order so that --to original restores the checkpoint bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..arch.layout import build_layout
from ..arch.native_map import links, to_native_outputs, to_original_outputs
from ..errors import InputError
from ..io.reader import CheckpointReader, read_json
from ..io.safetensors_format import TensorSpec
from ..runtime.native_config import native_config
from .transform import run_transform

SIDECAR = "internvl_original.json"


def image_token_id(folder: Path) -> int:
    """The id of <IMG_CONTEXT> in the checkpoint's tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise InputError(f"{folder}: no tokenizer.json; the native config needs the id of <IMG_CONTEXT> from it")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    if "<IMG_CONTEXT>" not in ids:
        ids.update(tokenizer.get("model", {}).get("vocab", {}) or {})
    if "<IMG_CONTEXT>" not in ids:
        raise InputError(f"{path}: no <IMG_CONTEXT> token; an InternVL tokenizer has it")
    return ids["<IMG_CONTEXT>"]


def to_hf(source: Path, out: Path, *, max_shard_size: int, overwrite: bool = False,
          progress: Callable[[int], None] | None = None) -> Path:
    """Convert an original-layout checkpoint to the transformers-native layout."""
    with CheckpointReader(source) as reader:
        config = reader.config()
        if config.get("quantization_config"):
            raise InputError(f"{source}/config.json: the checkpoint is quantized; convert the bf16 checkpoint, then quantize")
        layout = build_layout(config, reader.specs())
        keys = reader.keys()
    outputs = to_native_outputs(links(config, layout, adapt_v1=True))
    files: dict[str, object] = {
        "config.json": native_config(config, layout.dialect, image_token_id(source)),
        SIDECAR: {"config": config, "keys": keys},
    }
    remote_code = {p.name: None for p in Path(source).glob("*.py")}  # the native class needs none
    return run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                         files={**remote_code, **files}, progress=progress)


def to_original(source: Path, out: Path, *, max_shard_size: int, overwrite: bool = False,
                progress: Callable[[int], None] | None = None) -> Path:
    """Convert a checkpoint written by `to_hf` back to the original layout, bit for bit."""
    sidecar = Path(source) / SIDECAR
    if not sidecar.exists():
        raise InputError(f"{source}: no {SIDECAR}; only checkpoints converted by `internvl-tools convert --to hf` can be converted back")
    saved = read_json(sidecar)
    config, keys = saved["config"], saved["keys"]
    layout = build_layout(config, [TensorSpec(key, "BF16", ()) for key in keys])
    outputs = to_original_outputs(links(config, layout, adapt_v1=True))
    return run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                         files={"config.json": config, SIDECAR: None}, progress=progress)
