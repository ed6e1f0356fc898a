"""LoRA adapters, read, mapped onto the base checkpoint and validated, exactly as peft means them.

Everything here is metadata and small tensors; the merge itself streams (merge_lora.py).
A LoRA delta for a base weight W [out, in] is scale x B @ A with A [r, in], B [out, r],
scale = alpha / r, or alpha / sqrt(r) with rsLoRA; LoRA on an embedding is (B @ A).T.

What an adapter means is what `PeftModel.from_pretrained(base, adapter).merge_and_unload()`
computes (peft's `tuners/lora`), so each adapter_config.json option is either honoured the
way peft honours it, shown not to change a merge, or refused with the reason and what to do
(`OPTIONS`, `INIT_*`): a merge tool that silently merges something else is the worst outcome.

- r / lora_alpha / use_rslora / rank_pattern / alpha_pattern: per module, with peft's
  `get_pattern_key` (a pattern is a regex matched at the end of the module name, at a dot
  boundary: `re.match(rf"(.*\\.)?({pattern})$", name)`, first matching pattern wins), against
  the module name peft saw (the key after its last `base_model.model.`). The rank it gives
  must be lora_A's rows, or peft could not load the adapter either.
- target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save:
  every LoRA tensor in the file must be one peft would load for this config (its
  `check_target_module_exists`); tensors peft would drop are refused, not merged.
- init_lora_weights: "pissa" and "olora" make peft rebuild a residual base on load
  (W - scale x B0 A0 from W's SVD / QR, cast to W's dtype); it is rebuilt the same way here.
  "pissa_niter_N" (randomised SVD), "corda" (needs calibration covariances), "loftq" (a
  quantized backbone) and "lora_ga" (needs gradients) cannot be rebuilt: refused, with peft's
  conversion (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`).
- fan_in_fan_out: peft resets it to False for nn.Linear (every InternVL linear): ignored.
- bias "all" / "lora_only", modules_to_save: the saved tensors replace the base ones (cast to
  its dtype, as loading them into the module does). lora_bias: bias += scale x lora_B.bias.
- trainable_token_indices: the saved rows (`token_adapter.trainable_tokens_delta`) replace
  those rows of the embedding (peft's TrainableTokensLayer.merge).

Key layouts recognised, whatever the base checkpoint's layout (models/views.py presents every
checkpoint in original key names; a native module maps back through models/native_layout.py and
merges into its rows of a fused original tensor through the links of models/native_map.py):
- the whole original model (ms-swift for InternVL 1-3: `base_model.model.language_model.model
  .layers.N...`, `...vision_model.encoder.layers.N.attn.qkv`, `...mlp1.1`);
- the bare LLM (`base_model.model.model.layers.N...`, `base_model.model.lm_head`);
- the whole native model (LlamaFactory, ms-swift for "-hf" models: `base_model.model.model
  .language_model.layers.N...`, `...model.vision_tower.encoder.layer.N.attention.q_proj`,
  `...model.multi_modal_projector.linear_1`, `base_model.model.lm_head`; also transformers'
  older `language_model.model.` / `vision_tower.` prefixes);
- xtuner's InternVL state dict (`model.language_model.base_model.model.model.layers.N...
  .lora_A.default.weight`, `model.vision_model.base_model.model...`, `model.mlp1.*`) and
  InternVL's own embedded LoRA (`language_model.base_model.model...`, alpha = 2r).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, LayoutError
from ..io.reader import CheckpointReader, read_json
from ..io.reader import _check_symlink as check_symlink
from ..io.safetensors_format import read_header
from ..models.layout import Layout, classify_key, llm_dialect
from ..models.native_layout import modern_key, original_key
from ..models.native_map import Link, link_for_key
from ..models.vision import LLM_PREFIX, NATIVE_HEAD, NATIVE_LLM_PREFIX, PROJECTOR, VISION
from ..models.dialects import get_dialect

PEFT_WRAP = "base_model.model."
CONVERT_HINT = ("convert it with peft first: load it on the base model it was trained on and save it with "
                "`save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter as initialised>)`, "
                "which turns it into a plain LoRA adapter (rank 2r)")

# adapter_config.json options that do not change what a merge computes (training-time
# settings, metadata, sub-configs only read with another option), or that are honoured by the
# code below (see the module docstring)
NEUTRAL_OPTIONS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "bias", "fan_in_fan_out",
    "init_lora_weights", "trainable_token_indices", "lora_bias", "runtime_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
    "velora_config",  # VeLoRA changes the backward pass only; peft merges it as plain LoRA
    "use_dora", "use_qalora", "layer_replication", "target_parameters", "megatron_config", "alora_invocation_tokens",
    "arrow_config", "use_bdlora", "kasa_config", "monteclora_config",  # refused below when set
    "lora_dtype", "lorap_lr_ratio", "lorap_emb_lr",  # ms-swift's LoraConfig: training-time only
})
# option -> why a plain merge cannot reproduce it and what to do instead
REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude, which a streamed merge does not "
                "reproduce; merge it with peft (`PeftModel.from_pretrained(base, adapter).merge_and_unload()`)",
    "use_qalora": "QALoRA (use_qalora) pools the inputs of GPTQ layers; peft cannot merge it either",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) acts only after its invocation tokens, which no merged "
                               "weight reproduces; peft refuses to merge it too: serve it unmerged",
    "arrow_config": "Arrow (arrow_config) routes tokens between adapters; no single merged weight exists (peft refuses "
                    "too): merge one task adapter instead",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors; merge it with peft's merge_and_unload",
    "kasa_config": "KaSA (kasa_config) truncates the base weight's smallest singular directions and scales by "
                   "lora_diag; merge it with peft's merge_and_unload",
    "monteclora_config": "MonteCLoRA (monteclora_config) adds sampled factors; merge it with peft's merge_and_unload",
    "layer_replication": "layer_replication builds a model with duplicated layers, which the base checkpoint does not "
                         "have; merge it with peft and save the expanded model",
    "target_parameters": "target_parameters puts LoRA on nn.Parameter tensors (MoE experts), which merge-lora does not "
                         "map; merge it with peft's merge_and_unload",
    "megatron_config": "megatron_config: the adapter belongs to Megatron's parallel layers; convert it to a transformers "
                       "adapter first",
}
FLAGS = (("use_llm_lora", "llm", "LLM"), ("use_backbone_lora", "vision", "vision tower"))  # config flag, tower, name
PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal", "mica"}  # the base weight is not touched
RESIDUAL_INITS = {"pissa", "olora"}  # peft rebuilds W - scale x B0 A0 on load, deterministically from W
INIT_REFUSED = {
    "pissa_niter_": "init_lora_weights {value!r}: the adapter was trained on the residual W - scale x B0 A0 of a "
                    "randomised SVD, which peft itself recomputes differently on every load; " + CONVERT_HINT,
    "corda": "init_lora_weights 'corda': the adapter was trained on a residual base built from CorDA's calibration "
             "covariances, which cannot be rebuilt from the weights (peft cannot load it without them either); " + CONVERT_HINT,
    "loftq": "init_lora_weights 'loftq': the adapter was trained on LoftQ's quantized backbone, not on these weights; "
             "merge it into that backbone, with init_lora_weights set to true in adapter_config.json",
    "lora_ga": "init_lora_weights 'lora_ga': the adapter was trained on W minus a gradient-derived offset that cannot be "
               "rebuilt (peft silently loads it on the unmodified base, which is wrong); " + CONVERT_HINT,
}


@dataclass(frozen=True)
class Op:
    """One change to one base tensor, applied in order (see merge_lora.apply_ops).

    kind: "lora" (W + scale B A), "embedding" (W + scale (B A).T), "residual" (W -> W - scale
    B0 A0 of peft's PiSSA / OLoRA init, cast to W's dtype), "replace" (a saved full tensor),
    "rows" (trainable-token rows), "lora_bias" (bias + scale lora_B.bias). `part` is the index of
    the native tensor inside a fused original one (`base`'s link), None for the whole tensor."""

    kind: str
    base: str
    source: str  # "embedded" or an adapter weights file
    module: str  # the module as the adapter names it (peft's name)
    part: int | None = None
    a: str | None = None
    b: str | None = None
    tensor: str | None = None
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0
    init: str | None = None
    indices: tuple[int, ...] = ()
    adapter: str = "embedded"  # the adapter folder, for reports


@dataclass(frozen=True)
class Refusal:
    """Something that would not be merged: where, what, and why (one line)."""

    source: str
    item: str
    reason: str

    @property
    def message(self) -> str:
        """`source: item: reason`, without empty parts or a source the reason already starts with."""
        lead = [] if not self.source or self.reason.startswith(self.source) else [self.source]
        return ": ".join([*lead, *([self.item] if self.item else []), self.reason])


@dataclass
class AdapterSet:
    """Every change to apply, by original base key in order, and what was refused."""

    ops: dict[str, list[Op]] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, op: Op) -> None:
        self.ops.setdefault(op.base, []).append(op)

    def refuse(self, source: str, item: str, reason: str) -> None:
        self.refused.append(Refusal(str(source), item, reason))

    @property
    def deltas(self) -> dict[str, list[Op]]:
        """Base keys changed by LoRA (low-rank deltas, residuals, lora_B biases, token rows)."""
        return {k: v for k, v in self.ops.items() if any(op.kind != "replace" for op in v)}

    @property
    def replacements(self) -> dict[str, list[Op]]:
        """Base keys replaced by saved full tensors (modules_to_save, trained biases)."""
        return {k: v for k, v in self.ops.items() if any(op.kind == "replace" for op in v)}


