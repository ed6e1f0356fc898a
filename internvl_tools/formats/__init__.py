"""On-disk formats of a checkpoint's linear layers, one module each: plain, bnb_int8
(bitsandbytes LLM.int8), gptq (GPTQ v1), compressed_tensors (pack-quantized), awq (gemm).

Each module provides, as data and small functions: detection from config.json, the tensor
names a linear owns, the quantization_config it writes for either layout, parameter counting
from tensor headers, and the dequantization of one linear. formats/registry.py holds the
registry (`detect`, `validate`, `check`); formats/dequantized.py shows a quantized
checkpoint as the float checkpoint it stands for. This package imports only errors, io/ and
models/ (and third-party libraries).
"""

from .base import Format
from .registry import (FORMATS, check, detect, fused_params, get_format, parameter_count, refuse_unannounced_quantization,
                       to_native, to_original, validate)

__all__ = ["FORMATS", "Format", "check", "detect", "fused_params", "get_format", "parameter_count",
           "refuse_unannounced_quantization", "to_native", "to_original",
           "validate"]
