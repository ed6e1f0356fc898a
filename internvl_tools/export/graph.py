"""InternViT + pixel shuffle + mlp1 stated as an ONNX graph, node by node, from config.json.

Nothing is instantiated or traced: the graph is written from the architecture facts (the same
forward the runtime builds from transformers modules), and every weight is a named reference
to a checkpoint tensor plus a transform (transpose for MatMul). The executor
(`vision_onnx.py`) streams those tensors into the external-data file one at a time, so the
graph itself costs a few kilobytes whatever the tower's size.

Numerics follow the PyTorch forward: RMSNorm, LayerNorm and softmax are computed in fp32
inside an fp16 graph (Cast around them), matrix products in the export dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..models.layout import Layout
from ..errors import InputError
from ..runtime.build import vision_layers_needed

PARTS = ("vision+projector", "vision")
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = {"vision+projector": "image_embeds", "vision": "vision_features"}
HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"  # the ends of a segment graph (parity check)
MIN_OPSET, MAX_OPSET = 17, 21
PROJECTOR_EPS = 1e-5  # mlp1.0 is a plain nn.LayerNorm
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class TowerShape:
    """What the graph needs to know about one checkpoint's vision tower and projector."""

    hidden: int
    heads: int
    layers: int  # layers select_layer needs (the rest are never run)
    intermediate: int
    norm_type: str  # rms_norm (InternViT-6B) or layer_norm (InternViT-300M)
    eps: float
    qkv_bias: bool
    qk_norm: bool
    image_size: int
    patch: int
    ps_version: str
    ratio: float
    projector_hidden: int
    llm_hidden: int
    act: str = "gelu"

    @property
    def side(self) -> int:
        return self.image_size // self.patch

    @property
    def patches(self) -> int:
        return self.side * self.side

    @property
    def tokens(self) -> int:
        """Image tokens per tile after pixel shuffle (256 for a 448 px tile)."""
        return int(self.side * self.ratio) ** 2

    @property
    def projector_in(self) -> int:
        return int(self.hidden / (self.ratio * self.ratio))

    def output_shape(self, part: str) -> tuple[str | int, ...]:
        if part == "vision":
            return ("batch", self.patches, self.hidden)
        return ("batch", self.tokens, self.llm_hidden)


def tower_shape(config: dict, layout: Layout, shapes: dict[str, tuple[int, ...]], where: str,
                part: str = "vision+projector") -> TowerShape:
    """The tower's facts from config.json, checked against the tensor shapes (`shapes`: key -> shape)."""
    vision = config.get("vision_config")
    if "vision" in layout.lora:
        raise InputError(f"{where}: the vision tower carries embedded LoRA (use_backbone_lora); merge it first with "
                         "`internvl-tools merge-lora`, then export the merged checkpoint")
    if not vision or layout.vision_layers == 0 or "vision_model.embeddings.patch_embedding.weight" not in shapes:
        raise InputError(f"{where}: no vision tower (no vision_model.* tensors or no vision_config in config.json); "
                         "export needs a whole InternVL checkpoint, not an LLM-only one")
    projector = part != "vision"
    missing = [key for key in ("mlp1.1.weight", "mlp1.3.weight") if key not in shapes]
    if projector and missing:
        raise InputError(f"{where}: no mlp1 projector tensor {missing[0]}; use --part vision to export the tower alone")
    size = config.get("force_image_size") or vision["image_size"]
    ratio = float(config.get("downsample_ratio", 0.5))
    hidden = vision["hidden_size"]
    shape = TowerShape(
        hidden=hidden, heads=vision["num_attention_heads"], layers=vision_layers_needed(config, layout),
        intermediate=vision["intermediate_size"], norm_type=vision.get("norm_type", "rms_norm"),
        eps=float(vision.get("layer_norm_eps", 1e-6)), qkv_bias=bool(vision.get("qkv_bias", False)),
        qk_norm=bool(vision.get("qk_normalization", False)), image_size=size, patch=vision["patch_size"],
        ps_version=config.get("ps_version", "v1"), ratio=ratio,
        projector_hidden=shapes["mlp1.1.weight"][0] if projector else 0, llm_hidden=shapes["mlp1.3.weight"][0] if projector else 0,
        act=vision.get("hidden_act", "gelu"),
    )
    if shape.norm_type not in ("rms_norm", "layer_norm"):
        raise InputError(f"{where}: vision_config.norm_type {shape.norm_type!r} is not rms_norm or layer_norm")
    if shape.act != "gelu":
        raise InputError(f"{where}: vision_config.hidden_act {shape.act!r} is not supported (InternViT uses gelu)")
    if hidden % shape.heads:
        raise InputError(f"{where}: vision hidden_size {hidden} is not divisible by num_attention_heads {shape.heads}")
    if size % shape.patch or (shape.side * ratio) != int(shape.side * ratio):
        raise InputError(f"{where}: image size {size} with patch {shape.patch} and downsample_ratio {ratio} gives no whole token grid")
    positions = shapes.get("vision_model.embeddings.position_embedding")
    if positions is None or positions[1] != shape.patches + 1:
        raise InputError(f"{where}: vision_model.embeddings.position_embedding has {positions and positions[1]} positions but a "
                         f"{size} px tile needs {shape.patches + 1}; config.json's force_image_size does not match the weights")
    if projector and shapes["mlp1.1.weight"][1] != shape.projector_in:
        raise InputError(f"{where}: mlp1.1.weight takes {shapes['mlp1.1.weight'][1]} inputs but pixel shuffle of a {hidden}-wide "
                         f"tower at ratio {ratio} gives {shape.projector_in}; config.json does not match the weights")
    return shape


