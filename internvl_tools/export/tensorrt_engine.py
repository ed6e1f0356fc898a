"""A TensorRT engine from the exported ONNX graph, with the tensorrt Python API.

The plan (precision, optimization profile, workspace) is a pure function; `build_engine`
drives TensorRT's builder with it. TensorRT needs an NVIDIA GPU and NVIDIA's package index,
so on a machine without them `--format tensorrt` stops with a message saying what to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

ENGINE_FILE = "model.engine"
PRECISIONS = ("fp16", "bf16")
# The ONNX graph each engine precision is built from: fp16 engines from the fp16 graph (half the
# bytes to parse), bf16 engines from the fp32 graph (TensorRT lowers it; fp16 weights would
# already have lost bf16's range).
ONNX_DTYPE = {"fp16": "fp16", "bf16": "fp32"}
INSTALL_HINT = ("--format tensorrt needs TensorRT's Python package and an NVIDIA GPU: "
                "pip install --extra-index-url https://pypi.nvidia.com tensorrt (TensorRT 10 or newer), "
                "or export --format onnx and build the engine with trtexec on the GPU machine")


@dataclass(frozen=True)
class EnginePlan:
    """Builder settings for one engine."""

    precision: str
    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    workspace_bytes: int

    def trtexec_command(self, onnx_path: str, engine_path: str) -> str:
        """The equivalent trtexec command line (for users who build on another machine)."""
        dims = lambda shape: "x".join(str(d) for d in shape)  # noqa: E731
        return (f"trtexec --onnx={onnx_path} --saveEngine={engine_path} --{self.precision} "
                f"--minShapes={self.input_name}:{dims(self.min_shape)} --optShapes={self.input_name}:{dims(self.opt_shape)} "
                f"--maxShapes={self.input_name}:{dims(self.max_shape)} --memPoolSize=workspace:{self.workspace_bytes >> 20}M")


def plan_engine(precision: str, input_name: str, image_size: int, max_batch: int, opt_batch: int | None = None,
                workspace_gib: float = 4.0) -> EnginePlan:
    """Profile batch 1..max_batch (optimized for `opt_batch`, default max_batch) at the tile size."""
    if precision not in PRECISIONS:
        raise InputError(f"--dtype {precision} is not a TensorRT engine precision here; choose fp16 or bf16")
    if max_batch < 1:
        raise InputError(f"--max-batch {max_batch} must be at least 1")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise InputError(f"--opt-batch {opt} must lie between 1 and --max-batch {max_batch}")
    if workspace_gib <= 0:
        raise InputError(f"--workspace {workspace_gib} GiB must be positive")
    tile = (3, image_size, image_size)
    return EnginePlan(precision, input_name, (1, *tile), (opt, *tile), (max_batch, *tile), int(workspace_gib * (1 << 30)))


def import_tensorrt():
    """The tensorrt module, or an InputError that says what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise InputError(f"{INSTALL_HINT} ({exc})") from None
    return tensorrt


def build_engine(plan: EnginePlan, onnx_path: Path, engine_path: Path, trt=None) -> int:
    """Parse the ONNX file (external data next to it), build and serialize the engine; return its size."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no detail"
        raise InputError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}; check the TensorRT version (10 or newer)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    flag = {"fp16": "FP16", "bf16": "BF16"}[plan.precision]
    if not hasattr(trt.BuilderFlag, flag):
        raise InputError(f"this TensorRT ({getattr(trt, '__version__', '?')}) has no {flag} builder flag; bf16 needs TensorRT 9 or newer")
    config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input_name, plan.min_shape, plan.opt_shape, plan.max_shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"TensorRT could not build an engine from {onnx_path} (see its log above); a larger --workspace or "
                         "a smaller --max-batch may help")
    data = memoryview(serialized)
    with open(engine_path, "wb") as handle:
        handle.write(data)
    return data.nbytes
