"""Which part of InternVL a checkpoint key belongs to.

Every key of an original-layout (remote-code) InternVL checkpoint is classified as vision
(embeddings or encoder layer N), projector (mlp1), or llm (embeddings, decoder layer N, final
norm, head), in the key dialect of its LLM. Embedded LoRA keys (InternVL's own fine-tuning,
peft-wrapped) are recognised too. Unknown keys raise LayoutError: the tool never guesses.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

from ..errors import LayoutError
from ..io.safetensors_format import TensorSpec
from .dialects import Dialect, dialect_of_architecture, get_dialect, layer_dims, linear_shape, refuse_unsupported
from .vision import PROJECTOR, VISION

# A linear's parameter names are checked by its on-disk format (formats/), not here: the
# layout accepts any identifier after a linear's module path and leaves plain weight/bias,
# bitsandbytes SCB, GPTQ qweight ... to the format that owns them.
LINEAR_PARAMS = r"[A-Za-z_][A-Za-z0-9_]*"
NORM_PARAMS = r"(?:weight|bias)"

VISION_LINEARS = "(?:" + "|".join(re.escape(m) for m in VISION.linears) + ")"
VISION_NORMS = "(?:" + "|".join(re.escape(m) for m in VISION.norms) + ")"


def _alternation(names) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


PS_VERSIONS = ("v1", "v2")  # InternVL's pixel shuffle versions (config.json ps_version)
# dtypes whose 2-D `weight` has the float weight's [out, in] (a packed 4-bit bitsandbytes weight, uint8, has not)
UNPACKED_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I8"})
# which config fields decide a symbolic dimension of models/dialects.py (for error messages)
_HEADS = ("num_attention_heads", "num_key_value_heads", "head_dim")  # head_dim unset: hidden_size / num_attention_heads
DIM_FIELDS = {"hidden": ("hidden_size",), "q": _HEADS, "kv": _HEADS, "q+2kv": _HEADS, "inter": ("intermediate_size",),
              "2inter": ("intermediate_size",), "moe_inter": ("moe_intermediate_size",)}

LORA_SUFFIX = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass(frozen=True)
class KeyInfo:
    """What one checkpoint key is.

    `family` is vision / projector / llm; `part` is embeddings, layer, final_norm or head
    (projector keys use part "mlp1"); `layer` is the layer number for layer parts; `module`
    the dotted module path inside that part (original layout, as in models/dialects.py);
    `param` the parameter name; `lora` is None, "A" or "B" for embedded LoRA factors;
    `plain_key` the key with LoRA wrapping removed; `expert` the expert number of a routed
    expert's linear (module "mlp.experts.E.gate_proj"; models/dialects.Experts), else None.
    A sparse layer's router ("mlp.gate") is not a linear here: nothing quantizes it.
    """

    key: str
    family: str
    part: str
    layer: int | None
    module: str
    param: str
    plain_key: str
    lora: str | None = None
    linear: bool = False  # a parameter of a linear (decoder layer, ViT layer, mlp1)
    expert: int | None = None

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    @property
    def kind(self) -> str:
        """"linear" for a linear's parameter (decoder layer, ViT layer, mlp1), else "other"."""
        return "linear" if self.linear else "other"


@dataclass
class Layout:
    """The classified keys of one checkpoint plus the facts derived from them."""

    dialect: str
    keys: dict[str, KeyInfo]
    vision_layers: int
    llm_layers: int
    lora: dict[str, "LoraInfo"] = field(default_factory=dict)

    @property
    def record(self) -> Dialect:
        """The dialect record of the LLM (models/dialects.py)."""
        return get_dialect(self.dialect)

    def family_of(self, key: str) -> str:
        return self.keys[key].family

    def llm_layer_keys(self, layer: int) -> list[str]:
        """Keys of one decoder layer, in checkpoint order."""
        return [k for k, info in self.keys.items() if info.family == "llm" and info.part == "layer" and info.layer == layer]


@dataclass(frozen=True)
class LoraInfo:
    """Embedded LoRA on one tower: rank, target modules, and the config's flag."""

    family: str
    rank: int
    targets: tuple[str, ...]
    count: int
    config_flag: int