@dataclass(frozen=True)
class WeightRef:
    """One initializer: which checkpoint tensor it comes from and whether it is transposed."""

    name: str
    key: str
    transpose: bool = False


@dataclass
class VisionGraph:
    """Nodes, small inline constants and weight references of the export graph."""

    shape: TowerShape
    part: str
    dtype: str  # fp32 | fp16
    opset: int
    start: int = 0  # a segment [start, stop) of the layers, for the bounded-memory check
    stop: int | None = None
    nodes: list = field(default_factory=list)
    constants: list = field(default_factory=list)
    weights: list[WeightRef] = field(default_factory=list)
    _count: int = 0

    @property
    def input_name(self) -> str:
        return INPUT_NAME if self.start == 0 else HIDDEN_IN

    @property
    def output_name(self) -> str:
        return OUTPUT_NAMES[self.part] if self.stop in (None, self.shape.layers) else HIDDEN_OUT

    def input_shape(self) -> list:
        if self.start == 0:
            return ["batch", 3, self.shape.image_size, self.shape.image_size]
        return ["batch", self.shape.patches + 1, self.shape.hidden]

    def output_shape(self) -> list:
        if self.output_name == HIDDEN_OUT:
            return ["batch", self.shape.patches + 1, self.shape.hidden]
        return list(self.shape.output_shape(self.part))