# -- embedded LoRA (InternVL's own fine-tuning) ----------------------------------------------
def embedded_deltas(layout: Layout, shapes: dict[str, tuple[int, ...]], alpha: float | None, result: AdapterSet | None = None) -> AdapterSet:
    """Deltas of the LoRA saved inside an InternVL checkpoint (alpha = 2r unless given)."""
    result = result if result is not None else AdapterSet()
    factors: dict[str, dict[str, str]] = {}
    for key, info in layout.keys.items():
        if info.lora:
            factors.setdefault(info.plain_key, {})[info.lora] = key
    for plain, pair in factors.items():
        if set(pair) != {"A", "B"}:
            result.refuse("embedded", plain, f"LoRA has only lora_{next(iter(pair))}; the checkpoint is incomplete")
            continue
        rank = shapes[pair["A"]][0]
        value = alpha if alpha is not None else 2 * rank
        result.add(Op("lora", plain, "embedded", plain.removesuffix(".weight"), a=pair["A"], b=pair["B"], rank=rank,
                      alpha=value, scale=value / rank))
    return result


def plain_key(key: str) -> str:
    """A checkpoint key with peft's wrapping removed."""
    for tower in ("language_model", "vision_model"):
        if key.startswith(f"{tower}.{PEFT_WRAP}"):
            key = key.replace(f"{tower}.{PEFT_WRAP}", f"{tower}.", 1)
    return key.replace(".base_layer.", ".")


