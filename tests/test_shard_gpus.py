"""`shard --gpus N` and `inspect --gpus N` end to end on tiny checkpoints."""

from __future__ import annotations

import json

import pytest

from internvl_tools.io.reader import CheckpointReader

from .conftest import ALL_FAMILIES
from .support import all_bytes

SMALL_GPUS = ["--gpu-memory", "600KB", "--reserve", "1KB", "--context", "4"]


def _gpu_of(key: str, device_map: dict) -> int:
    best = max((m for m in device_map if key == m or key.startswith(m + ".")), key=len)
    return device_map[best]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_shard_with_gpus_groups_shards_by_gpu(family, tiny, tmp_path, run_cli):
    src = tiny(family)
    out = tmp_path / "out"
    result = run_cli("shard", src, "-o", out, "--gpus", "3", *SMALL_GPUS, "--max-shard-size", "50KB", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    device_map = json.loads((out / "device_map.json").read_text())
    assert device_map == summary["gpu_plan"]["device_map"]
    assert {0, 1, 2} == set(device_map.values())
    n_layers = json.loads((src / "config.json").read_text())["llm_config"]["num_hidden_layers"]
    assert device_map[f"language_model.model.layers.{n_layers - 1}"] == 0
    with CheckpointReader(out) as reader:
        for shard in reader.shards:
            gpus = {_gpu_of(key, device_map) for key in shard.tensors}
            assert len(gpus) == 1, (shard.path.name, gpus)
        # every key is covered by the device map
        for key in reader.keys():
            _gpu_of(key, device_map)
    assert all_bytes(src) == all_bytes(out)


def test_plan_only_writes_nothing(tiny, tmp_path, run_cli):
    out = tmp_path / "never"
    result = run_cli("shard", tiny("InternVL2-40B"), "-o", out, "--gpus", "2", *SMALL_GPUS, "--plan-only")
    assert result.exit_code == 0, result.output
    assert "GPU" in result.output and "headroom" in result.output
    assert not out.exists()


def test_does_not_fit_exits_2_with_advice(tiny, tmp_path, run_cli):
    out = tmp_path / "x"
    result = run_cli("shard", tiny("InternVL2-Llama3-76B"), "-o", out, "--gpus", "2", "--gpu-memory", "380KB",
                     "--reserve", "1KB", "--context", "4")
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: the model does not fit on 2 x")
    assert "GPU 0's fixed share is too large" in last and "`quantize --method gptq --bits 4` fits on 2" in last
    assert not out.exists()


def test_does_not_fit_message_real_sizes():
    from internvl_tools.cli.gpu_plan import GpuOptions, does_not_fit_message
    from internvl_tools.planners.device_map import GIB, plan_devices

    from .support import real_sizes

    options = GpuOptions(2, 40 * GIB, 2 * GIB, 8192, 1)
    plan = plan_devices(real_sizes("InternVL2-Llama3-76B"), 2, options.gpu_bytes)
    alternatives = {m: plan_devices(real_sizes("InternVL2-Llama3-76B", m), 2, options.gpu_bytes) for m in ("int8", "int4")}
    message = does_not_fit_message(plan, options, alternatives)
    assert message.startswith("the model does not fit on 2 x 40.00 GiB: GPU")
    assert "it needs 4 GPUs of this size" in message
    assert "`quantize --method gptq --bits 4` fits on 2" in message


def test_inspect_gpus_shows_same_plan(tiny, tmp_path, run_cli):
    src = tiny("InternVL2-26B")
    report = json.loads(run_cli("inspect", src, "--gpus", "3", *SMALL_GPUS, "--json").output)
    planned = json.loads(run_cli("shard", src, "--gpus", "3", *SMALL_GPUS, "--plan-only", "--json").output)
    assert report["gpu_plan"] == planned["gpu_plan"]
    human = run_cli("inspect", src, "--gpus", "3", *SMALL_GPUS)
    assert "layout on 3 x" in human.output


def test_gpu_option_errors(tiny, run_cli):
    src = tiny("InternVL2-1B")
    assert run_cli("shard", src, "--plan-only").exit_code == 2
    assert run_cli("shard", src, "--gpus", "2").exit_code == 2  # no -o and no --plan-only
    bad = run_cli("shard", src, "--gpus", "2", "--gpu-memory", "1GiB", "--reserve", "2GiB", "--plan-only")
    assert bad.exit_code == 2 and "reserve" in bad.output


@pytest.mark.parametrize("family", ["InternVL2-Llama3-76B", "InternVL2-2B", "InternVL-Chat-V1-2", "InternVL2-4B"])
def test_resharded_with_device_map_runs_identically(family, tiny, tmp_path, run_cli):
    """The re-sharded checkpoint, loaded by the runtime with the written device map (GPU ids
    mapped to cpu), gives exactly the original's logits."""
    import torch

    from internvl_tools.runtime.model import InternVLRuntime

    from .support import sample_image

    out = tmp_path / "out"
    assert run_cli("shard", tiny(family), "-o", out, "--gpus", "3", *SMALL_GPUS).exit_code == 0
    device_map = json.loads((out / "device_map.json").read_text())
    planned = InternVLRuntime(out, device_map={k: "cpu" for k in device_map})
    original = InternVLRuntime(tiny(family))
    pixels = original.pixel_values(sample_image(4))
    ids = original.prompt_ids("Describe the image.", pixels.shape[0])
    assert torch.equal(planned.logits(ids, pixels), original.logits(ids, pixels))
    with pytest.raises(Exception, match="device map has no entry"):
        InternVLRuntime(out, device_map={k: "cpu" for k in device_map if k != "mlp1"})
