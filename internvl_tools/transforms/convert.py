"""`convert`: original remote-code layout <-> transformers-native InternVL layout, streamed.

--to hf writes InternVLForConditionalGeneration's keys and config (loadable with
AutoModelForImageTextToText, no remote code) plus `internvl_original.json`, which keeps the
original config and key order so that --to original restores the checkpoint bit for bit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..models.layout import build_layout
from ..models.native_layout import is_native
from ..models.native_map import SIDECAR, links
from ..formats.views import open_view
from ..errors import InputError
from ..io.reader import CheckpointReader, read_json
from ..io.safetensors_format import TensorSpec
from ..formats import fused_params, refuse_unannounced_quantization, to_original as original_quantization_config
from ..models.native_config import native_config
from ..models.processor_files import FILES as PROCESSOR_FILES, original_side_files, processor_files
from .stream import Output, run_transform, to_native_outputs



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
        if is_native(config):
            raise InputError(f"{source}: already in the transformers-native layout (model_type internvl); nothing to convert")
        refuse_unannounced_quantization(reader.keys(), config)
        layout = build_layout(config, reader.specs())
        keys = reader.keys()
    if layout.lora:
        raise InputError(f"{source}: embedded LoRA adapters; merge them first with `internvl-tools merge-lora`, "
                         "then convert the merged checkpoint")
    native = native_config(config, layout.dialect, image_token_id(source))
    quant = config.get("quantization_config")
    if quant:
        native["quantization_config"] = native_quantization_config(quant, layout.dialect, source)
    if config.get("quantization_calibration"):  # what quantize calibrated with: verify reads it from config.json
        native["quantization_calibration"] = config["quantization_calibration"]
    # a fused linear's quantized tensors split as their format allows (int8: row by row; GPTQ / AWQ: refused)
    outputs = to_native_outputs(links(config, layout, adapt_v1=True, fused=fused_params(config)))
    code = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(source).glob("*.py"))}
    # the processor's files (tokenizer attributes, chat template, image processor, ...): the folder
    # works with AutoProcessor and vLLM as it is; the sidecar keeps the files they replace
    processor, warnings = processor_files(source, config)
    # the native class needs no remote code; the sidecar keeps it for `--to original`
    sidecar = {"config": config, "keys": keys, "remote_code": code, "side_files": original_side_files(source)}
    files: dict[str, object] = {**processor, "config.json": native, SIDECAR: sidecar}
    remote_code = {name: None for name in code}
    for line in conversion_warnings(config) + warnings:
        print(f"warning: {line}", file=sys.stderr)
    return run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite,
                         files={**remote_code, **files}, progress=progress)


def conversion_warnings(config: dict) -> list[str]:
    """What a user of the native output must know and config.json alone would not tell them."""
    if config.get("ps_version", "v1") != "v1":
        return []
    return ["ps_version v1 (InternVL-Chat-V1-1 / V1-2 / V1-2-Plus): the native model is exact only on transposed "
            "tiles; transformers' image processor cannot transpose, so pass pixel_values.transpose(-1, -2) to the "
            "model (with vLLM: give it image.transpose(Image.Transpose.TRANSPOSE)); see the README, `convert`"]


def native_quantization_config(quant: dict, dialect: str, source: Path) -> dict:
    """A quantized checkpoint's quantization_config with module names of the native layout.

    The rewrite is the format's (formats/*.py `to_native`), with the dialect's native linear
    names (InternLM2's wqkv -> q/k/v_proj). Whether a fused linear's quantized tensors split at
    all is the format's too (`fused`: int8 formats row by row; GPTQ / AWQ, packed across
    output rows, are refused by models/native_map.py). Raises InputError."""
    from ..formats import to_native
    from ..models.dialects import get_dialect

    return to_native(quant, get_dialect(dialect))


def to_original(source: Path, out: Path, *, max_shard_size: int, overwrite: bool = False,
                progress: Callable[[int], None] | None = None) -> Path:
    """Convert a native-layout checkpoint to the original (remote-code) layout.

    A checkpoint written by `to_hf` comes back bit for bit with its original config and key
    order (internvl_original.json); any other native checkpoint (e.g. a published "-hf" one)
    gets the original config derived from its native config (models/native_layout.py).
    Raises InputError for an original-layout input or a quantized one without the sidecar."""
    with open_view(source) as view:
        if view.layout_name != "native":
            raise InputError(f"{source}: already in the original layout (model_type {view.config().get('model_type')!r}); "
                             f"--to original reads native checkpoints (`convert --to hf` outputs with {SIDECAR}, or published -hf ones)")
        config = view.config()
        if config.get("quantization_config") and not view.sidecar:
            raise InputError(f"{source}: a quantized native checkpoint without {SIDECAR} cannot be converted back; "
                             "convert the bf16 checkpoint, then quantize")
        if config.get("quantization_config"):  # its module names, in the original layout
            config = dict(config, quantization_config=original_quantization(source, config, view))
        calibration = view.native_config.get("quantization_calibration")
        if calibration and not config.get("quantization_calibration"):  # a sidecar written before it was carried
            config = dict(config, quantization_calibration=calibration)
        outputs = [Output(key, (key,)) for key in view.keys()]
    remote_code = {p.name: None for p in Path(source).glob("*.py")}
    remote_code.update(view.remote_code)  # restored from the sidecar: the round trip is complete
    side = restored_side_files(source)
    return run_transform(source, out, outputs, max_shard_size=max_shard_size, overwrite=overwrite, names="view",
                         files={**remote_code, **side, "config.json": config, SIDECAR: None}, progress=progress)


def original_quantization(source: Path, config: dict, view) -> dict:
    """The quantization_config of a native checkpoint (its config.json: what its tensors hold) in original-layout
    module names. The sidecar's own, already in original names, is kept as written when the native one is exactly
    its rewrite (a checkpoint quantized in the original layout, then converted: bit for bit back)."""
    native = read_json(Path(source) / "config.json").get("quantization_config")
    saved = config.get("quantization_config")
    if native is None:
        return saved
    if saved is not None and saved != native:
        layout = build_layout(config, view.specs())
        try:
            if native_quantization_config(saved, layout.dialect, source) == native:
                return saved
        except InputError:
            pass
    return original_quantization_config(native, linear_modules(view))


def linear_modules(view) -> dict[str, str]:
    """{native linear module: original linear module} of a native view (the head included)."""
    layout = build_layout(view.config(), view.specs())
    modules: dict[str, str] = {}
    for key, info in layout.keys.items():
        if info.is_linear or info.part == "head":
            for native in view.link(key).natives:
                modules.setdefault(native.rpartition(".")[0], key.rpartition(".")[0])
    return modules


def restored_side_files(source: Path) -> dict[str, str | None]:
    """The side files `to_hf` replaced (tokenizer, processor configs), as they were before it
    (None: the original had none); nothing for a native checkpoint without the sidecar."""
    path = Path(source) / SIDECAR
    saved = read_json(path).get("side_files") if path.exists() else None
    if not isinstance(saved, dict):
        return {}
    return {name: saved.get(name) for name in PROCESSOR_FILES if name in saved}