def flag_mismatches(config: dict, layout: Layout) -> list[str]:
    """Where config.json's use_llm_lora / use_backbone_lora disagree with the embedded LoRA tensors."""
    found = []
    for flag, family, label in FLAGS:
        value = config.get(flag) or 0
        if value and family not in layout.lora:
            found.append(f"config.json sets {flag} = {value!r} but the checkpoint has no embedded {label} LoRA tensors")
        elif family in layout.lora and not value:
            found.append(f"the checkpoint has embedded {label} LoRA tensors but config.json's {flag} is {value!r}")
    return found


# -- adapter folders -----------------------------------------------------------------------
@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter folder: its config and where its tensors are."""

    folder: Path
    config: dict
    weights: Path
    keys: tuple[str, ...]


def open_peft_adapter(folder: Path) -> PeftAdapter:
    """Read adapter_config.json and the weights file's key list (InputError when unreadable).
    Either file a symlink to outside the adapter folder is refused (CheckpointError) unless
    --follow-symlinks (CheckpointReader.follow_symlinks), as a checkpoint's shards and side files are."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise InputError(f"{folder}: no such adapter folder{' (a file: pass the folder that holds it)' if folder.exists() else ''}; "
                         "pass a PEFT adapter folder (saved with save_pretrained)")
    if not config_path.exists():
        raise InputError(f"{folder}: no adapter_config.json; pass a PEFT adapter folder (saved with save_pretrained; "
                         "for an xtuner .pth, write adapter_config.json with r and lora_alpha of its training config)")
    if not CheckpointReader.follow_symlinks:
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            check_symlink(folder, folder / name, "adapter folder")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: not a JSON object")
    safetensors = folder / "adapter_model.safetensors"
    binary = folder / "adapter_model.bin"
    if safetensors.exists():
        keys = tuple(read_header(safetensors).tensors)
        weights = safetensors
    elif binary.exists():
        keys = tuple(load_bin(binary))
        weights = binary
    else:
        raise InputError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    return PeftAdapter(folder, config, weights, keys)


