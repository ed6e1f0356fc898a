"""formats/: detection, the tensor names each format owns, parameter counts, loader rules and
dequantization, checked against the libraries whose formats they follow."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from internvl_tools.errors import InputError, LayoutError
from internvl_tools.formats import awq, bnb_int8, compressed_tensors, detect, gptq
from internvl_tools.formats.dequantized import DequantizedView
from internvl_tools.models.views import open_view

from .support import all_tensors, sample_image

FAMILY = "InternVL2-1B"
CT = {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}, "format": "pack-quantized"}}}


@pytest.fixture(scope="module")
def invoke():
    """invoke(*args) -> click Result (module-scoped, for the module-scoped fixtures)."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def copies(tiny, tmp_path_factory, invoke):
    """{name: folder}: the bf16 tiny InternVL2-1B and its int8 (bitsandbytes), compressed-tensors and GPTQ copies, made by the CLI."""
    root = tmp_path_factory.mktemp("formats")
    source = tiny(FAMILY, shards=1)
    folders = {"bf16": source}
    for name, args in (("bnb", ["--method", "int8"]), ("ct", ["--method", "int8", "--format", "compressed-tensors"]),
                       ("gptq", ["--method", "gptq", "--group-size", "32", "--num-samples", "2", "--seq-len", "16"])):
        result = invoke("quantize", source, "-o", root / name, *args, "--json")
        assert result.exit_code == 0, result.output
        folders[name] = root / name
    return folders


# -- detection -------------------------------------------------------------------------------
@pytest.mark.parametrize("quant,name", [
    (None, "plain"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bnb_int8"),
    ({"load_in_8bit": True}, "bnb_int8"),  # configs older than quant_method
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq"}, "gptq"),
    (CT, "compressed_tensors"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "awq"),
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "GEMM"}, "awq"),  # AutoAWQ's names
])
def test_detect_each_format(quant, name):
    config = {} if quant is None else {"quantization_config": quant}
    assert detect(config).name == name


@pytest.mark.parametrize("quant,needle", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "4-bit"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "gptq_v2"),
    ({"quant_method": "gptq", "bits": 3}, "bits is 3"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemv"),
    ({**CT, "format": "float-quantized", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float"}, "format": "float-quantized"}}},
     "float-quantized"),
    ({**CT, "format": "int-quantized", "config_groups": {"g": {"weights": {"num_bits": 4}, "format": "int-quantized"}}}, "num_bits 8"),
    ({"quant_method": "fp8"}, "'fp8' is not supported"),
])
def test_unsupported_variants_refused(quant, needle):
    with pytest.raises(InputError, match=re.escape(needle)):
        detect({"quantization_config": quant})


def test_misplaced_or_missing_quantization_config_refused():
    with pytest.raises(LayoutError, match="inside llm_config"):
        detect({"llm_config": {"quantization_config": {"quant_method": "awq"}}})
    with pytest.raises(LayoutError, match="no quantization_config"):
        detect({}, ["language_model.model.layers.0.mlp.up_proj.qweight"])


# -- parameter counts ------------------------------------------------------------------------
def test_inspect_counts_equal_parameters_in_every_format(copies, run_cli):
    reports = {name: json.loads(run_cli("inspect", folder, "--json").output) for name, folder in copies.items()}
    assert reports["bf16"]["quantization"] is None
    assert {n: r["quantization"]["format"] for n, r in reports.items() if n != "bf16"} == {
        "bnb": "bnb_int8", "ct": "compressed_tensors", "gptq": "gptq"}
    for name, report in reports.items():
        assert report["params"] == reports["bf16"]["params"], name
    assert set(reports["bf16"]["params"]) == {"total", "vision", "projector", "llm"}


