"""Export the vision tower (+ projector) of a checkpoint to ONNX with bounded memory.

The graph comes from `graph.py` (no tracing); weights are streamed one tensor at a time from
the checkpoint into `model.onnx.data` at page-aligned offsets, so peak memory is about the
largest tensor in the export dtype plus the interpreter and onnx themselves. The result is
checked with onnx.checker and, unless skipped, against the PyTorch forward with onnxruntime.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..arch.layout import build_layout
from ..errors import InputError
from .graph import INPUT_NAME, TowerShape, VisionGraph, build_graph, tower_shape

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
META_FILE = "export.json"
ALIGN = 4096  # page-aligned large initializers let onnxruntime map them instead of copying
SMALL, SMALL_ALIGN = 1 << 16, 64
DTYPES = ("fp32", "fp16")
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
FLOAT_SOURCES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class ExportPlan:
    """What will be exported from one checkpoint, before any byte is written."""

    checkpoint: Path
    config: dict  # the original-layout config.json (also for native or quantized inputs)
    shape: TowerShape
    graph: VisionGraph
    weight_bytes: int  # in the export dtype
    params: int
    largest_bytes: int


def plan_export(checkpoint: Path, part: str, dtype: str, opset: int) -> ExportPlan:
    """Validate the checkpoint and build the (weightless) graph."""
    from ..runtime.model import open_for_runtime

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not supported for ONNX; choose fp16 or fp32 (bf16 is a TensorRT precision: "
                         "--format tensorrt --dtype bf16)")
    with open_for_runtime(checkpoint) as reader:
        config = reader.config()
        layout = build_layout(config, reader.specs())
        specs = {spec.name: spec for spec in reader.specs()}
        shape = tower_shape(config, layout, {name: tuple(spec.shape) for name, spec in specs.items()}, str(checkpoint), part)
        graph = build_graph(shape, part, dtype, opset)
        itemsize = 2 if dtype == "fp16" else 4
        sizes = []
        for ref in graph.weights:
            spec = specs.get(ref.key)
            if spec is None:
                raise InputError(f"{checkpoint}: no tensor {ref.key!r}, which the vision tower needs; the checkpoint is incomplete "
                                 "or its config.json does not match it (vision_config, select_layer)")
            if spec.dtype not in FLOAT_SOURCES:
                raise InputError(f"{checkpoint}: {ref.key} is {spec.dtype}; export reads bf16/fp16/fp32 vision weights "
                                 "(export from the unquantized checkpoint)")
            sizes.append(int(np.prod(spec.shape, dtype=np.int64)))
    return ExportPlan(Path(checkpoint), config, shape, graph, sum(sizes) * itemsize, sum(sizes), max(sizes) * itemsize)


def write_weights(checkpoint: Path, graph: VisionGraph, path: Path, progress=None) -> list:
    """Stream every weight of the graph into one external-data file; return their TensorProtos."""
    import torch
    from onnx import TensorProto

    from ..runtime.model import open_for_runtime

    torch_dtype, proto_dtype = (torch.float16, TensorProto.FLOAT16) if graph.dtype == "fp16" else (torch.float32, TensorProto.FLOAT)
    protos, offset = [], 0
    with open_for_runtime(checkpoint) as reader, open(path, "wb") as handle:
        for ref in graph.weights:
            source = reader.get(ref.key)
            view = source.t() if ref.transpose else source
            converted = torch.empty(view.shape, dtype=torch_dtype)
            converted.copy_(view)  # one copy: cast and transpose together
            del source, view
            array = converted.numpy()
            if not np.isfinite(array).all():
                raise InputError(f"{checkpoint}: {ref.key} has NaN or infinite values in {graph.dtype}"
                                 + ("; it overflows fp16, export with --dtype fp32" if graph.dtype == "fp16" else ""))
            pad = -offset % (ALIGN if array.nbytes >= SMALL else SMALL_ALIGN)
            handle.write(b"\0" * pad)
            offset += pad
            handle.write(array.data)
            proto = TensorProto()
            proto.name, proto.data_type = ref.name, proto_dtype
            proto.dims.extend(array.shape)
            proto.data_location = TensorProto.EXTERNAL
            for key, value in (("location", path.name), ("offset", offset), ("length", array.nbytes)):
                entry = proto.external_data.add()
                entry.key, entry.value = key, str(value)
            protos.append(proto)
            offset += array.nbytes
            if progress:
                progress(array.nbytes)
            del array
    return protos


def make_model(graph: VisionGraph, initializers: list, metadata: dict):
    """The ModelProto (weights stay external)."""
    from onnx import TensorProto, helper

    shape = graph.shape
    elem = TensorProto.FLOAT16 if graph.dtype == "fp16" else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(INPUT_NAME, elem, ["batch", 3, shape.image_size, shape.image_size])]
    outputs = [helper.make_tensor_value_info(graph.output_name, elem, list(shape.output_shape(graph.part)))]
    onnx_graph = helper.make_graph(graph.nodes, "internvl_vision", inputs, outputs, initializer=[*graph.constants, *initializers])
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", graph.opset)],
                              producer_name="internvl-tools", producer_version=__version__)
    model.ir_version = 10 if graph.opset >= 21 else 9
    helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
    return model


def metadata_of(plan: ExportPlan, config: dict, max_batch: int) -> dict:
    """What a consumer needs to feed the model and use its output (also export.json)."""
    shape, graph = plan.shape, plan.graph
    return {
        "source": str(plan.checkpoint.resolve()),
        "part": graph.part,
        "dtype": graph.dtype,
        "opset": graph.opset,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, shape.image_size, shape.image_size],
                  "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        "output": {"name": graph.output_name, "shape": list(shape.output_shape(graph.part))},
        "max_batch": max_batch,
        "image_size": shape.image_size,
        "tokens_per_tile": shape.tokens,
        "ps_version": shape.ps_version,
        "downsample_ratio": shape.ratio,
        "vision_layers": shape.layers,
        "select_layer": config.get("select_layer", -1),
        "template": config.get("template"),
        "params": plan.params,
        "weight_bytes": plan.weight_bytes,
    }


def default_max_batch(config: dict) -> int:
    """Tiles per image the checkpoint's preprocessing can produce (dynamic tiles + thumbnail)."""
    if not config.get("dynamic_image_size"):
        return 1
    most = int(config.get("max_dynamic_patch", 12))
    return most + (1 if config.get("use_thumbnail") and most > 1 else 0)


