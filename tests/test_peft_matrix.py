"""`merge-lora` against peft's own merge, over LoraConfig options, dialects, towers and key layouts.

Each case trains nothing: peft builds the adapter on a module tree with the checkpoint's own
module names (the whole original model, its bare LLM or vision tower, or the whole native
model), its trainable tensors get random values, and `save_pretrained` writes it (rewritten
into xtuner's key layout for the xtuner cases). The reference is what a user gets from peft:
`PeftModel.from_pretrained(fresh base, adapter).merge_and_unload()`, adapter after adapter.
Every case either equals that within one bf16 ulp in every tensor, or is refused before
anything is written with one line naming the option and what to do instead.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from internvl_tools.models.dialects import get_dialect
from internvl_tools.models.families import FAMILIES
from internvl_tools.models.views import open_view

from .support import all_tensors

pytestmark = pytest.mark.requires("peft")

LLAMA, QWEN2, INTERNLM2, PHI3, V1, QWEN3 = "InternVL2-40B", "InternVL2-1B", "InternVL2-2B", "InternVL2-4B", "InternVL-Chat-V1-1", "InternVL3.5-1B"
MOE, MOE_LINEARS = "InternVL3.5-30B-A3B", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDINGS = ("embed_tokens", "tok_embeddings")
VISION = ["qkv", "proj", "fc1", "fc2"]
NATIVE_VISION = ["q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"]


def leaves(family: str) -> list[str]:
    return [linear.name.split(".")[-1] for linear in get_dialect(FAMILIES[family].llm.dialect).linears]


def native_leaves(family: str) -> list[str]:
    return sorted({n.split(".")[-1] for linear in get_dialect(FAMILIES[family].llm.dialect).linears for n in linear.natives})


def embed(family: str) -> str:
    return get_dialect(FAMILIES[family].llm.dialect).embed


def head(family: str) -> str:
    return get_dialect(FAMILIES[family].llm.dialect).head


@dataclass
class Adapter:
    """One adapter: the LoraConfig, the module tree peft wraps, its key layout, config edits after saving."""

    config: dict
    space: str = "original"  # module names: "original" or "native"
    root: str = ""  # the sub-module peft wraps ("" the whole model, "language_model" the bare LLM, ...)
    layout: str = "peft"  # "peft" (save_pretrained) or "xtuner"
    edit: dict = field(default_factory=dict)


@dataclass
class Case:
    id: str
    family: str
    adapters: list[Adapter]
    into: tuple[str, ...] = ("original",)  # layouts of the checkpoints merged into
    refused: tuple[str, ...] = ()  # needles of the one-line refusal


def _case(id, family, *adapters, into=("original",), refused=()):
    return Case(id, family, list(adapters), into, refused)


def per_dialect(family: str) -> list[Case]:
    f, lv = family, leaves(family)
    first = get_dialect(FAMILIES[family].llm.dialect).linears[0].name
    alternation = f"{lv[0]}|{lv[-1]}"
    biased = FAMILIES[family].vision.qkv_bias
    cases = [
        _case(f"{f}-list-llm-vision-mlp1", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv + VISION + ["mlp1.1", "mlp1.3"])),
              into=("original", "native")),
        _case(f"{f}-regex-ms-swift", f, Adapter(dict(r=4, lora_alpha=16, target_modules=(
            rf"^(language_model(?=\.).*\.({'|'.join(lv)})|vision_model(?=\.).*\.(qkv|fc1))$")))),
        _case(f"{f}-all-linear-rslora", f, Adapter(dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True))),
        _case(f"{f}-patterns", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv, rank_pattern={f"^model.layers.0.{first}": 6, alternation: 8},
                                               alpha_pattern={f"^model.layers.0.{first}": 64, lv[1]: 32}), root="language_model")),
        _case(f"{f}-exclude-layers", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv, exclude_modules=[lv[1]],
                                                     layers_to_transform=[0, 2], layers_pattern="layers"), root="language_model")),
        _case(f"{f}-embedding-modules-to-save", f, Adapter(dict(r=4, lora_alpha=8, target_modules=[embed(f)] + lv[:2], modules_to_save=[head(f)]))),
        _case(f"{f}-trainable-tokens", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv[:1], trainable_token_indices={embed(f): [5, 7]}))),
        _case(f"{f}-bias-all-vision", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv[:1] + VISION, bias="all"))),
        _case(f"{f}-native-llamafactory", f, Adapter(dict(r=4, lora_alpha=8), space="native"), into=("native", "original")),
        _case(f"{f}-native-vision", f, Adapter(dict(r=2, lora_alpha=4, target_modules=native_leaves(f) + NATIVE_VISION + ["linear_1"],
                                                    bias="lora_only" if biased else "none"), space="native"), into=("native", "original")),
        _case(f"{f}-xtuner", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv), root="language_model", layout="xtuner"),
              Adapter(dict(r=2, lora_alpha=4, target_modules=VISION), root="vision_model", layout="xtuner")),
        _case(f"{f}-pissa", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv + VISION + ["mlp1.1"], init_lora_weights="pissa"))),
        _case(f"{f}-olora", f, Adapter(dict(r=4, lora_alpha=4, target_modules=lv + ["mlp1.3"], init_lora_weights="olora"))),
        _case(f"{f}-sequence", f, Adapter(dict(r=4, lora_alpha=8, target_modules=lv + VISION)),
              Adapter(dict(r=2, lora_alpha=8, target_modules=lv[:2], use_rslora=True), root="language_model"),
              Adapter(dict(r=4, lora_alpha=8, target_modules=lv[-1:], init_lora_weights="pissa"), root="language_model"),
              into=("original", "native")),
    ]
    return cases


PLAIN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
CASES = [case for family in (LLAMA, QWEN2, INTERNLM2, PHI3) for case in per_dialect(family)] + [
    # rank_pattern / alpha_pattern exactly as peft resolves them (alternation, anchored, plain names)
    _case("llama-rank-alternation", LLAMA, Adapter(dict(PLAIN, rank_pattern={"q_proj|v_proj": 16}), root="language_model")),
    _case("llama-rank-anchored", LLAMA, Adapter(dict(PLAIN, rank_pattern={"^model.layers.0.self_attn.q_proj": 16},
                                                     alpha_pattern={"^model.layers.0.self_attn.q_proj": 64}), root="language_model")),
    _case("llama-rank-plain", LLAMA, Adapter(dict(PLAIN, rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 32}), root="language_model")),
    _case("llama-anchored-whole-model", LLAMA, Adapter(dict(PLAIN, rank_pattern={"^language_model.model.layers.1.self_attn.v_proj": 8}))),
    _case("llama-fan-in-fan-out", LLAMA, Adapter(dict(PLAIN, fan_in_fan_out=True), root="language_model")),
    _case("llama-tokens-list", LLAMA, Adapter(dict(PLAIN, trainable_token_indices=[3, 9, 11]), root="language_model")),
    _case("qwen2-lora-bias", QWEN2, Adapter(dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "qkv"], lora_bias=True))),
    _case("qwen2-bias-lora-only-native-into-both", QWEN2, Adapter(dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                                        bias="lora_only"), space="native"), into=("native", "original")),
    _case("qwen3-list", QWEN3, Adapter(dict(r=4, lora_alpha=8, target_modules=leaves(QWEN3) + VISION)), into=("original", "native")),
    # Qwen3-MoE (InternVL3.5-30B-A3B): LoRA on every expert's linears as peft puts it on transformers 4's per-expert
    # nn.Linear modules (the skeleton's), the router ("gate") only where the adapter targets it (all-linear does)
    _case("qwen3moe-experts", MOE, Adapter(dict(r=4, lora_alpha=8, target_modules=MOE_LINEARS)), into=("original", "native")),
    _case("qwen3moe-router-bare-llm", MOE, Adapter(dict(r=2, lora_alpha=4, target_modules=["gate", "down_proj"]), root="language_model")),
    _case("qwen3moe-all-linear", MOE, Adapter(dict(r=2, lora_alpha=4, target_modules="all-linear"), root="language_model")),
    _case("qwen3moe-native", MOE, Adapter(dict(r=4, lora_alpha=8, target_modules=MOE_LINEARS), space="native"), into=("native", "original")),
    _case("v1-native-mlp1", V1, Adapter(dict(r=4, lora_alpha=8, target_modules=["q_proj", "linear_1", "linear_2"], bias="all"),
                                        space="native"), into=("native", "original")),
    _case("v1-pissa-vision-native", V1, Adapter(dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc2"],
                                                     init_lora_weights="pissa"), space="native"), into=("native", "original")),
] + [
    _case(f"llama-init-{init}", LLAMA, Adapter(dict(PLAIN, init_lora_weights=init), root="language_model"))
    for init in ("gaussian", "eva", "orthogonal", "mica")
] + [
    # refused before anything is written, naming the option and what to do
    _case("refuse-pissa-niter", LLAMA, Adapter(dict(PLAIN, init_lora_weights="pissa_niter_4"), root="language_model"),
          refused=("pissa_niter_4", "path_initial_model_for_weight_conversion")),
    *[_case(f"refuse-{init}", LLAMA, Adapter(dict(PLAIN), root="language_model", edit={"init_lora_weights": init}),
            refused=(init, needle)) for init, needle in (("corda", "path_initial_model_for_weight_conversion"),
                                                          ("loftq", "init_lora_weights set to true"),
                                                          ("lora_ga", "path_initial_model_for_weight_conversion"))],
    _case("refuse-dora", LLAMA, Adapter(dict(PLAIN, use_dora=True), root="language_model"), refused=("DoRA", "merge_and_unload")),
    _case("refuse-layer-replication", LLAMA, Adapter(dict(PLAIN), root="language_model", edit={"layer_replication": [[0, 2], [1, 3]]}),
          refused=("layer_replication",)),
    _case("refuse-alora", LLAMA, Adapter(dict(PLAIN), root="language_model", edit={"alora_invocation_tokens": [5, 6]}),
          refused=("alora_invocation_tokens", "unmerged")),
    _case("refuse-target-parameters", LLAMA, Adapter(dict(PLAIN), root="language_model", edit={"target_parameters": ["mlp.experts.down_proj"]}),
          refused=("target_parameters",)),
    _case("refuse-unknown-option", LLAMA, Adapter(dict(PLAIN), root="language_model", edit={"use_hyper_lora": True}),
          refused=("use_hyper_lora", "merge_and_unload")),
    _case("refuse-rank-pattern-mismatch", LLAMA, Adapter(dict(PLAIN), root="language_model", edit={"rank_pattern": {"v_proj": 8}}),
          refused=("v_proj", "rank 8", "peft could not load")),
    _case("refuse-not-selected", LLAMA, Adapter(dict(PLAIN), root="language_model", edit={"target_modules": ["q_proj", "v_proj", "o_proj"]}),
          refused=("down_proj", "target_modules", "peft would drop")),
    _case("refuse-tokens-unnamed", LLAMA, Adapter(dict(PLAIN, trainable_token_indices={"embed_tokens": [5]}), root="language_model",
                                                  edit={"trainable_token_indices": {"wte": [5]}}), refused=("trainable_token_indices",)),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny SVDs / QRs in one thread: MKL's thread team costs far more than the work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- module trees with the checkpoint's names ---------------------------------------------
def skeleton(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """nn.Linear / nn.Embedding for every 2-D weight (embeddings by name), plain parameters elsewhere."""
    root = nn.Module()
    modules: dict[str, nn.Module] = {"": root}

    def module(path: str) -> nn.Module:
        if path not in modules:
            parent, _, name = path.rpartition(".")
            modules[path] = nn.Module()
            module(parent).add_module(name, modules[path])
        return modules[path]

    for key, tensor in tensors.items():
        path, _, param = key.rpartition(".")
        if param == "weight" and tensor.dim() == 2:
            if path.rsplit(".", 1)[-1] in EMBEDDINGS:
                leaf = nn.Embedding(*tensor.shape, dtype=tensor.dtype)
            else:
                leaf = nn.Linear(tensor.shape[1], tensor.shape[0], bias=f"{path}.bias" in tensors, dtype=tensor.dtype)
            parent, _, name = path.rpartition(".")
            module(parent).add_module(name, leaf)
            modules[path] = leaf
    for key, tensor in tensors.items():
        path, _, param = key.rpartition(".")
        holder = module(path)
        if not isinstance(holder, (nn.Linear, nn.Embedding)):
            holder.register_parameter(param, nn.Parameter(tensor.clone(), requires_grad=False))
    root.load_state_dict(tensors, strict=True)
    return root


@pytest.fixture(scope="module")
def bases(tiny, tmp_path_factory, run_cli_module):
    """bases(family, space) -> (checkpoint folder, tensors by the space's names); native: `convert` of the tiny one."""
    cache: dict = {}

    def get(family: str, space: str):
        if (family, space) not in cache:
            folder = tiny(family)
            if space == "native":
                folder = tmp_path_factory.mktemp("native") / family
                assert run_cli_module("convert", tiny(family), "-o", folder).exit_code == 0
            cache[family, space] = (folder, all_tensors(folder))
        return cache[family, space]

    return get


@pytest.fixture(scope="module")
def run_cli_module():
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    runner = CliRunner()
    return lambda *args: runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def llamafactory_targets(model: nn.Module, family: str) -> list[str]:
    """LlamaFactory's patch_target_modules for InternVL: full names holding a linear name, vision tower and projector frozen."""
    names = native_leaves(family)
    return [n for n, _ in model.named_modules() if any(t in n for t in names)
            and not any(f in n for f in ("vision_tower", "multi_modal_projector")) and not n.endswith(("lora_A", "lora_B"))]


def save_adapter(adapter: Adapter, family: str, folder: Path, seed: int, bases) -> Path:
    """Build the adapter with peft, give its trainable tensors random values, save it (xtuner: rewrite keys)."""
    import peft

    _ckpt, tensors = bases(family, adapter.space)
    whole = skeleton(tensors)
    model = whole.get_submodule(adapter.root) if adapter.root else whole
    config = dict(adapter.config)
    if adapter.space == "native" and "target_modules" not in config:
        config["target_modules"] = llamafactory_targets(model, family)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    peft_model.save_pretrained(str(folder))
    if adapter.layout == "xtuner":  # xtuner's InternVL state dict: adapter name kept, prefixed by the wrapped tower
        peft_copy = folder.with_name(folder.name + "-peft")
        shutil.copytree(folder, peft_copy)
        saved = load_file(str(folder / "adapter_model.safetensors"))
        tower = f"model.{adapter.root}."
        renamed = {}
        for key, value in saved.items():
            for ab in ("lora_A", "lora_B"):
                key = key.replace(f".{ab}.weight", f".{ab}.default.weight")
            renamed[tower + key] = value
        (folder / "adapter_model.safetensors").unlink()
        torch.save({"state_dict": renamed}, folder / "adapter_model.bin")
    if adapter.edit:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **adapter.edit}))
    return folder


