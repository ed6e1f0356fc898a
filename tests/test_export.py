"""`export`: ONNX graphs of both vision styles and pixel shuffle versions against an independent
reference, dynamic batch, external data, the parity gate, bad input, and TensorRT's builder path."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from internvl_tools.export.onnx_runner import onnx_vision

from internvl_tools.errors import InputError
from internvl_tools.export import tensorrt_engine as trt_engine
from internvl_tools.export import vision_onnx
from internvl_tools.export.vision_onnx import sample_pixels
from internvl_tools.io.reader import CheckpointReader
from internvl_tools.io.writer import CheckpointWriter

from .reference_internvl import image_features, load_state, vit_forward

# onnx and onnxruntime are optional (the onnx extra): the tests that need them are marked
# (skipped one by one when a package is missing) and import them inside. Exporting needs onnx;
# the parity check and running the graph need onnxruntime too.
ONNX = pytest.mark.requires("onnx", "onnxruntime")

# 300M style (LayerNorm, qkv bias, v2), 6B style with v1 (V1-2) and v2 (76B), InternLM2's 300M (2B)
STYLES = ["InternVL2-1B", "InternVL-Chat-V1-2", "InternVL2-Llama3-76B", "InternVL-Chat-V1-1"]


def run_onnx(folder: Path, pixels: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    meta = json.loads((folder / "export.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    dtype = np.float16 if meta["dtype"] == "fp16" else np.float32
    return session.run(None, {"pixel_values": pixels.numpy().astype(dtype)})[0].astype(np.float32)


def relative(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """exported(family, dtype="fp32", part=..., opset=18) -> export folder (cached per module)."""
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    root, cache = tmp_path_factory.mktemp("export"), {}

    def make(family: str, dtype: str = "fp32", part: str = "vision+projector", opset: int = 18) -> Path:
        key = (family, dtype, part, opset)
        if key not in cache:
            out = root / "-".join(map(str, key)).replace("+", "_")
            result = CliRunner().invoke(cli, ["export", str(tiny(family)), "-o", str(out), "--dtype", dtype, "--part", part,
                                              "--opset", str(opset), "--json"], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            cache[key] = out
        return cache[key]

    return make


@ONNX
@pytest.mark.parametrize("family", STYLES)
def test_fp32_equals_independent_reference_at_batch_1_and_3(tiny, exported, family):
    config, sd = load_state(tiny(family))
    out = exported(family)
    meta = json.loads((out / "export.json").read_text())
    assert [row["batch"] for row in meta["parity"]] == [1, 3]
    assert all(row["passed"] and row["relative_error"] <= 1e-4 for row in meta["parity"])
    for batch in (1, 3):
        pixels = sample_pixels(config, batch, seed=10 + batch)
        want = image_features(config, sd, pixels)
        got = run_onnx(out, pixels)
        assert got.shape == (batch, meta["tokens_per_tile"], config["llm_config"]["hidden_size"])
        assert relative(got, want) <= 1e-4


@ONNX
@pytest.mark.parametrize("family", ["InternVL2-1B", "InternVL2-Llama3-76B"])
def test_fp16_within_1e_2(tiny, exported, family):
    import onnx

    config, sd = load_state(tiny(family))
    out = exported(family, "fp16")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    pixels = sample_pixels(config, 3, seed=5)
    assert relative(run_onnx(out, pixels), image_features(config, sd, pixels)) <= 1e-2
    assert all(row["passed"] for row in json.loads((out / "export.json").read_text())["parity"])


@ONNX
@pytest.mark.parametrize("opset", [17, 21])
def test_opsets(tiny, exported, opset):
    import onnx

    config, sd = load_state(tiny("InternVL2-40B"))
    out = exported("InternVL2-40B", "fp32", opset=opset)
    assert onnx.load(str(out / "model.onnx"), load_external_data=False).opset_import[0].version == opset
    pixels = sample_pixels(config, 2)
    assert relative(run_onnx(out, pixels), image_features(config, sd, pixels)) <= 1e-4


@ONNX
def test_part_vision_is_the_selected_layer_without_cls(tiny, exported):
    import onnx

    family = "InternVL-Chat-V1-1"  # select_layer -2 on the tiny copy: the last layer is never run
    config, sd = load_state(tiny(family))
    out = exported(family, part="vision")
    meta = json.loads((out / "export.json").read_text())
    assert meta["vision_layers"] == config["vision_config"]["num_hidden_layers"] + 1 + config["select_layer"]
    pixels = sample_pixels(config, 2)
    want = vit_forward(config, sd, pixels)[config["select_layer"]][:, 1:, :]
    assert relative(run_onnx(out, pixels), want) <= 1e-4
    used = {init.name for init in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    last = config["vision_config"]["num_hidden_layers"] - 1
    assert not any(f"layers.{last}." in name for name in used) and not any(name.startswith("mlp1") for name in used)


@ONNX
def test_ps_v1_and_v2_differ_by_the_token_grid_transpose(tiny, tmp_path, run_cli):
    """The same weights exported as v1 and v2: token (i, j) of one is token (j, i) of the other."""
    src = tiny("InternVL2-Llama3-76B")
    v1 = tmp_path / "v1-ckpt"
    with CheckpointReader(src) as reader, CheckpointWriter(v1, reader.specs(), inputs=[src]) as writer:
        for name in reader.keys():
            writer.write(name, reader.get(name))
        config = reader.config()
        config["ps_version"] = "v1"
        writer.finalize(side_files_from=src, files={"config.json": config})
    for name, ckpt in (("e1", v1), ("e2", src)):
        assert run_cli("export", ckpt, "-o", tmp_path / name, "--dtype", "fp32", "--no-check").exit_code == 0
    pixels = sample_pixels(config, 2)
    a, b = run_onnx(tmp_path / "e1", pixels), run_onnx(tmp_path / "e2", pixels)
    side = int(a.shape[1] ** 0.5)
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a.reshape(2, side, side, -1).transpose(0, 2, 1, 3), b.reshape(2, side, side, -1), rtol=0, atol=1e-6)


@ONNX
def test_dynamic_batch_rows_are_independent(tiny, exported):
    config, _ = load_state(tiny("InternVL2-1B"))
    out = exported("InternVL2-1B")
    pixels = sample_pixels(config, 5, seed=3)
    whole = run_onnx(out, pixels)
    for i in range(5):
        np.testing.assert_allclose(run_onnx(out, pixels[i:i + 1])[0], whole[i], rtol=0, atol=1e-5)


@ONNX
def test_weights_are_external_and_aligned(tiny, exported):
    import onnx

    out = exported("InternVL2-Llama3-76B")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(out / "model.onnx"))
    data_size = (out / "model.onnx.data").stat().st_size
    weights = [init for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    with CheckpointReader(tiny("InternVL2-Llama3-76B")) as reader:
        vision_keys = {k for k in reader.keys() if k.startswith(("vision_model.", "mlp1."))}
        assert {w.name.removesuffix(".T") for w in weights} == vision_keys
        for w in weights:
            info = {e.key: e.value for e in w.external_data}
            assert info["location"] == "model.onnx.data" and not w.raw_data
            offset, length = int(info["offset"]), int(info["length"])
            assert offset % 64 == 0 and offset + length <= data_size
            stored = np.fromfile(out / "model.onnx.data", dtype=np.float32, count=length // 4, offset=offset)
            want = reader.get(w.name.removesuffix(".T")).float()
            want = want.t() if w.name.endswith(".T") else want
            np.testing.assert_array_equal(stored.reshape(tuple(w.dims)), want.numpy())
    assert (out / "model.onnx").stat().st_size < 64 * 1024  # the graph alone


@ONNX
def test_native_layout_input_exports_the_same_model(tiny, exported, tmp_path, run_cli):
    native = tmp_path / "native"
    assert run_cli("convert", tiny("InternVL-Chat-V1-2"), "-o", native).exit_code == 0
    assert run_cli("export", native, "-o", tmp_path / "e", "--dtype", "fp32", "--no-check").exit_code == 0
    config, _ = load_state(tiny("InternVL-Chat-V1-2"))
    pixels = sample_pixels(config, 2)
    np.testing.assert_array_equal(run_onnx(tmp_path / "e", pixels), run_onnx(exported("InternVL-Chat-V1-2"), pixels))


@ONNX
def test_int8_checkpoint_exports_its_unquantized_tower(tiny, exported, tmp_path, run_cli):
    """Quantized checkpoints keep InternViT and mlp1 in bf16: their export is the original's."""
    int8 = tmp_path / "int8"
    assert run_cli("quantize", tiny("InternVL2-1B"), "-o", int8, "--method", "int8").exit_code == 0
    assert run_cli("export", int8, "-o", tmp_path / "e", "--dtype", "fp32", "--no-check").exit_code == 0
    config, _ = load_state(tiny("InternVL2-1B"))
    pixels = sample_pixels(config, 2)
    np.testing.assert_array_equal(run_onnx(tmp_path / "e", pixels), run_onnx(exported("InternVL2-1B"), pixels))


