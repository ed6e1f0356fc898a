"""LoRA adapters, read and validated: InternVL's embedded LoRA and PEFT adapter folders.

Everything here is metadata and small tensors; the merge itself streams (merge_lora.py).
A LoRA delta for a base weight W [out, in] is scale x B @ A with A [r, in], B [out, r]
(transposed when fan_in_fan_out), scale = alpha / r, or alpha / sqrt(r) with rsLoRA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..models.layout import Layout
from ..errors import InputError
from ..io.reader import read_json
from ..io.safetensors_format import read_header

LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?$")
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude; a plain LoRA merge would be wrong",
    "lora_bias": "LoRA with lora_bias trains a bias on lora_B",
}


@dataclass(frozen=True)
class Delta:
    """One low-rank update of a base tensor."""

    base_key: str  # key in the (plain, original-layout) checkpoint
    a: str  # key of A in its source
    b: str
    scale: float
    source: str  # "embedded" or the adapter folder
    fan_in_fan_out: bool = False
    embedding: bool = False  # lora_embedding_A/B: delta = (B @ A).T


@dataclass
class AdapterSet:
    """All deltas and full-tensor replacements to apply, by base key."""

    deltas: dict[str, list[Delta]] = field(default_factory=dict)
    replacements: dict[str, tuple[str, str]] = field(default_factory=dict)  # base key -> (source, key)

    def add(self, delta: Delta) -> None:
        self.deltas.setdefault(delta.base_key, []).append(delta)


def embedded_deltas(layout: Layout, shapes: dict[str, tuple[int, ...]], alpha: float | None) -> AdapterSet:
    """Deltas of the LoRA saved inside an InternVL checkpoint (alpha = 2r unless given)."""
    result = AdapterSet()
    factors: dict[str, dict[str, str]] = {}
    for key, info in layout.keys.items():
        if info.lora:
            factors.setdefault(info.plain_key, {})[info.lora] = key
    for plain, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise InputError(f"LoRA for {plain!r} has only lora_{next(iter(pair))}; the checkpoint is incomplete")
        rank = shapes[pair["A"]][0]
        result.add(Delta(plain, pair["A"], pair["B"], (alpha if alpha is not None else 2 * rank) / rank, "embedded"))
    return result


def plain_key(key: str) -> str:
    """A checkpoint key with peft's wrapping removed."""
    for tower in ("language_model", "vision_model"):
        if key.startswith(f"{tower}.base_model.model."):
            key = key.replace(f"{tower}.base_model.model.", f"{tower}.", 1)
    return key.replace(".base_layer.", ".")


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter folder: its config and where its tensors are."""

    folder: Path
    config: dict
    weights: Path
    keys: tuple[str, ...]


def open_peft_adapter(folder: Path) -> PeftAdapter:
    """Read and check adapter_config.json and the weights file's key list."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        raise InputError(f"{folder}: no adapter_config.json; pass a PEFT adapter folder (saved with save_pretrained)")
    config = read_json(config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{config_path}: peft_type {peft_type} is not LoRA; only LoRA adapters can be merged")
    for option, reason in UNSUPPORTED.items():
        if config.get(option):
            raise InputError(f"{config_path}: {option} is set: {reason}; merge it with peft's merge_and_unload instead")
    safetensors = folder / "adapter_model.safetensors"
    binary = folder / "adapter_model.bin"
    if safetensors.exists():
        keys = tuple(read_header(safetensors).tensors)
        weights = safetensors
    elif binary.exists():
        import torch

        keys = tuple(torch.load(binary, map_location="cpu", weights_only=True))
        weights = binary
    else:
        raise InputError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    if any("lora_magnitude_vector" in k for k in keys):
        raise InputError(f"{weights}: holds DoRA magnitude vectors; a plain LoRA merge would be wrong")
    return PeftAdapter(folder, config, weights, keys)


def peft_deltas(adapter: PeftAdapter, base_keys: set[str], result: AdapterSet) -> None:
    """Add an adapter's deltas and replacements, mapping its keys onto the base checkpoint.

    Adapters trained on the whole InternVL model have keys under language_model. /
    vision_model. / mlp1.; adapters trained on the bare LLM are applied to language_model.*.
    """
    config = adapter.config
    pairs: dict[str, dict[str, str]] = {}
    embeddings: set[str] = set()
    for key in adapter.keys:
        match = LORA_KEY.match(key) or EMBED_KEY.match(key)
        if match:
            module = match.group("module")
            pairs.setdefault(module, {})[match.group("ab")] = key
            if "lora_embedding" in key:
                embeddings.add(module)
            continue
        if ".lora_" in key:
            raise InputError(f"{adapter.weights}: key {key!r} is a LoRA tensor this tool does not know")
        target = _base_key(key, base_keys, adapter)
        result.replacements[target] = (str(adapter.weights), key)  # modules_to_save / trained biases
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise InputError(f"{adapter.weights}: {module!r} has only lora_{next(iter(pair))}; the adapter is incomplete")
        base = _base_key(module + ".weight", base_keys, adapter)
        rank, alpha = _rank_alpha(config, module)
        scale = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
        result.add(Delta(base, pair["A"], pair["B"], scale, str(adapter.weights),
                         bool(config.get("fan_in_fan_out")), module in embeddings))


def _base_key(key: str, base_keys: set[str], adapter: PeftAdapter) -> str:
    stripped = key.removeprefix("base_model.model.")
    stripped = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", stripped)
    candidates = [stripped] if stripped.startswith(("language_model.", "vision_model.", "mlp1.")) else [f"language_model.{stripped}"]
    for candidate in candidates:
        if candidate in base_keys:
            return candidate
    raise InputError(f"{adapter.weights}: key {key!r} has no base weight {candidates[0]!r}; is this adapter for another model?")


def _rank_alpha(config: dict, module: str) -> tuple[int, float]:
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            rank = value
            break
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            alpha = value
            break
    return int(rank), float(alpha)