def llm_dialect(config: dict) -> str:
    """The LLM key dialect from config.json's llm_config.architectures (see models/dialects.py)."""
    llm_config = config.get("llm_config")
    if not isinstance(llm_config, dict):
        raise LayoutError("config.json: no llm_config object; this is not an original-layout InternVL checkpoint (model_type internvl_chat)")
    names = " ".join(str(c.get("_name_or_path") or "") for c in (config, llm_config))
    refuse_unsupported(llm_config, "config.json: llm_config.architectures", names)
    return dialect_of_architecture(llm_config.get("architectures") or [], "config.json: llm_config.architectures").name


def check_internvl_config(config: dict, where: str = "config.json") -> None:
    """Refuse configs that are not original-layout InternVL (e.g. already native, or another
    model) or name a pixel shuffle (ps_version) InternVL does not have; `where` names the file."""
    archs = config.get("architectures") or []
    if config.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in archs:
        raise LayoutError("config.json: this checkpoint is in the transformers-native InternVL layout; this command reads the original layout (model_type internvl_chat)")
    if config.get("model_type") != "internvl_chat" and "InternVLChatModel" not in archs:
        raise LayoutError(
            f"config.json: model_type {config.get('model_type')!r} / architectures {archs!r} is not InternVL (expected internvl_chat / InternVLChatModel)"
        )
    if not isinstance(config.get("vision_config"), dict):
        raise LayoutError("config.json: no vision_config object; an InternVL config needs vision_config and llm_config")
    ps_version = config.get("ps_version", "v1")
    if ps_version not in PS_VERSIONS:
        raise LayoutError(f"{where}: ps_version {ps_version!r} is not supported; supported: {', '.join(PS_VERSIONS)} "
                          "(InternVL's pixel shuffle versions: v1 for InternVL-Chat-V1-1 / V1-2, v2 for every later release)")


def classify_key(key: str, dialect: str) -> KeyInfo:
    """Classify one key; raise LayoutError for a key InternVL does not have."""
    plain, lora = _strip_lora(key)
    info = _classify_plain(plain, dialect)
    if info is None:
        raise LayoutError(f"key {key!r} is not part of an InternVL checkpoint with a {dialect} LLM; is this the right checkpoint (or a newer InternVL this tool does not know)?")
    return replace(info, key=key, param="weight" if lora is not None else info.param, lora=lora)


def build_layout(config: dict, specs: list[TensorSpec], *, where: str = "config.json", llm_section: str = "llm_config") -> Layout:
    """Classify every key of a checkpoint, derive layer counts and embedded LoRA, and check
    that config.json agrees with the tensors (layer counts and widths; `where` and
    `llm_section` name the file and the LLM's section in error messages)."""
    check_internvl_config(config, where)
    dialect = llm_dialect(config)
    shapes = {spec.name: spec.shape for spec in specs}
    infos = {name: classify_key(name, dialect) for name in shapes}
    layout = Layout(dialect, infos, _layer_count(infos, "vision"), _layer_count(infos, "llm"))
    layout.lora = _lora_info(config, infos, shapes)
    unpacked = {spec.name for spec in specs if spec.dtype in UNPACKED_DTYPES}
    check_config_matches(config, layout, shapes, where=where, llm_section=llm_section, unpacked=unpacked)
    return layout