# -- tensor names ----------------------------------------------------------------------------
def _rename_key(folder, old: str, new: str | None) -> None:
    """Rename (or, new=None, drop) one tensor of a single-file checkpoint."""
    tensors = all_tensors(folder)
    value = tensors.pop(old)
    if new is not None:
        tensors[new] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("copy,old,new,needles", [
    ("bf16", "language_model.model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight_fp8",
     ["up_proj.weight_fp8", "plain format", "weight, bias"]),
    ("bnb", "language_model.model.layers.1.self_attn.q_proj.SCB", "language_model.model.layers.1.self_attn.q_proj.scales",
     ["q_proj.scales", "bnb_int8 format", "weight, SCB, weight_format, bias"]),
    ("ct", "language_model.model.layers.0.mlp.down_proj.weight_packed", "language_model.model.layers.0.mlp.down_proj.qweight",
     ["down_proj.qweight", "compressed_tensors format", "weight_packed, weight_scale"]),
    ("gptq", "language_model.model.layers.0.mlp.down_proj.qzeros", None, ["down_proj.qzeros is missing", "gptq"]),
])
def test_unknown_or_missing_linear_tensor_refused_in_one_line(copies, tmp_path, run_cli, copy, old, new, needles):
    folder = tmp_path / copy
    shutil.copytree(copies[copy], folder)
    _rename_key(folder, old, new)
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert all(n in result.output for n in needles), result.output
    chat = run_cli("chat", folder, "hi", "--max-new-tokens", "1")  # the runtime refuses it too
    assert chat.exit_code == 2 and chat.output.count("\n") == 1 and needles[0] in chat.output, chat.output


# -- compressed-tensors ----------------------------------------------------------------------
@pytest.mark.requires("compressed_tensors")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_compressed_tensors_packing_equals_the_library(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 45), generator=g).to(torch.int8)
    packed = pack_to_int32(values, bits)
    assert torch.equal(compressed_tensors.pack_to_int32(values, bits), packed)
    assert torch.equal(compressed_tensors.unpack_from_int32(packed, bits, 45), unpack_from_int32(packed, bits, torch.Size([7, 45])).int())


@pytest.mark.requires("compressed_tensors")
@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 16, True), (4, 16, False), (8, 32, False)])
def test_compressed_tensors_dequantize_equals_the_library(bits, group, symmetric):
    """Tensors compressed by compressed-tensors itself (and, W8A16, by our writer) read back as
    its own PackedQuantizationCompressor.decompress reads them."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(24, 64, generator=g).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group" if group else "channel", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    quant = compressed_tensors.quantization_config([], bits=bits, group_size=group, symmetric=symmetric)
    columns = 64 // group if group else 1
    state = {"weight": weight, "weight_scale": (torch.rand(24, columns, generator=g) * 0.05 + 0.01).to(torch.bfloat16)}
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (24, columns), generator=g).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    if bits == 8 and group is None:  # our own W8A16 writer
        packed = compressed_tensors.quantize(weight)
    theirs = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    ours = compressed_tensors.dequantize(packed, quant)
    assert ours.dtype == torch.float32 and ours.shape == weight.shape
    assert torch.equal(ours.to(theirs.dtype), theirs)


def test_dequantized_view_of_compressed_tensors(copies):
    src = all_tensors(copies["bf16"])
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    with DequantizedView(open_view(copies["ct"])) as view:
        assert not [k for k in view.keys() if k.endswith(("weight_packed", "weight_scale", "weight_shape"))]
        assert key in view and key.replace(".weight", ".weight_packed") not in view
        assert len(view) == len(src) and set(view.keys()) == set(src)
        assert view.spec(key).shape == src[key].shape and view.spec(key).dtype == "F32"
        q, scale = compressed_tensors.quantize_symmetric_channel(src[key])
        assert torch.equal(view.get(key), q.float() * scale.float())
        assert view.stored(key) is None and view.stored("mlp1.1.weight") is not None
    view.close()  # closing twice is harmless


def test_chat_runs_a_compressed_tensors_checkpoint(copies, tmp_path, run_cli):
    from internvl_tools.runtime.model import InternVLRuntime

    image = tmp_path / "img.png"
    sample_image(4).save(image)
    result = run_cli("chat", copies["ct"], "What is in the image?", "--image", image, "--dtype", "fp32", "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    bf16, ct = InternVLRuntime(copies["bf16"]), InternVLRuntime(copies["ct"])
    _, ids = ct.generate("What is in the image?", sample_image(4), max_new_tokens=4)
    assert json.loads(result.output)["token_ids"] == ids
    pixels = bf16.pixel_values(sample_image(4))
    prompt = bf16.prompt_ids("Describe the image.", pixels.shape[0])
    assert torch.equal(ct.image_features(pixels), bf16.image_features(pixels))  # vision untouched
    want, got = bf16.logits(prompt, pixels), ct.logits(prompt, pixels)
    assert (got - want).norm() / want.norm() < 0.03


# -- loader rules ----------------------------------------------------------------------------
TRANSFORMERS_NAMES = {"vision": "model.vision_tower.encoder.layer.0.attention.q_proj", "projector": "model.multi_modal_projector.linear_1",
                      "head": "lm_head", "llm": "model.language_model.layers.0.mlp.down_proj"}
VLLM_NAMES = {"vision": "vision_tower.encoder.layer.0.attention.q_proj", "projector": "multi_modal_projector.linear_1",
              "head": "language_model.lm_head", "llm": "language_model.model.layers.0.mlp.down_proj"}
KEPT = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def _vllm_bnb_skipped(prefix: str, skip: list[str]) -> bool:
    """vLLM's `is_layer_skipped_bnb`: a skip entry equal to a component or a leading path of the module."""
    parts = prefix.split(".")
    return any(m in parts for m in skip) or bool(set(skip) & {".".join(parts[: i + 1]) for i in range(len(parts))})


