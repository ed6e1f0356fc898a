"""What every on-disk format module provides, as one record (`Format`), and helpers they share.

A format says how one linear layer's parameters are stored: their names (`weight`, `SCB`,
`qweight`, `weight_packed`, ...), how to count the parameters they stand for from headers
alone, how to rebuild the float weight, and which `quantization_config` loaders read. The
registry (formats/registry.py) holds one record per module of this package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import InputError
from ..models.native_map import PLAIN_FUSED

PLAIN_PARAMS = ("weight", "bias")  # a linear left unquantized keeps these in every format
LAYOUTS = ("original", "native")

# (param name, shape, quantization_config) -> parameters that tensor stands for
CountFn = Callable[[str, tuple[int, ...], dict], int]
# ({param: TensorSpec}, quantization_config, read(param) -> tensor) -> float weight shape (out, in)
ShapeFn = Callable[[Mapping[str, object], dict, Callable[[str], object]], tuple[int, int]]
# ({param: tensor} of one linear, quantization_config) -> float32 weight [out, in]
DequantizeFn = Callable[[Mapping[str, object], dict], object]


@dataclass(frozen=True)
class Format:
    """One on-disk format of a checkpoint's linear layers.

    `params`: the parameter names a quantized linear of this format may hold (a linear the
    format leaves unquantized holds plain `weight` / `bias`); `required`: those every
    quantized linear must hold; `marker`: the one whose presence makes a linear quantized.
    `check_config(quant)` raises InputError for variants this toolkit does not read;
    `count`, `weight_shape` and `dequantize` work on one linear (see the type aliases above);
    `to_native(quant, record)` rewrites an original-layout quantization_config for the native layout;
    `to_original(quant, modules)` a native one for the original layout, given {native linear
    module: original linear module} of the checkpoint (formats/rules.py `original_modules`).
    `dequantize is None` means the runtime cannot run the format yet.
    `fused(quant)`: {param: kind} of the tensors a fused linear (InternLM2's wqkv, InternViT's
    qkv) can be split into / merged from its native parts, kinds as models/native_map.py says
    ("rows", "same", "shape"); a parameter left out (packed across output rows) is refused.
    """

    name: str
    library: str
    quant_method: str | None
    params: tuple[str, ...]
    required: tuple[str, ...]
    marker: str
    matches: Callable[[dict], bool]
    check_config: Callable[[dict], None]
    count: CountFn
    weight_shape: ShapeFn | None
    dequantize: DequantizeFn | None
    to_native: Callable[..., dict]  # (quant, record=None): record is the LLM's dialect
    to_original: Callable[[dict, dict[str, str]], dict]
    fused: Callable[[dict], dict[str, str]] = lambda quant: plain_fused(quant)

    @property
    def allowed(self) -> frozenset[str]:
        """Every parameter name a linear may have in a checkpoint of this format."""
        return frozenset(self.params) | frozenset(PLAIN_PARAMS)

    @property
    def state_params(self) -> frozenset[str]:
        """Parameters of a quantized linear that the dequantized weight replaces (all but bias)."""
        return frozenset(self.params) - {"bias"}

    def expects(self) -> str:
        """The parameter names of this format, as an error message states them."""
        plain = "" if set(self.params) == set(PLAIN_PARAMS) else ", or weight, bias for a linear left unquantized"
        return ", ".join(self.params) + plain


def plain_fused(quant: dict) -> dict[str, str]:
    """A float linear's weight and bias split and merge by rows (every format's unquantized linears)."""
    return dict(PLAIN_FUSED)


def split_key(key: str) -> tuple[str, str]:
    """'a.b.qweight' -> ('a.b', 'qweight')."""
    stem, _, param = key.rpartition(".")
    return stem, param


def check_layout_name(layout: str) -> None:
    """Raise ValueError for a layout name other than "original" / "native"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def plain_count(param: str, shape: tuple[int, ...], quant: dict) -> int:
    """Every element is one parameter (a plain tensor)."""
    count = 1
    for size in shape:
        count *= size
    return count


def packed_bits(quant: dict, where: str, *, allowed: tuple[int, ...] = (2, 4, 8), field: str = "bits") -> int:
    """The `bits` of a quantization_config, checked against the widths a packer supports.

    Raises InputError naming the config field when it is missing or unsupported."""
    bits = quant.get(field)
    if bits not in allowed:
        raise InputError(f"config.json: quantization_config.{field} is {bits!r}; {where} checkpoints with "
                         f"{', '.join(map(str, allowed))} bits are supported")
    return int(bits)


def first_present(quant: dict, *names: str, default=None):
    """The value of the first of `names` present in a config dict (libraries spell fields differently)."""
    for name in names:
        if quant.get(name) is not None:
            return quant[name]
    return default


BLOCK_ELEMENTS = 1 << 18  # elements per block of rows in the 8-bit quantizers: float32 work of 1 MiB, cache-sized


def row_absmax(block):
    """max |x| of each row of a float32 [rows, cols] block, as [rows, 1] (+0 for an all-zero row,
    NaN for a row holding NaN): max(row max, -row min), two reductions without an |x| pass,
    equal to block.abs().amax(dim=1, keepdim=True)."""
    import torch

    return torch.maximum(block.amax(dim=1, keepdim=True), block.amin(dim=1, keepdim=True).neg_()).abs_()


def block_rows(shape: tuple[int, ...], row_block: int | None = None) -> int:
    """Rows per step of a blocked quantizer over a [rows, cols] weight: `row_block` when given,
    else as many rows as fit BLOCK_ELEMENTS (at least 1, at most all)."""
    rows, cols = shape
    if row_block is not None:
        return max(1, min(rows, row_block)) if rows else 1
    return max(1, min(rows, BLOCK_ELEMENTS // max(cols, 1)))