def check_config_matches(config: dict, layout: Layout, shapes: dict[str, tuple[int, ...]], *, where: str = "config.json",
                         llm_section: str = "llm_config", unpacked: set[str] | None = None) -> None:
    """Raise LayoutError (naming `where`, the file, and the field: `llm_section` is the LLM's
    section there) when the config disagrees with the tensors: layer counts, widths, the
    vision tower's qkv bias, and the shapes of decoder layer 0's linears (heads, KV heads,
    head_dim, intermediate size) for the weights in `unpacked` (names whose 2-D weight has the
    float shape; None: all)."""
    vision_cfg, llm_cfg = config["vision_config"], config["llm_config"]
    for family, cfg, found in (("vision", vision_cfg, layout.vision_layers), ("llm", llm_cfg, layout.llm_layers)):
        declared = cfg.get("num_hidden_layers")
        section = "vision_config" if family == "vision" else llm_section
        if declared is not None and found and declared != found:
            raise LayoutError(f"{where}: {section}.num_hidden_layers is {declared} but the checkpoint has {found} {family} layers; "
                              "the config does not belong to these weights (fix the config or the checkpoint)")
    _check_heads(vision_cfg, "vision_config", where)
    if not (llm_cfg.get("head_dim") or layout.record.explicit_head_dim):
        _check_heads(llm_cfg, llm_section, where)
    plain = {info.plain_key: shapes[key] for key, info in layout.keys.items()
             if info.lora is None and info.param == "weight" and (unpacked is None or key in unpacked)}
    checks = [
        ("vision_model.embeddings.patch_embedding.weight", 0, vision_cfg.get("hidden_size"), "vision_config.hidden_size"),
        ("vision_model.encoder.layers.0.mlp.fc1.weight", 0, vision_cfg.get("intermediate_size"), "vision_config.intermediate_size"),
        (f"language_model.model.{layout.record.embed}.weight", 1, llm_cfg.get("hidden_size"), f"{llm_section}.hidden_size"),
        (f"language_model.model.{layout.record.embed}.weight", 0, llm_cfg.get("vocab_size"), f"{llm_section}.vocab_size"),
    ]
    bias = any(i.module == VISION.fused_qkv and i.param == "bias" for i in layout.keys.values() if i.family == "vision")
    if "qkv_bias" in vision_cfg and layout.vision_layers and bool(vision_cfg["qkv_bias"]) != bias:
        raise LayoutError(f"{where}: vision_config.qkv_bias is {vision_cfg['qkv_bias']} but the vision tower's attn.qkv "
                          f"{'has' if bias else 'has no'} bias; the config does not belong to these weights")
    experts = layout.record.experts
    if experts is not None:  # a sparse layer: its experts and their width as llm_config says
        found = {(i.layer, i.expert) for i in layout.keys.values() if i.expert is not None}
        per_layer = {layer: sum(1 for (n, _) in found if n == layer) for layer in range(layout.llm_layers)}
        declared = experts.settings(llm_cfg)["experts"]
        wrong = next((n for n, count in per_layer.items() if count != declared), None)
        if declared and wrong is not None:
            raise LayoutError(f"{where}: {llm_section}.{experts.count} is {declared} but decoder layer {wrong} has "
                              f"{per_layer[wrong]} experts; the config does not belong to these weights")
        checks.append((f"language_model.model.layers.0.{experts.module(0, experts.linears[0].name)}.weight", 0,
                       llm_cfg.get(experts.intermediate), f"{llm_section}.{experts.intermediate}"))
    _check_layers_complete(llm_cfg, layout, where, llm_section)
    for key, dim, declared, field_name in checks:
        shape = plain.get(key)
        if shape is not None and declared is not None and len(shape) > dim and shape[dim] != declared:
            raise LayoutError(f"{where}: {field_name} is {declared} but {key} has {shape[dim]} there (shape {list(shape)}); "
                              "the config does not belong to these weights")
    _check_layer_linears(llm_cfg, layout, plain, where, llm_section)
    _check_image_fields(config, layout, plain, where, llm_section)