@pytest.mark.requires("compressed_tensors")
@pytest.mark.parametrize("names", [TRANSFORMERS_NAMES, VLLM_NAMES], ids=["transformers", "vllm"])
def test_native_rules_match_both_loaders(names):
    from compressed_tensors.utils.match import match_name
    from transformers.quantizers.quantizers_utils import should_convert_module

    ignore = compressed_tensors.quantization_config(KEPT, "native")["ignore"]
    skip = bnb_int8.quantization_config(KEPT, "native")["llm_int8_skip_modules"]
    not_convert = awq.quantization_config(KEPT, "native")["modules_to_not_convert"]
    dynamic = gptq.quantization_config(gptq.GPTQSettings(), "native")["dynamic"]
    vllm = names is VLLM_NAMES
    for part, name in names.items():
        kept = part != "llm"
        assert any(match_name(name, rule) for rule in ignore) == kept, (part, ignore)
        assert (_vllm_bnb_skipped(name, skip) if vllm else not should_convert_module(name, skip)) == kept, (part, skip)
        assert (any(m in name for m in not_convert) if vllm else not should_convert_module(name, not_convert)) == kept, part
        if part in ("vision", "projector", "llm"):  # GPTQ keeps its head out through lm_head: false
            assert any(re.match(rule[2:], name) for rule in dynamic) == kept, (part, dynamic)


