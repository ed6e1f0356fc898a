"""Module names in quantization_config rules, for both layouts and every loader we claim.

A quantization_config names the modules a loader must leave unquantized. The names differ by
layout (original: `vision_model`, `mlp1`, `language_model.model.layers.N...`,
`language_model.lm_head`; native: `model.vision_tower`, `model.multi_modal_projector`,
`model.language_model.layers.N...`, `lm_head`) and, for the native layout, by loader:
transformers names modules as stored, vLLM's InternVL model maps them to `vision_tower`,
`multi_modal_projector`, `language_model.model.layers.N...` and `language_model.lm_head`.
The rules written here match both. Prefixes come from models/vision.py.
"""

from __future__ import annotations

import re

from ..errors import InputError
from ..models.dialects import DIALECTS, Dialect
from ..models.native_map import native_llm_module
from ..models.vision import LLM_PREFIX, NATIVE_HEAD, NATIVE_LLM_PREFIX, PROJECTOR, VISION
from .base import check_layout_name

VISION_RENAMES = dict(VISION.renames)
PROJECTOR_RENAMES = dict(PROJECTOR.renames)
ORIGINAL_HEAD = f"{LLM_PREFIX}.lm_head"
# sample module names of each tower, to recognise a regex rule that names a whole tower
_TOWER_SAMPLES = {
    VISION.prefix: f"{VISION.prefix}.encoder.layers.0.{VISION.fused_qkv}",
    PROJECTOR.prefix: f"{PROJECTOR.prefix}.{PROJECTOR.linears[0]}",
}


def towers(layout: str) -> dict[str, str]:
    """{"vision": module, "projector": module} of a layout (native adds "head": lm_head).

    Raises ValueError for an unknown layout name."""
    check_layout_name(layout)
    if layout == "native":
        return {"vision": VISION.native_prefix, "projector": PROJECTOR.native_prefix, "head": NATIVE_HEAD}
    return {"vision": VISION.prefix, "projector": PROJECTOR.prefix}


def vllm_name(module: str) -> str:
    """The name vLLM gives a native-layout module (unchanged for original-layout names)."""
    for native, vllm in ((VISION.native_prefix, VISION.native_prefix.removeprefix("model.")),
                         (PROJECTOR.native_prefix, PROJECTOR.native_prefix.removeprefix("model.")),
                         (NATIVE_LLM_PREFIX, f"{LLM_PREFIX}.model"),
                         (NATIVE_HEAD, ORIGINAL_HEAD)):
        if module == native or module.startswith(native + "."):
            return vllm + module[len(native):]
    return module


def loader_names(modules, layout: str) -> list[str]:
    """Plain module names for prefix/substring matchers (bitsandbytes' `llm_int8_skip_modules`,
    AWQ's `modules_to_not_convert`): each module, and on the native layout its vLLM name too."""
    check_layout_name(layout)
    names: list[str] = []
    for module in modules:
        for name in (module, vllm_name(module)) if layout == "native" else (module,):
            if name not in names:
                names.append(name)
    return names


def _tower_word(module: str) -> str | None:
    """The distinctive word of a whole-tower module name (vision_model, vision_tower, mlp1, ...)."""
    for name in (VISION.prefix, PROJECTOR.prefix, VISION.native_prefix, PROJECTOR.native_prefix):
        if module == name:
            return name.rpartition(".")[2]
    return None


def module_regex(module: str, layout: str) -> str:
    """A regex (re.match semantics) matching this module in every loader: a whole tower as
    `.*vision_tower.*`, any other module exactly (and, native, also by its vLLM name)."""
    check_layout_name(layout)
    word = _tower_word(module)
    if word is not None:
        return f".*{re.escape(word)}.*"
    names = loader_names([module], layout)
    return (re.escape(names[0]) if len(names) == 1 else "(?:" + "|".join(map(re.escape, names)) + ")") + "$"


def ignore_rules(modules, layout: str) -> list[str]:
    """compressed-tensors `ignore` entries: `re:` rules for towers and native names, exact
    names where every loader uses the same one (compressed-tensors compares those literally)."""
    rules = []
    for module in modules:
        if _tower_word(module) is None and layout == "original":
            rules.append(module)
        else:
            rules.append("re:" + module_regex(module, layout))
    return rules


def negative_rules(layout: str) -> list[str]:
    """GPTQModel / vLLM `dynamic` rules that keep the vision tower and projector unquantized."""
    return [f"-:{module_regex(m, layout)}" for m in (towers(layout)["vision"], towers(layout)["projector"])]


def native_modules(module: str, record: Dialect | None = None) -> tuple[str, ...]:
    """The native module name(s) of an original-layout module (InternViT's fused qkv is three;
    with the LLM's dialect `record`, its head and decoder linears by their native names, e.g.
    InternLM2's `output` -> lm_head, `attention.wqkv` -> self_attn.q/k/v_proj).

    Raises InputError for a name outside InternVL's linears and towers."""
    v, p = VISION.prefix, PROJECTOR.prefix
    if module in (v, p):
        return (towers("native")["vision" if module == v else "projector"],)
    match = re.fullmatch(rf"{re.escape(v)}\.encoder\.layers\.(\d+)\.(.+)", module)
    if match:
        base = f"{VISION.native_prefix}.encoder.layer.{match.group(1)}."
        inner = match.group(2)
        if inner == VISION.fused_qkv:
            return tuple(f"{base}attention.{x}_proj" for x in "qkv")
        if inner in VISION_RENAMES:
            return (base + VISION_RENAMES[inner],)
    if module.startswith(p + ".") and module[len(p) + 1:] in PROJECTOR_RENAMES:
        return (f"{PROJECTOR.native_prefix}.{PROJECTOR_RENAMES[module[len(p) + 1:]]}",)
    if module == _original_head(record):
        return (NATIVE_HEAD,)
    if module.startswith(f"{LLM_PREFIX}.model."):
        inner = module[len(LLM_PREFIX) + 7:]
        layer = re.fullmatch(r"(layers\.\d+\.)(.+)", inner)
        if record is not None and layer:
            return tuple(f"{NATIVE_LLM_PREFIX}.{layer.group(1)}{n}" for n in native_llm_module(record, layer.group(2)))
        return (f"{NATIVE_LLM_PREFIX}.{inner}",)
    raise InputError(f"quantization_config names module {module!r}, which has no native-layout name; "
                     "convert the bf16 checkpoint first, then quantize the converted one")