def _check_image_fields(config: dict, layout: Layout, plain: dict[str, tuple[int, ...]], where: str, llm_section: str) -> None:
    """Top-level image settings and Qwen3's head_dim against the tensors: mlp1's input width is
    vision hidden_size / downsample_ratio^2 (pixel shuffle), select_layer (native:
    vision_feature_layer) indexes the vision tower's hidden states (-(layers+1) .. layers),
    max_dynamic_patch is at least 1, head_dim is q_norm's width. Raises LayoutError naming
    `where` and the field."""
    native = llm_section == "text_config"
    vision_cfg, llm_cfg = config["vision_config"], config["llm_config"]
    ratio, hidden = config.get("downsample_ratio"), vision_cfg.get("hidden_size")
    shuffled = plain.get("mlp1.1.weight")  # shapes are () where a view classifies keys before reading headers
    shuffled = shuffled if shuffled is not None and len(shuffled) == 2 else None
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and isinstance(hidden, int) and shuffled is not None:
        expected = hidden / ratio ** 2 if ratio > 0 else None
        if expected is None or shuffled[1] != expected:
            raise LayoutError(f"{where}: downsample_ratio is {ratio}, so mlp1 would take vision_config.hidden_size {hidden} / "
                              f"{ratio}^2 inputs, but mlp1.1.weight has {shuffled[-1]}; the config does not belong to these weights")
    layer, layers = config.get("select_layer"), layout.vision_layers
    name = "vision_feature_layer" if native else "select_layer"
    if isinstance(layer, int) and not isinstance(layer, bool) and layers and not -(layers + 1) <= layer <= layers:
        raise LayoutError(f"{where}: {name} is {layer} but the vision tower has {layers} layers "
                          f"({layers + 1} hidden states: {-(layers + 1)} .. {layers}); the config does not belong to these weights")
    patches = config.get("max_dynamic_patch")
    if not native and patches is not None and (not isinstance(patches, int) or isinstance(patches, bool) or patches < 1):
        raise LayoutError(f"{where}: max_dynamic_patch is {patches!r}; it must be an integer of at least 1 (12 in the released models)")
    head_dim = llm_cfg.get("head_dim")
    norm = plain.get("language_model.model.layers.0.self_attn.q_norm.weight")
    if norm is None:  # q_norm is a norm, not a linear weight `plain` holds only when classified so
        norm = next((shape for key, shape in plain.items() if key.endswith("layers.0.self_attn.q_norm.weight")), None)
    if isinstance(head_dim, int) and norm is not None and len(norm) == 1 and norm[0] != head_dim:
        raise LayoutError(f"{where}: {llm_section}.head_dim is {head_dim} but language_model.model.layers.0.self_attn.q_norm.weight "
                          f"has width {norm[0]}; the config does not belong to these weights")


def _check_layers_complete(llm_cfg: dict, layout: Layout, where: str, section: str) -> None:
    """Every decoder layer must hold every module its dialect record names: the dense linears,
    the norms and, in a sparse layer, the router and each expert's linears (0 .. num_experts-1,
    the config's count, else the most any layer has) and top-k within 1 .. num_experts. A missing
    one would be loaded with random weights by transformers; raises LayoutError naming `where`,
    the module and the key."""
    if not layout.llm_layers:
        return
    record = layout.record
    present: dict[int, set[str]] = {}
    for info in layout.keys.values():
        if info.family == "llm" and info.part == "layer":
            present.setdefault(info.layer, set()).add(info.module)
    expected = [*record.linear_names, *record.norms, *record.extra_norms]
    experts = record.experts
    if experts is not None:
        settings = experts.settings(llm_cfg)
        count = settings["experts"] or max((i.expert + 1 for i in layout.keys.values() if i.expert is not None), default=0)
        top_k = llm_cfg.get(experts.top_k)
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= count):
            raise LayoutError(f"{where}: {section}.{experts.top_k} is {top_k!r} but it must be between 1 and "
                              f"{section}.{experts.count} ({count}); the config does not belong to these weights")
        expected += [experts.router, *(experts.module(e, item.name) for e in range(count) for item in experts.linears)]
    for layer in range(layout.llm_layers):
        modules = present.get(layer, set())
        missing = [m for m in expected if m not in modules]
        if missing:
            key = f"language_model.model.layers.{layer}.{missing[0]}.weight"
            what = f"router {missing[0]}" if experts is not None and missing[0] == experts.router else missing[0]
            raise LayoutError(f"{where}: decoder layer {layer} has no {what} ({key}; {len(missing)} missing in that layer) but "
                              f"{section} expects it; the checkpoint is incomplete (re-download or re-create it)")


def _check_heads(cfg: dict, section: str, where: str) -> None:
    """num_attention_heads must divide hidden_size where head_dim is derived from them."""
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and (heads <= 0 or hidden % heads):
        raise LayoutError(f"{where}: {section}.num_attention_heads is {heads}, which does not divide {section}.hidden_size "
                          f"{hidden}; the config does not belong to these weights")