def load_bin(path: Path) -> dict:
    """A torch-saved adapter state dict (xtuner's {"state_dict": ...} too)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise InputError(f"{path}: not a readable torch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and set(state) == {"state_dict"} and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path}: not a state dict of tensors")
    return state


def config_problems(config: dict) -> list[tuple[str, str]]:
    """(option, reason) for each adapter_config.json option a merge cannot honour."""
    problems = []
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        problems.append(("peft_type", f"peft_type {peft_type} is not LoRA; only LoRA adapters can be merged"))
    for option, reason in REFUSED_OPTIONS.items():
        if config.get(option):
            problems.append((option, reason))
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS and init not in RESIDUAL_INITS:
        for prefix, reason in INIT_REFUSED.items():
            if isinstance(init, str) and (init == prefix or (prefix.endswith("_") and init.startswith(prefix))):
                problems.append(("init_lora_weights", reason.format(value=init)))
                break
        else:
            problems.append(("init_lora_weights", f"init_lora_weights {init!r} is not an initialisation merge-lora knows; "
                                                  "merge it with peft's merge_and_unload"))
    for option, value in config.items():
        if option not in NEUTRAL_OPTIONS and value not in (None, False, 0, "", [], {}):
            problems.append((option, f"adapter_config.json sets {option} = {value!r}, an option merge-lora does not know "
                                     "(a newer peft?); merge it with peft's merge_and_unload"))
    return problems


# -- adapter keys ---------------------------------------------------------------------------
KEY_KINDS = (
    ("lora", re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?\.weight$")),
    ("lora_bias", re.compile(r"^(?P<module>.+)\.lora_B(?:\.(?P<name>[^.]+))?\.bias$")),
    ("embedding", re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?$")),
    ("rows", re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.(?P<name>[^.]+))?$")),
)
IGNORED_KEYS = re.compile(r"\.lora_velora_[^.]+(\.[^.]+)?$")  # VeLoRA's activation buffers: not part of a merge


def split_wrapped(module: str) -> tuple[str, str]:
    """(outer prefix, module name as peft saw it): the parts before and after the last `base_model.model.`."""
    index = module.rfind(PEFT_WRAP)
    if index < 0:
        return "", module
    return module[:index], module[index + len(PEFT_WRAP):]


def get_pattern_key(patterns, name: str) -> str | None:
    """The first rank_pattern / alpha_pattern key peft applies to module `name` (peft.utils.other.get_pattern_key)."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", name):
                return pattern
        except re.error as exc:
            raise InputError(f"rank_pattern / alpha_pattern key {pattern!r} is not a valid regex ({exc})") from None
    return None


def rank_alpha(config: dict, name: str) -> tuple[int, float, str]:
    """(r, lora_alpha, which pattern decided) for module `name`, as peft's LoraModel resolves them."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = get_pattern_key(ranks, name), get_pattern_key(alphas, name)
    rank = ranks[r_key] if r_key is not None else config.get("r", 8)
    alpha = alphas[a_key] if a_key is not None else config.get("lora_alpha", 8)
    how = ", ".join(f"{label} {key!r}" for label, key in (("rank_pattern", r_key), ("alpha_pattern", a_key)) if key is not None)
    return int(rank), float(alpha), how


def lora_scale(config: dict, rank: int, alpha: float) -> float:
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def selected(config: dict, name: str) -> bool:
    """Whether peft would put this adapter's LoRA on module `name` (tuners_utils.check_target_module_exists)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    for module in config.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){module}($|\..*)", name):
            return False
    targets = config.get("target_modules")
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return True  # peft picks them from the architecture / every linear: whatever it saved
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def quantized_base(fmt: str | None) -> str:
    """The refusal for LoRA on a quantized base linear."""
    return (f"its base linear is quantized ({fmt}); LoRA merges into full-precision weights: run merge-lora on the "
            "unquantized checkpoint, then quantize the merged output")