def peft_reference(case: Case, folders: list[Path], bases) -> tuple[str, list[dict[str, torch.Tensor]]]:
    """peft's merge_and_unload of every adapter in order on a fresh base: (names' space, the weights at each
    stage: the base, then per adapter the base peft loads it on (PiSSA / OLoRA: the residual) and the merge)."""
    import peft

    space = case.adapters[0].space
    whole = skeleton(bases(case.family, space)[1])
    stages = [_plain_state(whole)]
    for adapter, folder in zip(case.adapters, folders):
        assert adapter.space == space
        model = whole.get_submodule(adapter.root) if adapter.root else whole
        source = folder
        if adapter.layout == "xtuner":  # peft reads the same numbers from peft's own layout
            source = folder.with_name(folder.name + "-peft")
        loaded = peft.PeftModel.from_pretrained(model, str(source))
        stages.append(_plain_state(whole))
        loaded.merge_and_unload()
        stages.append(_plain_state(whole))
    return space, stages


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base tensors of a (possibly peft-wrapped) module tree, in the base's names."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or "modules_to_save" in key or "token_adapter" in key or ".original_module." in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().clone()
    return out


def merged_tensors(out: Path, space: str, tmp_path: Path, run_cli) -> dict[str, torch.Tensor]:
    """The output of merge-lora in the names of `space` (original names through a view; native ones converted)."""
    layout = "native" if json.loads((out / "config.json").read_text()).get("model_type") == "internvl" else "original"
    if space == layout:
        return all_tensors(out)
    if space == "original":
        with open_view(out) as view:
            return {k: view.get(k) for k in view.keys()}
    converted = tmp_path / (out.name + "-as-native")
    assert run_cli("convert", out, "-o", converted).exit_code == 0
    return all_tensors(converted)