def _check_layer_linears(llm_cfg: dict, layout: Layout, plain: dict[str, tuple[int, ...]], where: str, section: str) -> None:
    """Decoder layer 0's linear weights against the shapes the config's heads, KV heads, head_dim
    and widths give (models/dialects.py `layer_dims`): a head count that does not fit the q/k/v
    rows is refused here, not in the middle of a forward pass."""
    if not layout.llm_layers:
        return
    try:
        dims = layer_dims(llm_cfg)
    except (KeyError, TypeError, ZeroDivisionError):
        return  # a config without these fields: nothing to compare
    for linear in layout.record.linears:
        key = f"language_model.model.layers.0.{linear.name}.weight"
        shape = plain.get(key)
        if shape is None or len(shape) != 2:
            continue
        expected = linear_shape(linear, dims)
        for axis, symbol in enumerate(linear.shape):
            if shape[axis] != expected[axis]:
                fields = ", ".join(f"{section}.{f} {llm_cfg[f]}" for f in DIM_FIELDS.get(symbol, ()) if llm_cfg.get(f) is not None)
                raise LayoutError(f"{where}: {fields} imply {key} {list(expected)} but it is {list(shape)}; "
                                  "the config does not belong to these weights")


def _strip_lora(key: str) -> tuple[str, str | None]:
    """Remove peft wrapping (`base_model.model.`, `.base_layer`, lora factors) from a key."""
    lora = None
    match = LORA_SUFFIX.match(key)
    if match:
        key = match.group("base") + ".weight"
        lora = match.group("ab")
    for tower in ("language_model", "vision_model"):
        key = key.replace(f"{tower}.base_model.model.", f"{tower}.", 1) if key.startswith(f"{tower}.base_model.model.") else key
    key = key.replace(".base_layer.", ".")
    return key, lora


def _classify_plain(key: str, dialect: str) -> KeyInfo | None:
    for pattern, family, part, linear in _patterns(dialect):
        match = pattern.fullmatch(key)
        if match:
            groups = match.groupdict()
            layer = int(groups["layer"]) if groups.get("layer") is not None else None
            expert = int(groups["expert"]) if groups.get("expert") is not None else None
            return KeyInfo(key, family, part, layer, groups["module"], groups.get("param") or "", key, None, linear, expert)
    return None


_PATTERN_CACHE: dict[str, list[tuple[re.Pattern, str, str, bool]]] = {}


def _patterns(dialect: str) -> list[tuple[re.Pattern, str, str, bool]]:
    """(regex, family, part, is_linear) for every key an original checkpoint of `dialect` may hold."""
    if dialect not in _PATTERN_CACHE:
        record = get_dialect(dialect)
        v, p = re.escape(VISION.prefix), re.escape(PROJECTOR.prefix)
        layer_linears = _alternation(record.linear_names)
        layer_norms = _alternation([*record.norms, *record.extra_norms])
        raw = [
            (rf"{v}\.embeddings\.(?P<module>class_embedding|position_embedding)", "vision", "embeddings", False),
            (rf"{v}\.embeddings\.(?P<module>patch_embedding)\.(?P<param>weight|bias)", "vision", "embeddings", False),
            (rf"{v}\.encoder\.layers\.(?P<layer>\d+)\.(?P<module>{VISION_LINEARS})\.(?P<param>{LINEAR_PARAMS})", "vision", "layer", True),
            (rf"{v}\.encoder\.layers\.(?P<layer>\d+)\.(?P<module>{VISION_NORMS})\.(?P<param>{NORM_PARAMS})", "vision", "layer", False),
            (rf"{v}\.encoder\.layers\.(?P<layer>\d+)\.(?P<module>{_alternation(VISION.layer_scales)})", "vision", "layer", False),
            (rf"{p}\.(?P<module>{re.escape(PROJECTOR.norm)})\.(?P<param>{NORM_PARAMS})", "projector", "mlp1", False),
            (rf"{p}\.(?P<module>{_alternation(PROJECTOR.linears)})\.(?P<param>{LINEAR_PARAMS})", "projector", "mlp1", True),
            (rf"language_model\.model\.(?P<module>{re.escape(record.embed)})\.(?P<param>weight)", "llm", "embeddings", False),
            (rf"language_model\.model\.layers\.(?P<layer>\d+)\.(?P<module>{layer_linears})\.(?P<param>{LINEAR_PARAMS})", "llm", "layer", True),
            (rf"language_model\.model\.layers\.(?P<layer>\d+)\.(?P<module>{layer_norms})\.(?P<param>weight)", "llm", "layer", False),
            (rf"language_model\.model\.layers\.(?P<layer>\d+)\.(?P<module>{_alternation(record.buffers)})\.(?P<param>inv_freq)", "llm", "layer", False),
            (rf"language_model\.model\.(?P<module>{re.escape(record.final_norm)})\.(?P<param>weight)", "llm", "final_norm", False),
            (rf"language_model\.(?P<module>{re.escape(record.head)})\.(?P<param>{LINEAR_PARAMS})", "llm", "head", False),
        ]
        if record.experts is not None:  # a sparse layer's routed experts (linears) and router (not quantized)
            experts = record.experts
            names = _alternation(item.name for item in experts.linears)
            raw.insert(-3, (rf"language_model\.model\.layers\.(?P<layer>\d+)\.(?P<module>{re.escape(experts.prefix)}\.(?P<expert>\d+)\.{names})"
                            rf"\.(?P<param>{LINEAR_PARAMS})", "llm", "layer", True))
            raw.insert(-3, (rf"language_model\.model\.layers\.(?P<layer>\d+)\.(?P<module>{re.escape(experts.router)})\.(?P<param>weight)",
                            "llm", "layer", False))
        _PATTERN_CACHE[dialect] = [(re.compile(p), fam, part, linear) for p, fam, part, linear in raw]
    return _PATTERN_CACHE[dialect]