class _Builder:
    """Appends nodes to a VisionGraph with unique value names."""

    def __init__(self, graph: VisionGraph):
        from onnx import TensorProto

        self.g = graph
        self.float = TensorProto.FLOAT16 if graph.dtype == "fp16" else TensorProto.FLOAT
        self.np_float = np.float16 if graph.dtype == "fp16" else np.float32
        self._constants: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], name_hint: str, outputs: int = 1, **attrs) -> str | list[str]:
        from onnx import helper

        self.g._count += 1
        names = [f"{name_hint}_{self.g._count}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        self.g.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self.g._count}", **attrs))
        return names if outputs > 1 else names[0]

    def const(self, values, dtype) -> str:
        """A small inline initializer (shapes, scalars), shared between uses."""
        from onnx import numpy_helper

        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"const_{len(self._constants)}"
            self.g.constants.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def scalar(self, value: float, fp32: bool = False) -> str:
        return self.const(value, np.float32 if fp32 else self.np_float)

    def weight(self, key: str, transpose: bool = False) -> str:
        name = key + (".T" if transpose else "")
        self.g.weights.append(WeightRef(name, key, transpose))
        return name

    # -- building blocks -------------------------------------------------------------
    def to_fp32(self, x: str) -> str:
        from onnx import TensorProto

        return x if self.g.dtype == "fp32" else self.op("Cast", [x], "up", to=TensorProto.FLOAT)

    def from_fp32(self, x: str) -> str:
        return x if self.g.dtype == "fp32" else self.op("Cast", [x], "down", to=self.float)

    def linear(self, x: str, prefix: str, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.weight(prefix + ".weight", transpose=True)], "matmul")
        return self.op("Add", [y, self.weight(prefix + ".bias")], "linear") if bias else y

    def rms_norm(self, x: str, weight_key: str, eps: float) -> str:
        """weight * (x / sqrt(mean(x^2) + eps)), the statistics in fp32."""
        x32 = self.to_fp32(x)
        square = self.op("Mul", [x32, x32], "square")
        mean = self.reduce_mean(square)
        root = self.op("Sqrt", [self.op("Add", [mean, self.scalar(eps, fp32=True)], "var_eps")], "rms")
        normed = self.from_fp32(self.op("Div", [x32, root], "rms_normed"))
        return self.op("Mul", [normed, self.weight(weight_key)], "rms_norm")

    def reduce_mean(self, x: str) -> str:
        if self.g.opset >= 18:
            return self.op("ReduceMean", [x, self.ints(-1)], "mean", keepdims=1)
        return self.op("ReduceMean", [x], "mean", axes=[-1], keepdims=1)

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        return self.op("LayerNormalization", [x, self.weight(prefix + ".weight"), self.weight(prefix + ".bias")], "layer_norm",
                       axis=-1, epsilon=eps, stash_type=1)

    def norm(self, x: str, prefix: str) -> str:
        shape = self.g.shape
        if shape.norm_type == "rms_norm":
            return self.rms_norm(x, prefix + ".weight", shape.eps)
        return self.layer_norm(x, prefix, shape.eps)

    def gelu(self, x: str) -> str:
        """Exact (erf) GELU: the Gelu op from opset 20, the erf formula before."""
        if self.g.opset >= 20:
            return self.op("Gelu", [x], "gelu", approximate="none")
        inner = self.op("Erf", [self.op("Mul", [x, self.scalar(1 / math.sqrt(2))], "gelu_scaled")], "gelu_erf")
        half = self.op("Mul", [x, self.scalar(0.5)], "gelu_half")
        return self.op("Mul", [half, self.op("Add", [inner, self.scalar(1.0)], "gelu_1p")], "gelu")

    def heads(self, x: str, perm: list[int]) -> str:
        shape = self.g.shape
        split = self.op("Reshape", [x, self.ints(0, 0, shape.heads, shape.hidden // shape.heads)], "heads")
        return self.op("Transpose", [split], "heads_t", perm=perm)


def build_graph(shape: TowerShape, part: str = "vision+projector", dtype: str = "fp16", opset: int = 18,
                start: int = 0, stop: int | None = None) -> VisionGraph:
    """The export graph: pixel_values [batch, 3, S, S] -> the part's output.

    `start`/`stop` give a segment of it (for the bounded-memory parity check): a segment that
    does not start at layer 0 takes `hidden_in` [batch, 1 + patches, hidden] instead of pixels,
    one that stops before the last layer gives `hidden_out`. Its nodes and weight references
    are those of the same layers in the whole graph."""
    if part not in PARTS:
        raise InputError(f"--part {part!r} is not one of {', '.join(PARTS)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"--opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET} (LayerNormalization needs 17)")
    stop = shape.layers if stop is None else stop
    if not 0 <= start <= stop <= shape.layers:
        raise ValueError(f"segment {start}:{stop} outside 0:{shape.layers}")
    graph = VisionGraph(shape=shape, part=part, dtype=dtype, opset=opset, start=start, stop=stop)
    b = _Builder(graph)
    x = _embeddings(b, shape) if start == 0 else HIDDEN_IN
    scale = b.scalar((shape.hidden // shape.heads) ** -0.5)
    for index in range(start, stop):
        x = _layer(b, shape, x, index, scale)
    if stop < shape.layers:
        x = b.op("Identity", [x], "segment_out")
    else:
        x = b.op("Slice", [x, b.ints(1), b.ints(INT64_MAX), b.ints(1)], "drop_cls")
        if part == "vision+projector":
            _projector(b, shape, x)
    graph.nodes[-1].output[0] = graph.output_name
    return graph


def _embeddings(b: _Builder, shape: TowerShape) -> str:
    """Patch convolution, class token, position embedding: [batch, 1 + patches, hidden]."""
    e = "vision_model.embeddings."
    patches = b.op("Conv", [INPUT_NAME, b.weight(e + "patch_embedding.weight"), b.weight(e + "patch_embedding.bias")], "patch_embed",
                   kernel_shape=[shape.patch, shape.patch], strides=[shape.patch, shape.patch])
    tokens = b.op("Transpose", [b.op("Reshape", [patches, b.ints(0, shape.hidden, -1)], "patch_flat")], "patch_tokens", perm=[0, 2, 1])
    batch = b.op("Shape", [INPUT_NAME], "batch", start=0, end=1)
    cls_shape = b.op("Concat", [batch, b.ints(1, shape.hidden)], "cls_shape", axis=0)
    cls = b.op("Expand", [b.weight(e + "class_embedding"), cls_shape], "cls")
    x = b.op("Concat", [cls, tokens], "embed_cat", axis=1)
    return b.op("Add", [x, b.weight(e + "position_embedding")], "embeddings")


def _layer(b: _Builder, shape: TowerShape, x: str, index: int, scale: str) -> str:
    """One InternViT layer: x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(.))."""
    p = f"vision_model.encoder.layers.{index}."
    h = b.norm(x, p + "norm1")
    qkv = b.linear(h, p + "attn.qkv", bias=shape.qkv_bias)
    q, k, v = b.op("Split", [qkv, b.ints(shape.hidden, shape.hidden, shape.hidden)], "qkv_split", outputs=3, axis=-1)
    if shape.qk_norm:
        q = b.rms_norm(q, p + "attn.q_norm.weight", shape.eps)
        k = b.rms_norm(k, p + "attn.k_norm.weight", shape.eps)
    scores = b.op("Mul", [b.op("MatMul", [b.heads(q, [0, 2, 1, 3]), b.heads(k, [0, 2, 3, 1])], "qk"), scale], "scores")
    probs = b.from_fp32(b.op("Softmax", [b.to_fp32(scores)], "softmax", axis=-1))
    attn = b.op("Transpose", [b.op("MatMul", [probs, b.heads(v, [0, 2, 1, 3])], "attn")], "attn_t", perm=[0, 2, 1, 3])
    attn = b.linear(b.op("Reshape", [attn, b.ints(0, 0, shape.hidden)], "attn_merged"), p + "attn.proj")
    x = b.op("Add", [x, b.op("Mul", [attn, b.weight(p + "ls1")], "ls1")], "residual1")
    h = b.linear(b.gelu(b.linear(b.norm(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return b.op("Add", [x, b.op("Mul", [h, b.weight(p + "ls2")], "ls2")], "residual2")


def _projector(b: _Builder, shape: TowerShape, features: str) -> str:
    """Pixel shuffle (v1 or v2) and mlp1: [batch, patches, hidden] -> [batch, tokens, llm_hidden]."""
    r, s, c = shape.ratio, shape.side, shape.hidden
    grid = b.op("Reshape", [features, b.ints(0, s, s, c)], "grid")
    grid = b.op("Reshape", [grid, b.ints(0, s, int(s * r), int(c / r))], "shuffle_a")
    grid = b.op("Transpose", [grid], "shuffle_t", perm=[0, 2, 1, 3])
    grid = b.op("Reshape", [grid, b.ints(0, int(s * r), int(s * r), int(c / (r * r)))], "shuffle_b")
    if shape.ps_version != "v1":  # v1 keeps the token grid transposed, as the original does
        grid = b.op("Transpose", [grid], "shuffle_v2", perm=[0, 2, 1, 3])
    y = b.op("Reshape", [grid, b.ints(0, -1, shape.projector_in)], "shuffled")
    y = b.op("LayerNormalization", [y, b.weight("mlp1.0.weight"), b.weight("mlp1.0.bias")], "mlp1_norm",
             axis=-1, epsilon=PROJECTOR_EPS, stash_type=1)
    return b.linear(b.gelu(b.linear(y, "mlp1.1")), "mlp1.3")