def assert_within_one_ulp(got: dict, stages: list[dict]) -> int:
    """Every tensor equal to peft's within one bf16 ulp of the merge's largest operand (any weight peft
    held on the way, or the change between two of them: peft rounds to bf16 after each step, and in some
    paths rounds the delta before adding it, which one final rounding cannot reproduce bit for bit when
    they cancel); returns how many tensors the merge changed."""
    want, base = stages[-1], stages[0]
    assert set(got) == set(want)
    changed = 0
    for key, expected in want.items():
        actual = got[key]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
        changed += not torch.equal(expected, base[key])
        if torch.equal(actual, expected):
            continue
        held = [stage[key].float() for stage in stages if key in stage]
        operands = [t.abs() for t in held] + [(later - earlier).abs() for earlier, later in zip(held, held[1:])]
        magnitude = torch.stack(operands + [actual.float().abs()]).amax(0).clamp_min(2.0 ** -126)
        ulp = torch.exp2(torch.floor(torch.log2(magnitude)) - 7)
        worst = ((actual.float() - expected.float()).abs() / ulp).max().item()
        assert worst <= 1.0, f"{key}: differs from peft's merge by {worst:.2f} bf16 ulp"
    return changed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_equals_peft_or_is_refused(case, bases, tmp_path, run_cli):
    folders = [save_adapter(adapter, case.family, tmp_path / f"adapter{index}", seed=index + 1, bases=bases)
               for index, adapter in enumerate(case.adapters)]
    args = [a for folder in folders for a in ("--adapter", folder)]
    if case.refused:
        for layout in case.into:
            out = tmp_path / f"never-{layout}"
            result = run_cli("merge-lora", bases(case.family, layout)[0], *args, "-o", out)
            assert result.exit_code == 2, result.output
            assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
            for needle in case.refused:
                assert needle in result.output, (needle, result.output)
            assert not out.exists() and not out.with_name(out.name + ".partial").exists()
        return
    space, stages = peft_reference(case, folders, bases)
    for layout in case.into:
        out = tmp_path / f"merged-{layout}"
        result = run_cli("merge-lora", bases(case.family, layout)[0], *args, "-o", out, "--json")
        assert result.exit_code == 0, result.output
        changed = assert_within_one_ulp(merged_tensors(out, space, tmp_path, run_cli), stages)
        assert changed > 0
