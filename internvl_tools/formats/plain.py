"""Plain (unquantized) checkpoints: every linear is a float `weight` [out, in] and optional `bias`.

What transformers' `save_pretrained` and InternVL's own releases write; config.json has no
`quantization_config`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import PLAIN_PARAMS, Format, plain_count

PARAMS = PLAIN_PARAMS


def matches(quant: dict) -> bool:
    """True for a checkpoint without quantization_config (an empty dict)."""
    return not quant


def check_config(quant: dict) -> None:
    """Nothing to check: a plain checkpoint has no quantization_config."""


def weight_shape(specs: Mapping[str, object], quant: dict, read=None) -> tuple[int, int]:
    """(out, in) of a plain linear: the shape of its `weight` spec."""
    return tuple(specs["weight"].shape)


def dequantize(tensors: Mapping[str, object], quant: dict):
    """The `weight` tensor itself, as float32 [out, in]."""
    return tensors["weight"].float()


def quantization_config(layout: str = "original") -> None:
    """A plain checkpoint writes no quantization_config (None, for either layout)."""
    return None


def to_native(quant: dict, record=None) -> dict:
    """Nothing to translate: returns the (empty) config unchanged."""
    return quant


def to_original(quant: dict, modules: dict[str, str]) -> dict:
    """Nothing to translate: returns the (empty) config unchanged."""
    return quant


FORMAT = Format(
    name="plain", library="transformers / safetensors", quant_method=None, params=PARAMS, required=("weight",),
    marker="weight", matches=matches, check_config=check_config, count=plain_count, weight_shape=weight_shape,
    dequantize=dequantize, to_native=to_native, to_original=to_original,
)