class BaseModel:
    """The base checkpoint, in original key names: where an adapter's module lands.

    `resolve(param_key, outer)` maps an adapter's parameter key (after peft's wrapping) to
    (original key, part) trying, in order: the original layout, the native layout (a fused
    original tensor gets `part`, the index of the native tensor in its link), the bare LLM in
    original and in native names."""

    def __init__(self, config: dict, shapes: dict[str, tuple[int, ...]], base_of: dict[str, str]):
        self.config, self.shapes, self.base_of = config, shapes, base_of
        self.dialect = llm_dialect(config)
        self.record = get_dialect(self.dialect)
        self._links: dict[str, Link] = {}
        self.quant_format: str | None = None  # the base's quantized format (gptq, bnb_int8, ...), None when plain
        self.quant_marker: str | None = None  # the parameter that marks a quantized linear (qweight, SCB, ...)

    def quantized(self, key: str) -> bool:
        """Whether the base linear owning original key `key` is stored quantized."""
        return bool(self.quant_marker) and f"{key.rpartition('.')[0]}.{self.quant_marker}" in self.base_of

    def no_base_weight(self, outer: str, inner: str) -> str:
        """Why an adapter's parameter `inner` found no base tensor: a quantized base linear, or none at all."""
        if self.quant_marker and self.resolve(outer, f"{inner.rpartition('.')[0]}.{self.quant_marker}") is not None:
            return quantized_base(self.quant_format)
        return (f"has no base weight (looked for {', '.join(repr(c) for c in self.candidates(outer, inner))}); "
                "is this adapter for another model?")

    def link(self, key: str) -> Link:
        if key not in self._links:
            self._links[key] = link_for_key(self.config, classify_key(key, self.dialect), adapt_v1=True)
        return self._links[key]

    def shape(self, key: str, part: int | None) -> tuple[int, ...]:
        shape = tuple(self.shapes[self.base_of[key]])
        if part is None:
            return shape
        import torch

        return tuple(self.link(key).split(torch.empty(shape, device="meta"))[part].shape)

    def part_name(self, key: str, part: int | None) -> str:
        return key if part is None else self.link(key).natives[part]

    def candidates(self, outer: str, inner: str) -> list[str]:
        """Where the parameter `inner` of an adapter (its key after peft's wrapping) may live."""
        tower = outer.removeprefix("model.") if outer.removeprefix("model.") in (f"{LLM_PREFIX}.", f"{VISION.prefix}.") else outer
        if tower in (f"{LLM_PREFIX}.", f"{VISION.prefix}."):  # InternVL's embedded LoRA, xtuner
            found = [tower + inner]
            if tower == f"{LLM_PREFIX}." and inner.startswith(("layers.", "embed_tokens.", "norm.")):
                found.append(f"{NATIVE_LLM_PREFIX}.{inner}")  # peft on the native LLM's base model
            return found
        if outer:
            return [outer + inner]
        found = [inner]  # the whole model, original or native layout
        if inner.startswith("model."):
            found.append(f"{LLM_PREFIX}.{inner}")  # the bare LLM
            found.append(f"{NATIVE_LLM_PREFIX}.{inner[len('model.'):]}")  # the bare LLM in native names
        else:
            found.append(f"{LLM_PREFIX}.{inner}")  # its head
        return found

    def resolve(self, outer: str, inner: str) -> tuple[str, int | None] | None:
        for candidate in self.candidates(outer, inner):
            if candidate in self.base_of:
                return candidate, None
            native = modern_key(candidate)
            if not native.startswith((f"{NATIVE_LLM_PREFIX}.", f"{VISION.native_prefix}.", f"{PROJECTOR.native_prefix}.",
                                      f"{NATIVE_HEAD}.")):
                continue
            try:
                original = original_key(native, self.record)
            except LayoutError:
                continue
            if original not in self.base_of:
                continue
            link = self.link(original)
            if native not in link.natives:
                continue
            if link.natives == (native,) and link.merge is None:
                return original, None
            return original, link.natives.index(native)
        return None


