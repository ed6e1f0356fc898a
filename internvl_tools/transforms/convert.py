"""`convert`: original remote-code layout <-> transformers-native InternVL layout, streamed.

--to hf writes InternVLForConditionalGeneration's keys and config (loadable with
AutoModelForImageTextToText, no remote code) plus `internvl_original.json`, which keeps the
original config and key order so that --to original restores the checkpoint bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..models.layout import build_layout
from ..models.native_map import SIDECAR, links
from ..errors import InputError
from ..io.reader import CheckpointReader, read_json
from ..io.safetensors_format import TensorSpec
from ..models.native_config import native_config
from .stream import run_transform, to_native_outputs, to_original_outputs



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
        layout = build_layout(config, reader.specs())
        keys = reader.keys()
    native = native_config(config, layout.dialect, image_token_id(source))
    quant = config.get("quantization_config")
    if quant:
        native["quantization_config"] = native_quantization_config(quant, layout.dialect, source)
    outputs = to_native_outputs(links(config, layout, adapt_v1=True))
    files: dict[str, object] = {"config.json": native, SIDECAR: {"config": config, "keys": keys}}
    remote_code = {p.name: None for p in Path(source).glob("*.py")}  # the native class needs none
    return run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                         files={**remote_code, **files}, progress=progress)


def native_quantization_config(quant: dict, dialect: str, source: Path) -> dict:
    """A quantized checkpoint's quantization_config with module names of the native layout.

    Quantized LLM tensors are renamed only, so the dialects whose LLM keys the native layout
    keeps (Llama, Qwen2, Phi-3) convert; InternLM2's fused wqkv would have to be split across
    packed columns, which is refused: convert first, then quantize the native checkpoint.
    """
    if dialect == "internlm2":
        raise InputError(f"{source}: a quantized InternLM2 checkpoint cannot be converted (its fused wqkv is packed); "
                         "convert the bf16 checkpoint first, then quantize the converted one")
    method = quant.get("quant_method")
    if method == "gptq":
        from ..formats.gptq import gptq_quantization_config
        from ..calibrate.gptq import GPTQConfig

        config = GPTQConfig(bits=quant["bits"], group_size=quant["group_size"], sym=quant["sym"], desc_act=quant["desc_act"],
                            damp=quant.get("damp_percent", 0.01))
        return gptq_quantization_config(config, "native")
    if method == "bitsandbytes":
        renames = {"vision_model": "model.vision_tower", "mlp1": "model.multi_modal_projector", "language_model.lm_head": "lm_head"}
        skip = [renames.get(m, m.replace("language_model.model.", "model.language_model.", 1)) for m in quant.get("llm_int8_skip_modules", [])]
        return dict(quant, llm_int8_skip_modules=skip)
    raise InputError(f"{source}: cannot convert a {method} checkpoint; convert the bf16 checkpoint, then quantize")


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