def _layer_count(infos: dict[str, KeyInfo], family: str) -> int:
    layers = {i.layer for i in infos.values() if i.family == family and i.part == "layer"}
    if not layers:
        return 0
    expected = set(range(max(layers) + 1))
    if layers != expected:
        missing = sorted(expected - layers)
        raise LayoutError(f"{family} layers are not numbered 0..{max(layers)}: layer {missing[0]} has no keys; the checkpoint is incomplete")
    return len(layers)


def _lora_info(config: dict, infos: dict[str, KeyInfo], shapes: dict[str, tuple[int, ...]]) -> dict[str, LoraInfo]:
    result: dict[str, LoraInfo] = {}
    flags = {"llm": int(config.get("use_llm_lora") or 0), "vision": int(config.get("use_backbone_lora") or 0)}
    for family in ("llm", "vision"):
        factors = [i for i in infos.values() if i.lora == "A" and i.family == family]
        if not factors:
            continue
        ranks = {shapes[i.key][0] for i in factors}
        targets = Counter(i.module for i in factors)
        result[family] = LoraInfo(family, max(ranks), tuple(sorted(targets)), len(factors), flags[family])
    return result


LORA_FLAGS = (("use_llm_lora", "language_model"), ("use_backbone_lora", "vision_model"))


def lora_flag_fixes(config: dict, keys: list[str]) -> tuple[dict, list[str]]:
    """config.json with use_llm_lora / use_backbone_lora made to agree with the LoRA tensors
    among `keys` (the output's original-layout keys), and one warning per correction.

    A flag set without LoRA tensors makes InternVL's remote code wrap the tower in LoRA and
    load it uninitialised (InternVL#231, #468: garbage or empty answers). LoRA tensors with the
    flag 0 only get a warning (merge-lora is the fix; it sets both flags to 0)."""
    fixed, warnings = dict(config), []
    for flag, tower in LORA_FLAGS:
        has_lora = any(k.startswith(tower + ".") and ".lora_A." in k for k in keys)
        value = config.get(flag) or 0
        if value and not has_lora:
            fixed[flag] = 0
            warnings.append(f"warning: config.json says {flag}: {value} but there are no LoRA tensors on {tower}; "
                            f"the output has {flag} = 0 (the remote code would wrap it in uninitialised LoRA)")
        elif has_lora and not value:
            warnings.append(f"warning: {tower} carries LoRA tensors but config.json says {flag}: {value}; "
                            "merge them with `internvl-tools merge-lora`")
    return fixed, warnings