def peft_ops(adapter: PeftAdapter, base: BaseModel, result: AdapterSet, shape_of) -> None:
    """Add an adapter's changes to `result`, or its refusals (nothing raised for a bad key).

    `shape_of(key)` is the shape of a tensor in the adapter's weights file."""
    config, where = adapter.config, str(adapter.weights)
    problems = config_problems(config)
    for option, reason in problems:
        result.refuse(str(adapter.folder / "adapter_config.json"), option, reason)
    if problems:
        return
    init = config.get("init_lora_weights", True)
    if config.get("fan_in_fan_out"):
        result.notes.append(f"{adapter.folder}: fan_in_fan_out is ignored, as peft ignores it for nn.Linear "
                            "(every InternVL linear)")
    token_indices = config.get("trainable_token_indices")
    factors: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    names: set[str] = set()
    extras: list[tuple[str, str, str]] = []  # (kind, module, key) of lora_bias / rows / full tensors
    for key in adapter.keys:
        if "lora_magnitude_vector" in key:
            result.refuse(where, key, "holds DoRA magnitude vectors; " + REFUSED_OPTIONS["use_dora"].split("; ", 1)[1])
            return
        if IGNORED_KEYS.search(key):
            continue
        for kind, pattern in KEY_KINDS:
            match = pattern.match(key)
            if match:
                break
        else:
            if ".lora_" in key or "trainable_tokens" in key:
                result.refuse(where, key, "a LoRA tensor merge-lora does not know; merge it with peft's merge_and_unload")
                continue
            extras.append(("replace", key, key))
            continue
        if match.group("name"):
            names.add(match.group("name"))
        module = match.group("module")
        if kind in ("lora", "embedding"):
            factors.setdefault(module, {})[match.group("ab")] = key
            if kinds.setdefault(module, kind) != kind:
                result.refuse(where, module, "has both lora_A/B and lora_embedding_A/B")
        else:
            extras.append((kind, module, key))
    if len(names) > 1:
        result.refuse(where, "", f"holds several adapters ({', '.join(sorted(names))}); save each on its own and pass them in order")
        return
    token_modules = {module for kind, module, _ in extras if kind == "rows"}
    found_ops: list[Op] = []
    for module, pair in factors.items():
        outer, name = split_wrapped(module)
        if set(pair) != {"A", "B"}:
            result.refuse(where, module, f"has only lora_{next(iter(pair))}; the adapter is incomplete")
            continue
        if not selected(config, name):
            result.refuse(where, module, "adapter_config.json's target_modules / exclude_modules / layers_to_transform / "
                                         "modules_to_save do not select this module, so peft would drop these tensors; "
                                         "fix the config or remove them")
            continue
        found = base.resolve(outer, name + ".weight")
        if found is None:
            result.refuse(where, pair["A"], base.no_base_weight(outer, name + ".weight"))
            continue
        target, part = found
        embedding = kinds[module] == "embedding"
        if embedding and module in token_modules:
            result.refuse(where, module, "trainable_token_indices and LoRA on the same embedding; merge it with peft's merge_and_unload")
            continue
        rank, alpha, _how = rank_alpha(config, name)
        a_shape, b_shape = shape_of(pair["A"]), shape_of(pair["B"])
        problem = factor_shape_error(base.shape(target, part), a_shape, b_shape, embedding)
        if problem:
            result.refuse(where, pair["A"].rsplit(".lora_", 1)[0], f"LoRA for {base.part_name(target, part)!r}: {problem}; is this adapter for another model?")
            continue
        if a_shape[0] != rank:
            result.refuse(where, module, f"adapter_config.json gives rank {rank} (r / rank_pattern, matched on {name!r}) but "
                                         f"lora_A has {a_shape[0]} rows; peft could not load this adapter either")
            continue
        scale = lora_scale(config, rank, alpha)
        if init in RESIDUAL_INITS:
            if embedding:
                result.refuse(where, module, f"init_lora_weights {init!r} on an embedding: peft cannot load this adapter either")
                continue
            found_ops.append(Op("residual", target, where, name, part=part, rank=rank, alpha=alpha, scale=scale, init=init,
                                adapter=str(adapter.folder)))
        found_ops.append(Op("embedding" if embedding else "lora", target, where, name, part=part, a=pair["A"], b=pair["B"], rank=rank,
                      alpha=alpha, scale=scale, adapter=str(adapter.folder)))
    for kind, module, key in extras:
        if kind == "replace":
            outer, inner = split_wrapped(key)
            inner = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", inner).replace(".base_layer.", ".")
            found = base.resolve(outer, inner)
            if found is None:
                result.refuse(where, key, base.no_base_weight(outer, inner))
                continue
            target, part = found
            if tuple(shape_of(key)) != base.shape(target, part):
                result.refuse(where, key, f"is {list(shape_of(key))} but {base.part_name(target, part)!r} is {list(base.shape(target, part))}")
                continue
            found_ops.append(Op("replace", target, where, inner, part=part, tensor=key, adapter=str(adapter.folder)))
            continue
        outer, name = split_wrapped(module)
        if kind == "lora_bias":
            found = base.resolve(outer, name + ".bias")
            if found is None:
                result.refuse(where, key, f"lora_bias: {name!r} has no bias in the base checkpoint to merge it into "
                                          "(peft cannot merge it either)")
                continue
            target, part = found
            rank, alpha, _how = rank_alpha(config, name)
            if tuple(shape_of(key)) != base.shape(target, part):
                result.refuse(where, key, f"is {list(shape_of(key))} but {base.part_name(target, part)!r} is {list(base.shape(target, part))}")
                continue
            found_ops.append(Op("lora_bias", target, where, name, part=part, tensor=key, rank=rank, alpha=alpha,
                                scale=lora_scale(config, rank, alpha), adapter=str(adapter.folder)))
            continue
        # kind == "rows": trainable tokens
        indices = _token_indices(token_indices, name)
        if indices is None:
            result.refuse(where, key, "trainable token rows, but adapter_config.json's trainable_token_indices does not name "
                                      f"{name!r}; peft would not load them")
            continue
        found = base.resolve(outer, name + ".weight")
        if found is None:
            result.refuse(where, key, base.no_base_weight(outer, name + ".weight"))
            continue
        target, part = found
        rows, cols = base.shape(target, part)
        if tuple(shape_of(key)) != (len(indices), cols) or any(not 0 <= i < rows for i in indices):
            result.refuse(where, key, f"trainable_token_indices: {len(indices)} rows below {rows} expected as "
                                      f"[{len(indices)}, {cols}], found {list(shape_of(key))}")
            continue
        found_ops.append(Op("rows", target, where, name, part=part, tensor=key, indices=tuple(indices), adapter=str(adapter.folder)))
    # peft loads the saved full tensors (modules_to_save, biases) before it merges the adapter
    for op in sorted(found_ops, key=lambda op: op.kind != "replace"):
        result.add(op)


def _token_indices(option, name: str) -> list[int] | None:
    """The token indices peft's trainable_token_indices gives module `name` (a list: the input embedding)."""
    if option is None:
        return None
    if isinstance(option, list):
        return [int(i) for i in option]
    for module, indices in option.items():
        if name == module or name.endswith(f".{module}"):
            return [int(i) for i in indices]
    return None


def factor_shape_error(base_shape: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...], embedding: bool) -> str | None:
    """Why lora_A / lora_B cannot update a base tensor, or None when they fit."""
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return f"lora_A {list(a)} and lora_B {list(b)} do not share a rank"
    expected = (a[1], b[0]) if embedding else (b[0], a[1])
    if tuple(base_shape) != expected:
        return f"{'(B @ A).T' if embedding else 'B @ A'} is {list(expected)} but the base weight is {list(base_shape)}"
    return None
