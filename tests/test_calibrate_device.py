"""`quantize --method gptq|awq --device D`: every part of the calibrated pipeline runs on D,
tested without a GPU.

The pipeline is run with device "cpu:0": a real device that is not the string "cpu", so every
"other device" code path runs (the runtime's device map for the vision tower, the decoder
layer's `.to(device)`, the samples moved in front of each forward), while a TorchFunctionMode
records every tensor that is explicitly moved there. Before the fix, the vision tower and
mlp1 that build the calibration inputs stayed on the CPU whatever --device said.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from internvl_tools.calibrate import pipeline
from internvl_tools.calibrate.awq import AWQConfig
from internvl_tools.calibrate.awq_quantizer import AWQQuantizer, llm_facts
from internvl_tools.calibrate.gptq import GPTQConfig
from internvl_tools.calibrate.gptq_quantizer import GPTQQuantizer
from internvl_tools.calibrate.pipeline import CalibrationJob, quantize_calibrated
from internvl_tools.runtime.model import InternVLRuntime

from .support import all_tensors

FAKE = torch.device("cpu:0")


def _target(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a Tensor.to call names explicitly (None for a dtype-only or tensor-like call)."""
    found = kwargs.get("device")
    for arg in args:
        if isinstance(arg, (str, torch.device)):
            found = arg
    return None if found is None else torch.device(found)


class DeviceLog(TorchFunctionMode):
    """Shapes of the tensors moved to FAKE with Tensor.to (Module.to goes through it) or made
    there by a factory (torch.empty(..., device=D): how a split fused weight is placed), by phase."""

    def __init__(self):
        super().__init__()
        self.phase = "other"
        self.moved: dict[str, Counter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moved = func is torch.Tensor.to and _target(args[1:], kwargs) == FAKE
        made = func is not torch.Tensor.to and kwargs.get("device") is not None and torch.device(kwargs["device"]) == FAKE
        result = func(*args, **kwargs)
        if moved or made:
            self.moved.setdefault(self.phase, Counter())[tuple(result.shape)] += 1
        return result


def _run(checkpoint, out, quantizer, device, monkeypatch) -> DeviceLog:
    log = DeviceLog()
    embeddings = pipeline.calibration_embeddings

    def traced_embeddings(*args, **kwargs):
        log.phase = "embeddings"
        try:
            return embeddings(*args, **kwargs)
        finally:
            log.phase = "layers"

    monkeypatch.setattr(pipeline, "calibration_embeddings", traced_embeddings)
    with log:
        quantize_calibrated(checkpoint, out, quantizer, CalibrationJob(num_samples=2, seq_len=48, device=device),
                            max_shard_size=10**9)
    return log


def _shapes(*modules: torch.nn.Module) -> Counter:
    """The parameter shapes of modules as the runtime builds them (fused weights split)."""
    return Counter(tuple(p.shape) for module in modules for p in module.parameters())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_runs_on_the_requested_device(method, tiny, tmp_path, monkeypatch):
    checkpoint = tiny("InternVL2-1B")
    if method == "gptq":
        make = lambda: GPTQQuantizer(GPTQConfig(4, 32))  # noqa: E731
    else:
        dialect, head_dim = llm_facts(checkpoint)
        make = lambda: AWQQuantizer(AWQConfig(bits=4, group_size=32), dialect, "awq", head_dim)  # noqa: E731
    log = _run(checkpoint, tmp_path / "dev", make(), "cpu:0", monkeypatch)
    # the vision tower and mlp1 that make the calibration inputs: every weight on the device
    vision = InternVLRuntime(checkpoint, load_llm=False)
    tower = _shapes(vision.vision, vision.projector)
    embeddings = log.moved.get("embeddings", Counter())
    assert not tower - embeddings, f"vision/mlp1 tensors left off the device: {tower - embeddings}"
    assert any(len(s) == 4 and s[1] == 3 for s in embeddings), "the pixel tiles never reached the device"
    # the decoder layers: every weight, and the cached samples before each forward [1, T, hidden]
    layers = _shapes(*InternVLRuntime(checkpoint, load_vision=False).llm.model.layers)
    moved = log.moved.get("layers", Counter())
    assert not layers - moved, f"decoder-layer tensors left off the device: {layers - moved}"
    assert any(len(s) == 3 and s[0] == 1 for s in moved), "the calibration samples never reached the device"
    # the same job on "cpu" moves nothing to it, and the device path gives the identical output
    assert not _run(checkpoint, tmp_path / "cpu", make(), "cpu", monkeypatch).moved
    dev, cpu = all_tensors(tmp_path / "dev"), all_tensors(tmp_path / "cpu")
    assert dev.keys() == cpu.keys() and all(torch.equal(dev[k], cpu[k]) for k in cpu)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_cli_device_reaches_the_job(method, tiny, tmp_path, monkeypatch, run_cli):
    """quantize --device cuda hands "cuda" to the pipeline (CUDA faked present; the run stops there)."""
    from internvl_tools.calibrate import awq_quantizer, gptq_quantizer

    class Reached(Exception):
        pass

    def capture(source, out, quantizer, job, **_kwargs):
        raise Reached(job.device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gptq_quantizer if method == "gptq" else awq_quantizer, "quantize_calibrated", capture)
    with pytest.raises(Reached) as reached:
        run_cli("quantize", tiny("InternVL2-1B"), "-o", tmp_path / "q", "--method", method, "--device", "cuda",
                "--num-samples", 2, "--seq-len", 32, "--group-size", 32)
    assert reached.value.args == ("cuda",)