def test_convert_rewrites_each_format_for_the_native_layout(copies, tmp_path, run_cli):
    """convert --to hf writes the format's own native quantization_config, and the runtime
    reads the converted copy exactly like the original."""
    from internvl_tools.runtime.model import InternVLRuntime

    for name in ("bnb", "ct"):
        out = tmp_path / name
        assert run_cli("convert", copies[name], "-o", out).exit_code == 0
        quant = json.loads((out / "config.json").read_text())["quantization_config"]
        if name == "ct":
            assert quant["ignore"][:2] == ["re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
        else:
            assert {"model.vision_tower", "model.multi_modal_projector", "lm_head"} <= set(quant["llm_int8_skip_modules"])
        original, native = InternVLRuntime(copies[name]), InternVLRuntime(out)
        ids = original.prompt_ids("hello", 0)
        assert torch.equal(original.logits(ids, None), native.logits(ids, None))


# -- AWQ ------------------------------------------------------------------------------------
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # DESIGN §3: nibble i of a word holds output column ORDER[i]


def _read_awq_independently(packed: np.ndarray) -> np.ndarray:
    """AWQ gemm int32 [rows, out/8] -> codes [rows, out], by the format's statement (numpy)."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((packed.shape[0], packed.shape[1] * 8), dtype=np.int64)
    for c in range(packed.shape[1]):
        for i, column in enumerate(ORDER):
            out[:, 8 * c + column] = (words[:, c] >> (4 * i)) & 0xF
    return out


def _rtn_awq(weight: torch.Tensor, group: int):
    """Asymmetric 4-bit round-to-nearest over groups of input rows: (q [out, in], scales, zeros [in/group, out])."""
    wt = weight.float().T.reshape(-1, group, weight.shape[0])  # [groups, group, out]
    low, high = wt.amin(1).clamp(max=0), wt.amax(1).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-8).half()
    zeros = (-low / scales.float()).round().clamp(0, 15)
    q = (wt / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15)
    return q.reshape(-1, weight.shape[0]).T.to(torch.int32), scales, zeros.to(torch.int32)


def test_awq_packing_read_by_an_independent_reader():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (24, 64), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (2, 24), generator=g, dtype=torch.int32)
    scales = torch.rand(2, 24, generator=g) + 0.1
    packed = awq.pack(q, scales, zeros)
    assert packed["qweight"].shape == (64, 3) and packed["qzeros"].shape == (2, 3) and packed["qweight"].dtype == torch.int32
    assert np.array_equal(_read_awq_independently(packed["qweight"].numpy()), q.T.numpy())
    assert np.array_equal(_read_awq_independently(packed["qzeros"].numpy()), zeros.numpy())
    expected = ((q.T - zeros.repeat_interleave(32, 0)).float() * packed["scales"].float().repeat_interleave(32, 0)).T
    assert torch.equal(awq.dequantize(packed, awq.quantization_config([])), expected)


def test_runtime_and_inspect_read_an_awq_checkpoint(copies, tmp_path, run_cli):
    """An AWQ gemm checkpoint written by hand (RTN, group 32): same parameter count as bf16,
    and the runtime runs it close to bf16."""
    from internvl_tools.runtime.model import InternVLRuntime

    folder = tmp_path / "awq"
    shutil.copytree(copies["bf16"], folder)
    tensors = all_tensors(copies["bf16"])
    for key in [k for k, t in tensors.items() if k.startswith("language_model.model.layers.") and t.dim() == 2]:
        stem = key.removesuffix(".weight")
        for param, tensor in awq.pack(*_rtn_awq(tensors.pop(key), 32)).items():
            tensors[f"{stem}.{param}"] = tensor
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = awq.quantization_config(["vision_model", "mlp1", "language_model.lm_head"], group_size=32)
    (folder / "config.json").write_text(json.dumps(config))
    counts = [json.loads(run_cli("inspect", f, "--json").output)["params"] for f in (copies["bf16"], folder)]
    assert counts[0] == counts[1]
    bf16, q4 = InternVLRuntime(copies["bf16"]), InternVLRuntime(folder)
    pixels = bf16.pixel_values(sample_image(6))
    ids = bf16.prompt_ids("Describe the image.", pixels.shape[0])
    want, got = bf16.logits(ids, pixels), q4.logits(ids, pixels)
    assert (got - want).norm() / want.norm() < 0.3


def test_to_native_renames_kept_modules_and_refuses_what_it_cannot_rename():
    from internvl_tools.formats import to_native

    kept = ["vision_model", "mlp1", "language_model.lm_head", "language_model.model.layers.0.mlp.down_proj"]
    native = to_native(awq.quantization_config(kept, group_size=32))["modules_to_not_convert"]
    assert native[:4] == ["model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector"]
    assert {"lm_head", "model.language_model.layers.0.mlp.down_proj", "language_model.model.layers.0.mlp.down_proj"} <= set(native)
    qkv = to_native(bnb_int8.quantization_config(["vision_model.encoder.layers.2.attn.qkv"]))["llm_int8_skip_modules"]
    assert qkv == [f"{prefix}vision_tower.encoder.layer.2.attention.{x}_proj" for x in "qkv" for prefix in ("model.", "")]
    assert to_native(compressed_tensors.quantization_config(["vision_model"]))["ignore"] == ["re:.*vision_tower.*"]
    with pytest.raises(InputError, match="cannot be rewritten"):
        to_native({**compressed_tensors.quantization_config([]), "ignore": [r"re:.*layers\.0\..*"]})