@ONNX
def test_onnx_embeddings_feed_the_llm(tiny, exported):
    """The documented use: the LLM generates the same answer from ONNX image embeddings."""
    from PIL import Image

    from internvl_tools.runtime.model import InternVLRuntime

    image = Image.new("RGB", (120, 80), (200, 40, 40))
    family = "InternVL2-1B"
    torch_runtime = InternVLRuntime(tiny(family), dtype=torch.float32)
    onnx_runtime = InternVLRuntime(tiny(family), dtype=torch.float32, vision_features=onnx_vision(exported(family)))
    assert onnx_runtime.vision is None
    assert torch_runtime.generate("Describe.", image, 6) == onnx_runtime.generate("Describe.", image, 6)


@ONNX
def test_readme_splice_example(tiny, exported):
    """The README's low-level example, step by step: ONNX embeddings spliced by hand into the LLM."""
    import onnxruntime as ort
    from PIL import Image

    from internvl_tools.runtime.model import InternVLRuntime

    family = "InternVL2-1B"
    image = Image.new("RGB", (150, 90), (30, 160, 40))
    rt = InternVLRuntime(tiny(family), dtype=torch.float32, load_vision=False)
    vit = ort.InferenceSession(str(exported(family) / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = rt.pixel_values(image)
    embeds = torch.from_numpy(vit.run(["image_embeds"], {"pixel_values": pixels.numpy().astype(np.float32)})[0])
    ids = rt.prompt_ids("Describe the image.", num_tiles=pixels.shape[0])
    out = rt.llm.generate(inputs_embeds=rt.embeddings(ids, embeds), max_new_tokens=5, do_sample=False)
    full = InternVLRuntime(tiny(family), dtype=torch.float32)
    with torch.no_grad():
        want = full.llm.generate(inputs_embeds=full.embeddings(ids, full.image_features(pixels)), max_new_tokens=5, do_sample=False)
    assert out.tolist() == want.tolist()


@ONNX
def test_parity_failure_exits_1_and_keeps_the_export(tiny, tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(vision_onnx.TOLERANCE, "fp32", 0.0)
    result = run_cli("export", tiny("InternVL2-1B"), "-o", tmp_path / "e", "--dtype", "fp32")
    assert result.exit_code == 1
    assert "differs from the PyTorch forward" in result.output
    meta = json.loads((tmp_path / "e" / "export.json").read_text())
    assert not any(row["passed"] for row in meta["parity"])


@ONNX
def test_check_skipped_when_memory_is_short(tiny, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(vision_onnx, "available_memory", lambda: 1)
    result = run_cli("export", tiny("InternVL2-1B"), "-o", tmp_path / "e", "--json")
    assert result.exit_code == 0
    assert "skipped" in json.loads((tmp_path / "e" / "export.json").read_text())["parity"]


def _llm_only(src: Path, out: Path) -> Path:
    with CheckpointReader(src) as reader:
        keep = [s for s in reader.specs() if s.name.startswith("language_model.")]
        with CheckpointWriter(out, keep, inputs=[src]) as writer:
            for spec in keep:
                writer.write(spec.name, reader.get(spec.name))
            config = reader.config()
            writer.finalize(side_files_from=src, files={"config.json": config})
    return out


def _drop(src: Path, out: Path, key: str) -> Path:
    with CheckpointReader(src) as reader:
        keep = [s for s in reader.specs() if s.name != key]
        with CheckpointWriter(out, keep, inputs=[src]) as writer:
            for spec in keep:
                writer.write(spec.name, reader.get(spec.name))
            writer.finalize(side_files_from=src)
    return out


@pytest.mark.parametrize("case", ["no-vision", "dtype-int8", "dtype-bf16-onnx", "opset-16", "out-inside",
                                  pytest.param("missing-layer", marks=ONNX), pytest.param("no-projector", marks=ONNX),
                                  "max-batch-0", "not-a-checkpoint"])
def test_bad_input_exits_2_with_one_line(tiny, tmp_path, run_cli, case):
    src = tiny("InternVL2-1B")
    out = tmp_path / "e"
    (tmp_path / "empty").mkdir()
    args = {
        "no-vision": [_llm_only(src, tmp_path / "llm-only"), "-o", out],
        "dtype-int8": [src, "-o", out, "--dtype", "int8"],
        "dtype-bf16-onnx": [src, "-o", out, "--dtype", "bf16"],
        "opset-16": [src, "-o", out, "--opset", "16"],
        "out-inside": [src, "-o", src / "onnx"],
        "missing-layer": [_drop(src, tmp_path / "holed", "vision_model.encoder.layers.1.mlp.fc2.weight"), "-o", out],
        "no-projector": [_drop(src, tmp_path / "noproj", "mlp1.1.weight"), "-o", out],
        "max-batch-0": [src, "-o", out, "--max-batch", "0"],
        "not-a-checkpoint": [tmp_path / "empty", "-o", out],
    }[case]
    result = run_cli("export", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists() and not out.with_name("e.partial").exists()
    if case == "missing-layer":
        assert "vision_model.encoder.layers.1.mlp.fc2.weight" in lines[0]
    if case == "no-projector":
        assert "--part vision" in lines[0]
        assert run_cli("export", args[0], "-o", out, "--part", "vision", "--no-check").exit_code == 0


# -- TensorRT ------------------------------------------------------------------------------

def test_engine_plan_profile():
    plan = trt_engine.plan_engine("fp16", "pixel_values", 448, 13)
    assert plan.min_shape == (1, 3, 448, 448) and plan.opt_shape == (13, 3, 448, 448) and plan.max_shape == (13, 3, 448, 448)
    assert plan.workspace_bytes == 4 << 30
    assert trt_engine.plan_engine("bf16", "pixel_values", 448, 13, opt_batch=7, workspace_gib=2).opt_shape[0] == 7
    assert "--minShapes=pixel_values:1x3x448x448" in plan.trtexec_command("m.onnx", "m.engine")
    for bad in (dict(precision="fp32"), dict(max_batch=0), dict(opt_batch=14), dict(workspace_gib=0)):
        kwargs = dict(precision="fp16", input_name="pixel_values", image_size=448, max_batch=13) | bad
        with pytest.raises(InputError):
            trt_engine.plan_engine(**kwargs)


class FakeTensorRT(types.ModuleType):
    """Records what build_engine asks of TensorRT's builder."""

    def __init__(self, parse_ok: bool = True, build_ok: bool = True):
        super().__init__("tensorrt")
        self.calls = {}
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                fake.calls["logger"] = level

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls["parsed"] = path
                assert Path(path).with_suffix(".onnx.data").exists()  # external data next to the graph
                return parse_ok

            def get_error(self, i):
                return "In node 3 (Conv): unsupported"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls["profile"] = (name, tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls["workspace"] = (pool, size)

            def set_flag(self, flag):
                fake.calls.setdefault("flags", []).append(flag)

            def add_optimization_profile(self, profile):
                fake.calls["profiles"] = fake.calls.get("profiles", 0) + 1

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"] = flags
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"ENGINE-BYTES" if build_ok else None

        self.Logger, self.OnnxParser, self.Builder = Logger, Parser, Builder
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="fp16-flag", BF16="bf16-flag")
        self.__version__ = "10.fake"


@ONNX
@pytest.mark.parametrize("precision,onnx_dtype", [("fp16", "fp16"), ("bf16", "fp32")])
def test_tensorrt_engine_through_the_cli(tiny, tmp_path, run_cli, monkeypatch, precision, onnx_dtype):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    out = tmp_path / "trt"
    result = run_cli("export", tiny("InternVL2-1B"), "-o", out, "--format", "tensorrt", "--dtype", precision, "--max-batch", "5",
                     "--opt-batch", "2", "--workspace", "1", "--json")
    assert result.exit_code == 0, result.output
    assert (out / "model.engine").read_bytes() == b"ENGINE-BYTES"
    meta = json.loads((out / "export.json").read_text())
    assert meta["dtype"] == onnx_dtype and meta["engine"]["precision"] == precision
    config, _ = load_state(tiny("InternVL2-1B"))
    size = config["force_image_size"]
    assert fake.calls["profile"] == ("pixel_values", (1, 3, size, size), (2, 3, size, size), (5, 3, size, size))
    assert fake.calls["flags"] == [f"{precision}-flag"] and fake.calls["workspace"] == ("workspace", 1 << 30)
    assert fake.calls["profiles"] == 1 and fake.calls["parsed"] == str(out.with_name("trt.partial") / "model.onnx")


@pytest.mark.requires("onnx")  # the graph is exported before TensorRT is asked for
@pytest.mark.parametrize("fake,message", [(FakeTensorRT(parse_ok=False), "In node 3 (Conv): unsupported"),
                                          (FakeTensorRT(build_ok=False), "could not build an engine"),
                                          (None, "pip install --extra-index-url https://pypi.nvidia.com tensorrt")])
def test_tensorrt_errors_exit_2(tiny, tmp_path, run_cli, monkeypatch, fake, message):
    monkeypatch.setitem(sys.modules, "tensorrt", fake)  # None: import fails, as on a machine without TensorRT
    out = tmp_path / "trt"
    result = run_cli("export", tiny("InternVL2-1B"), "-o", out, "--format", "tensorrt", "--no-check")
    assert result.exit_code == 2
    assert message in result.output.strip().splitlines()[-1]
    assert not out.exists() and not out.with_name("trt.partial").exists()
    assert run_cli("export", tiny("InternVL2-1B"), "-o", out, "--format", "tensorrt", "--dtype", "fp32").exit_code == 2


@pytest.mark.parametrize("missing,extra", [("onnx", ["--no-check"]), pytest.param("onnxruntime", [], marks=pytest.mark.requires("onnx"))])
def test_missing_onnx_packages_exit_2(tiny, tmp_path, run_cli, monkeypatch, missing, extra):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    result = run_cli("export", tiny("InternVL2-1B"), "-o", tmp_path / "e", *extra)
    assert result.exit_code == 2 and f"needs the {missing} package" in result.output and "internvl-tools[onnx]" in result.output


# -- bounded-memory (segmented) parity check ------------------------------------------------

@ONNX
@pytest.mark.parametrize("family,dtype", [("InternVL-Chat-V1-1", "fp32"), ("InternVL2-1B", "fp16"), ("InternVL2-Llama3-76B", "fp32")])
def test_segmented_check_passes(tiny, tmp_path, run_cli, family, dtype):
    out = tmp_path / "e"
    result = run_cli("export", tiny(family), "-o", out, "--dtype", dtype, "--check-segment-layers", "1", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "export.json").read_text())["parity"]
    assert [r["batch"] for r in rows] == [1, 3] and all(r["passed"] and r["mode"] == "segments of 1 layers" for r in rows)
    assert not (out / ".check-segment.onnx").exists()


def _scale_weight(folder: Path, name: str, factor: float) -> None:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == name)
    info = {e.key: int(e.value) if e.key != "location" else e.value for e in init.external_data}
    data = np.memmap(folder / "model.onnx.data", dtype=np.float32, mode="r+", offset=info["offset"], shape=(info["length"] // 4,))
    data *= factor
    data.flush()


@ONNX
def test_both_checks_catch_a_damaged_weight(tiny, tmp_path, run_cli):
    family = "InternVL2-Llama3-76B"
    out = tmp_path / "e"
    assert run_cli("export", tiny(family), "-o", out, "--dtype", "fp32", "--no-check").exit_code == 0
    plan = vision_onnx.plan_export(tiny(family), "vision+projector", "fp32", 18)
    assert all(r["passed"] for r in vision_onnx.parity(plan, out / "model.onnx", [1, 3]))
    _scale_weight(out, "vision_model.encoder.layers.1.mlp.fc2.weight.T", 1.05)
    assert not any(r["passed"] for r in vision_onnx.parity(plan, out / "model.onnx", [1, 3]))
    rows = vision_onnx.parity_segments(plan, out, [1, 3], 1)
    assert not any(r["passed"] for r in rows) and {r["worst_segment"] for r in rows} == {"layers 1-1 + head"}


@pytest.mark.requires("onnx")  # plan_export builds the graph
def test_check_mode_follows_memory(tiny):
    plan = vision_onnx.plan_export(tiny("InternVL2-Llama3-76B"), "vision+projector", "fp16", 18)
    full = vision_onnx.check_memory_needed(plan)
    assert vision_onnx.check_mode(plan, full) == ("full", 0)
    assert vision_onnx.check_mode(plan, full - 1) == ("segments", 1)  # two layers: halves to one
    assert vision_onnx.check_mode(plan, vision_onnx.segment_memory_needed(plan, 1) - 1) == ("skip", 0)
    assert vision_onnx.check_mode(plan, full, segment_layers=5) == ("segments", plan.shape.layers)
    assert vision_onnx.segment_memory_needed(plan, 2) > vision_onnx.segment_memory_needed(plan, 1)


@ONNX
def test_chat_and_verify_refuse_an_export_of_another_pixel_shuffle(tiny, exported, copy_of, tmp_path, run_cli):
    """An export whose shapes fit but whose ps_version (or select_layer, downsample_ratio) is not the checkpoint's:
    chat --vision-onnx refuses it as verify --vision-onnx does, with one line naming the field (it ran silently)."""
    from internvl_tools.io.slices import write_tsv

    from .support import make_items

    export = exported("InternVL2-1B")
    folder = copy_of(tiny("InternVL2-1B"))
    config = json.loads((folder / "config.json").read_text())
    config["ps_version"] = "v1"  # same widths and token count, another pixel shuffle
    (folder / "config.json").write_text(json.dumps(config))
    bench = write_tsv(make_items(1), tmp_path / "slice.tsv")
    lines = []
    for args in (["chat", folder, "hi", "--vision-onnx", export], ["verify", folder, "--vision-onnx", export, "--bench", bench]):
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        lines.append(result.output.strip().splitlines()[-1])
    assert all("ps_version 'v2'" in line and "export the vision tower of this checkpoint" in line for line in lines)
    assert run_cli("chat", tiny("InternVL2-1B"), "hi", "--vision-onnx", export, "--max-new-tokens", "1").exit_code == 0