def _original_head(record: Dialect | None) -> str:
    return ORIGINAL_HEAD if record is None else f"{LLM_PREFIX}.{record.head}"


def router_regex(record: Dialect | None) -> str | None:
    """A regex (re.match semantics) naming the router of every sparse layer under each layout's and loader's
    name (Qwen3-MoE: `.*\\.mlp\\.gate$`, never an expert's or a dense MLP's gate_proj); None for a dense
    dialect. Quantized outputs name it as kept: vLLM builds the router as a linear layer (GateLinear) and
    quantizes it unless a rule says not to, while the checkpoint holds it in float."""
    if record is None or record.experts is None:
        return None
    return r".*\." + re.escape(record.experts.router) + "$"


def router_rules() -> frozenset[str]:
    """The router regexes of every sparse dialect: rules that read the same in both layouts."""
    return frozenset(r for r in (router_regex(d) for d in DIALECTS.values()) if r)


def original_routers(names) -> list[str]:
    """The routers a skip list of plain module names (bitsandbytes `llm_int8_skip_modules`, AWQ
    `modules_to_not_convert`) names one by one (`...layers.N.mlp.gate`, either layout's or vLLM's
    name), under their original-layout names. Routers are no linears of the layout, so
    `original_modules` cannot carry them."""
    return [name if name.startswith(LLM_PREFIX + ".") else f"{LLM_PREFIX}.model.{name[len(NATIVE_LLM_PREFIX) + 1:]}"
            for name in names if name.startswith((NATIVE_LLM_PREFIX + ".", LLM_PREFIX + ".model."))
            and any(re.match(rule, name) for rule in router_rules())]


def native_rule(rule: str, record: Dialect | None = None) -> list[str]:
    """A compressed-tensors `ignore` entry of the original layout, rewritten for the native one.

    Exact names are renamed; a `re:` rule is accepted when it names a whole tower (then the
    native tower rule replaces it) or is a router rule (the same in both layouts), and refused
    with InputError otherwise."""
    if rule.startswith("re:") and rule[3:] in router_rules():
        return [rule]
    if not rule.startswith("re:"):
        return ignore_rules(native_modules(rule, record), "native")
    pattern = re.compile(rule[3:])
    for tower, sample in _TOWER_SAMPLES.items():
        if pattern.match(sample) and not pattern.match(f"{LLM_PREFIX}.model.layers.0.mlp.down_proj"):
            return ignore_rules(native_modules(tower), "native")
    if pattern.match(_original_head(record)) and not pattern.match(f"{LLM_PREFIX}.model.layers.0.mlp.down_proj"):
        return ignore_rules([NATIVE_HEAD], "native")
    raise InputError(f"quantization_config rule {rule!r} cannot be rewritten for the native layout; "
                     "convert the bf16 checkpoint first, then quantize the converted one")


# -- native -> original -----------------------------------------------------------------------
def skipped_by_name(native: str, names) -> bool:
    """True when a skip list of plain module names (bitsandbytes, AWQ) names this native module
    or a module above it, under transformers' or vLLM's name."""
    paths = ("." + native + ".", "." + vllm_name(native) + ".")
    return any(("." + name + ".") in path for name in names for path in paths)


def ignored_by_rule(native: str, rules) -> bool:
    """True when a compressed-tensors `ignore` list (exact names, `re:` rules matched from the
    start) leaves this native module unquantized, under transformers' or vLLM's name."""
    for rule in rules:
        for name in (native, vllm_name(native)):
            if (re.match(rule[3:], name) if rule.startswith("re:") else rule == name):
                return True
    return False


def original_modules(modules: dict[str, str], kept) -> list[str]:
    """The original-layout module names that stand for the native modules in `kept`.

    `modules`: {native linear module: original linear module} for every linear of the checkpoint
    (the head included; InternViT's q/k/v_proj all map to attn.qkv); `kept`: a predicate on native
    module names. A tower whose every linear is kept is named as the tower (vision_model, mlp1).
    Raises InputError when only some native parts of one fused original linear are kept."""
    chosen: dict[str, list[bool]] = {}
    for native, original in modules.items():
        chosen.setdefault(original, []).append(bool(kept(native)))
    partial = [o for o, flags in chosen.items() if any(flags) and not all(flags)]
    if partial:
        raise InputError(f"quantization_config keeps only some native parts of {partial[0]} unquantized; the original layout "
                         "cannot express that (its parts are one fused linear)")
    out: list[str] = []
    for tower in (VISION.prefix, PROJECTOR.prefix):
        members = [o for o in chosen if o.startswith(tower + ".")]
        if members and all(chosen[o][0] for o in members):
            out.append(tower)
            for o in members:
                chosen.pop(o)
    return out + [o for o, flags in chosen.items() if flags[0]]
