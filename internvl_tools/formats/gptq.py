"""The GPTQ v1 checkpoint format (AutoGPTQ / GPTQModel `checkpoint_format: gptq`).

Per quantized linear [out, in]: `qweight` int32 [in x bits / 32, out] (consecutive input rows
packed from the low bits up), `qzeros` int32 [groups, out x bits / 32] holding zero - 1 (the
v1 quirk) packed along the output axis, `scales` fp16 [groups, out], `g_idx` int32 [in].
"""

from __future__ import annotations

import torch

from ..calibrate.gptq import GPTQResult


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] unsigned codes -> int32 [n * bits / 32, m], row k*per + j in bits j*bits.."""
    per = 32 // bits
    if values.shape[0] % per:
        raise ValueError(f"{values.shape[0]} rows do not pack into 32-bit words of {per}")
    v = values.to(torch.int64).reshape(-1, per, values.shape[1])
    packed = torch.zeros(v.shape[0], v.shape[2], dtype=torch.int64)
    for j in range(per):
        packed |= (v[:, j] & (2**bits - 1)) << (bits * j)
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [(p >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return torch.stack(parts, dim=1).reshape(-1, packed.shape[1])


def pack(result: GPTQResult, bits: int) -> dict[str, torch.Tensor]:
    """GPTQResult -> {qweight, qzeros, scales, g_idx} tensors."""
    return {
        "qweight": _pack_rows(result.q.T.contiguous(), bits),
        "qzeros": _pack_rows((result.zeros - 1).T.contiguous(), bits).T.contiguous(),
        "scales": result.scales.to(torch.float16),
        "g_idx": result.g_idx.to(torch.int32),
    }


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 weight [out, in] a GPTQ v1 linear stands for."""
    q = _unpack_rows(qweight, bits)  # [in, out]
    zeros = _unpack_rows(qzeros.T.contiguous(), bits).T + 1  # [groups, out]
    g = g_idx.long()
    return ((q - zeros[g]).float() * scales.float()[g]).T.contiguous()


def packed_shapes(rows: int, cols: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of the packed tensors of a [rows, cols] linear."""
    groups = -(-cols // (group_size if group_size > 0 else cols))
    return {
        "qweight": ((cols * bits // 32, rows), "I32"),
        "qzeros": ((groups, rows * bits // 32), "I32"),
        "scales": ((groups, rows), "F16"),
        "g_idx": ((cols,), "I32"),
    }


def gptq_quantization_config(config: GPTQConfig, layout_name: str = "original") -> dict:
    """quantization_config for transformers (optimum/gptqmodel) and vLLM: vision and mlp1 stay as they are."""
    if layout_name == "native":
        block, skip = "model.language_model.layers", ["-:.*vision_tower.*", "-:.*multi_modal_projector.*"]
    else:
        block, skip = "language_model.model.layers", ["-:.*vision_model.*", "-:.*mlp1.*"]
    return {
        "quant_method": "gptq", "bits": config.bits, "group_size": config.group_size, "desc_act": config.desc_act,
        "sym": config.sym, "damp_percent": config.damp, "true_sequential": True, "static_groups": False,
        "checkpoint_format": "gptq", "block_name_to_quantize": block, "lm_head": False,
        "dynamic": {rule: {} for rule in skip},
        "meta": {"quantizer": ["internvl-tools"]},
    }
