"""Checkpoint views that know the on-disk format: models.views.open_view with the format's rules
for merging a fused linear's quantized tensors (models/native_map.py), so a native-layout
InternLM2 quantized in int8 is read as the InternLM2 it stands for (wqkv rebuilt row by row from
q/k/v_proj, with their SCB / scales / shapes), and a format packed across output rows is
refused with a one-line error. Every command opens checkpoints through this `open_view`.
"""

from __future__ import annotations

import os

from ..models.views import open_view as _open_view
from .registry import fused_params, refuse_unannounced_quantization


def open_view(folder: str | os.PathLike[str], *, native_dialect: bool = False):
    """The checkpoint at `folder` in original key names (models.views.open_view), fused
    quantized tensors merged as its format allows. Raises CheckpointError / LayoutError /
    InputError (one line), LayoutError for quantized tensors whose config.json has no
    quantization_config (registry.refuse_unannounced_quantization)."""
    view = _open_view(folder, native_dialect=native_dialect, fused=fused_params)
    try:
        refuse_unannounced_quantization(getattr(view, "reader", view).keys(), view.config())
    except BaseException:
        view.close()
        raise
    return view