def sample_pixels(config: dict, batch: int, seed: int = 0):
    """Preprocessed tiles of drawn pictures (realistic value ranges), [batch, 3, S, S] fp32."""
    import torch

    from ..quant.calibration import draw_image
    from ..runtime.preprocess import to_tensor

    size = config.get("force_image_size") or config["vision_config"]["image_size"]
    rng = random.Random(seed)
    return torch.stack([to_tensor(draw_image(rng)[0], size) for _ in range(batch)])


def check_memory_needed(plan: ExportPlan) -> int:
    """Bytes the parity check holds: the fp32 PyTorch tower, the onnxruntime session (its weights and,
    for fp16 on the CPU, fp32 copies of them), plus activations."""
    fp32 = plan.params * 4
    session = plan.weight_bytes + (fp32 if plan.graph.dtype == "fp16" else 0)
    return fp32 + session + (1 << 30)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def parity(plan: ExportPlan, model_path: Path, batches: list[int]) -> list[dict]:
    """onnxruntime vs the fp32 PyTorch forward (the runtime's transformers modules) at each batch size.

    relative_error = max |onnx - torch| / max |torch|."""
    import onnxruntime as ort
    import torch

    from ..runtime.build import build_vision
    from ..runtime.model import InternVLRuntime, open_for_runtime

    if plan.graph.part == "vision":
        with open_for_runtime(plan.checkpoint) as reader:
            tower, _ = build_vision(reader, plan.config, build_layout(plan.config, reader.specs()), torch.float32, with_projector=False)

        def forward(pixels):
            return tower(pixel_values=pixels).last_hidden_state[:, 1:, :]
    else:
        forward = InternVLRuntime(plan.checkpoint, dtype=torch.float32, load_llm=False).image_features
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    np_dtype = np.float16 if plan.graph.dtype == "fp16" else np.float32
    results = []
    for batch in batches:
        pixels = sample_pixels(plan.config, batch, seed=batch)
        with torch.no_grad():
            reference = forward(pixels).float().numpy()
        got = session.run([plan.graph.output_name], {INPUT_NAME: pixels.numpy().astype(np_dtype)})[0].astype(np.float32)
        if got.shape != reference.shape:
            raise RuntimeError(f"onnx output {got.shape} differs from the torch output {reference.shape}")
        max_abs = float(np.abs(got - reference).max())
        relative = max_abs / max(float(np.abs(reference).max()), 1e-30)
        tolerance = TOLERANCE[plan.graph.dtype]
        passed = bool(np.isfinite(got).all()) and relative <= tolerance
        results.append({"batch": batch, "max_abs_error": max_abs, "relative_error": relative, "tolerance": tolerance, "passed": passed})
    return results


def export_onnx(plan: ExportPlan, folder: Path, max_batch: int, progress=None) -> dict:
    """Write model.onnx + model.onnx.data into `folder` and run onnx.checker; return the metadata."""
    import onnx

    started = time.perf_counter()
    initializers = write_weights(plan.checkpoint, plan.graph, folder / WEIGHTS_FILE, progress)
    metadata = metadata_of(plan, plan.config, max_batch)
    model = make_model(plan.graph, initializers, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in metadata.items()})
    onnx.save_model(model, folder / MODEL_FILE)
    del model, initializers
    try:
        onnx.checker.check_model(str(folder / MODEL_FILE))
    except onnx.checker.ValidationError as exc:  # a bug of ours, never bad input
        raise RuntimeError(f"onnx.checker rejected the exported graph: {exc}") from exc
    metadata["export_seconds"] = round(time.perf_counter() - started, 3)
    metadata["files"] = {MODEL_FILE: os.path.getsize(folder / MODEL_FILE), WEIGHTS_FILE: os.path.getsize(folder / WEIGHTS_FILE)}
    return metadata
