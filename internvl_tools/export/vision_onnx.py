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
from ..models.layout import build_layout
from ..errors import InputError
from .graph import INPUT_NAME, TowerShape, VisionGraph, build_graph, tower_shape  # noqa: F401

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
    layer_params: int  # one vision layer's


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
        first_layer = sum(size for ref, size in zip(graph.weights, sizes) if ref.key.startswith("vision_model.encoder.layers.0."))
    return ExportPlan(Path(checkpoint), config, shape, graph, sum(sizes) * itemsize, sum(sizes), max(sizes) * itemsize, first_layer)


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

    elem = TensorProto.FLOAT16 if graph.dtype == "fp16" else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(graph.input_name, elem, graph.input_shape())]
    outputs = [helper.make_tensor_value_info(graph.output_name, elem, graph.output_shape())]
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

    from ..calibrate.samples import draw_image
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


def session_for(path: Path, device: str = "cpu"):
    """A quiet onnxruntime session (CUDA first when asked for and available)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def input_dtype(graph: VisionGraph):
    return np.float16 if graph.dtype == "fp16" else np.float32


def errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, that / max |want|); infinite when the output is not finite."""
    if got.shape != want.shape:
        raise RuntimeError(f"onnx output {got.shape} differs from the torch output {want.shape}")
    max_abs = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
    return max_abs, max_abs / max(float(np.abs(want).max()), 1e-30)


def parity(plan: ExportPlan, model_path: Path, batches: list[int]) -> list[dict]:
    """onnxruntime vs the fp32 PyTorch forward (the runtime's transformers modules) at each batch size.

    relative_error = max |onnx - torch| / max |torch|."""
    import torch

    from ..runtime.build import VisionParts
    from ..runtime.model import InternVLRuntime, open_for_runtime

    if plan.graph.part == "vision":
        with open_for_runtime(plan.checkpoint) as reader:
            tower = VisionParts(reader, plan.config, build_layout(plan.config, reader.specs()), torch.float32).tower()

        def forward(pixels):
            return tower(pixel_values=pixels).last_hidden_state[:, 1:, :]
    else:
        forward = InternVLRuntime(plan.checkpoint, dtype=torch.float32, load_llm=False).image_features
    session = session_for(model_path)
    np_dtype = input_dtype(plan.graph)
    results = []
    for batch in batches:
        pixels = sample_pixels(plan.config, batch, seed=batch)
        with torch.no_grad():
            reference = forward(pixels).float().numpy()
        got = session.run([plan.graph.output_name], {INPUT_NAME: pixels.numpy().astype(np_dtype)})[0].astype(np.float32)
        max_abs, relative = errors(got, reference)
        tolerance = TOLERANCE[plan.graph.dtype]
        results.append({"batch": batch, "max_abs_error": max_abs, "relative_error": relative, "tolerance": tolerance,
                        "passed": relative <= tolerance})
    return results


def segment_memory_needed(plan: ExportPlan, layers: int) -> int:
    """What the segmented check holds for `layers` layers at a time (plus the head's projector)."""
    itemsize = 2 if plan.graph.dtype == "fp16" else 4
    per_param = 4 + itemsize + (4 if plan.graph.dtype == "fp16" else 0)  # torch fp32, onnx weights, fp32 copies
    head = plan.params - plan.shape.layers * plan.layer_params  # embeddings and mlp1
    return (layers * plan.layer_params + head) * per_param + (1 << 30)


def check_mode(plan: ExportPlan, available: int, segment_layers: int = 0) -> tuple[str, int]:
    """("full", 0), ("segments", layers per segment) or ("skip", 0) for the memory available."""
    if segment_layers:
        return "segments", min(segment_layers, plan.shape.layers)
    if check_memory_needed(plan) <= available:
        return "full", 0
    layers = plan.shape.layers
    while layers > 1 and segment_memory_needed(plan, layers) > available:
        layers = max(1, layers // 2)
    return ("segments", layers) if segment_memory_needed(plan, layers) <= available else ("skip", 0)


def parity_segments(plan: ExportPlan, folder: Path, batches: list[int], layers_per_segment: int) -> list[dict]:
    """The parity check in bounded memory: the graph is cut into segments of layers (the same
    builder, the same initializers in model.onnx.data); each segment runs in onnxruntime on the
    PyTorch hidden state that enters it and is compared with the same PyTorch layers, built one
    segment at a time. The first segment starts from pixel_values, the last ends with the
    part's output. Per batch, the worst segment is reported."""
    import onnx
    import torch

    from ..runtime.build import VisionParts
    from ..runtime.model import open_for_runtime, pixel_shuffle

    full = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    stored = {init.name: init for init in full.graph.initializer}
    del full
    shape, graph = plan.shape, plan.graph
    np_dtype = input_dtype(graph)
    pixels = {batch: sample_pixels(plan.config, batch, seed=batch) for batch in batches}
    hidden: dict[int, torch.Tensor] = {}
    worst = {batch: (0.0, 0.0, "") for batch in batches}
    segment_path = folder / ".check-segment.onnx"
    with open_for_runtime(plan.checkpoint) as reader, torch.no_grad():
        parts = VisionParts(reader, plan.config, build_layout(plan.config, reader.specs()), torch.float32)
        embeddings = parts.embeddings()
        for batch in batches:
            hidden[batch] = embeddings(pixels[batch])
        del embeddings
        for start in range(0, shape.layers, layers_per_segment):
            stop = min(start + layers_per_segment, shape.layers)
            segment = build_graph(shape, graph.part, graph.dtype, graph.opset, start, stop)
            names = list(dict.fromkeys(ref.name for ref in segment.weights))
            onnx.save_model(make_model(segment, [stored[name] for name in names], {}), segment_path)
            try:
                session = session_for(segment_path)
            finally:
                segment_path.unlink(missing_ok=True)
            layers = [parts.layer(index) for index in range(start, stop)]
            head = parts.projector() if stop == shape.layers and graph.part == "vision+projector" else None
            for batch in batches:
                feed = pixels[batch] if start == 0 else hidden[batch]
                x = hidden[batch]
                for layer in layers:
                    x = layer(x)
                hidden[batch] = x
                if stop == shape.layers:
                    x = x[:, 1:, :]
                    if head is not None:
                        grid = pixel_shuffle(x.reshape(x.shape[0], shape.side, shape.side, -1), shape.ratio, shape.ps_version)
                        x = head(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
                got = session.run([segment.output_name], {segment.input_name: feed.numpy().astype(np_dtype)})[0].astype(np.float32)
                max_abs, relative = errors(got, x.float().numpy())
                if relative >= worst[batch][1]:
                    worst[batch] = (max_abs, relative, f"layers {start}-{stop - 1}" + (" + head" if stop == shape.layers else ""))
            del layers, head, session
    tolerance = TOLERANCE[graph.dtype]
    return [{"batch": batch, "max_abs_error": worst[batch][0], "relative_error": worst[batch][1], "tolerance": tolerance,
             "passed": worst[batch][1] <= tolerance, "mode": f"segments of {layers_per_segment} layers", "worst_segment": worst[batch][2]}
            for batch in batches]


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
