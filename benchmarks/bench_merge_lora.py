"""merge-lora side by side with the reference tool: transformers + peft.

The in-memory path users run without this toolkit (transformers from_pretrained -> peft
merge_and_unload -> save_pretrained) against `internvl-tools merge-lora` on the wide
InternVL2-40B-shaped checkpoint (true widths, 2 layers per tower; the native layout for
transformers) with a PEFT adapter of r 16 on every LLM linear: a size both can run here. Prints
cp + sync of the same weights (the yardstick, run first), then each path's seconds, the ratio
to cp and to our time, and peak RSS (GNU time). bench_streaming.py is the table of every
streamed command against cp on the 76B / 78B / MoE wide checkpoints.

Run: python benchmarks/bench_merge_lora.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, cp_weights, folder_bytes, fresh, markdown_table, run, timed, wide_checkpoint  # noqa: E402

IN_MEMORY = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="2GB")
"""


def adapter_for(checkpoint: Path, name: str, native: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    from internvl_tools.tiny.generator import make_peft_adapter

    out = WORK / name
    if not (out / "adapter_config.json").exists():
        make_peft_adapter(checkpoint, out, rank=16, alpha=32)
        if native:  # the same adapter, keyed for InternVLForConditionalGeneration
            tensors = load_file(out / "adapter_model.safetensors")
            renamed = {k.replace("base_model.model.model.layers.", "base_model.model.model.language_model.layers."): v
                       for k, v in tensors.items()}
            save_file(renamed, str(out / "adapter_model.safetensors"))
    return out


def main() -> None:
    import datetime
    import os

    rows = []
    mid = wide_checkpoint("InternVL2-40B")
    native = WORK / "40b-wide-hf"
    if not (native / "config.json").exists():
        run([sys.executable, "-m", "internvl_tools", "convert", str(mid), "-o", str(native), "--max-shard-size", "2GB"])
    ours_adapter, their_adapter = adapter_for(mid, "adapter-40b-r16"), adapter_for(mid, "adapter-40b-r16-native", native=True)
    out, copy = WORK / "merge-out", WORK / "merge-cp"
    load = os.getloadavg()[0]
    cp_seconds, _ = timed(cp_weights(mid, fresh(copy)))
    fresh(copy)
    ours_s, ours_rss = timed([sys.executable, "-m", "internvl_tools", "merge-lora", str(mid), "--adapter", str(ours_adapter),
                              "-o", str(fresh(out)), "--json"])
    fresh(out)
    theirs_s, theirs_rss = timed([sys.executable, "-c", IN_MEMORY, str(native), str(their_adapter), str(fresh(out))])
    fresh(out)
    total = folder_bytes(mid)
    rows.append(["cp + sync (yardstick)", f"{total / GIB:.2f}", f"{cp_seconds:.1f}", "1.00x", "-", "-"])
    rows.append(["internvl-tools merge-lora (streamed)", f"{total / GIB:.2f}", f"{ours_s:.1f}", f"{cp_seconds / ours_s:.2f}x",
                 "1.00x", f"{ours_rss / GIB:.2f}"])
    rows.append(["transformers + peft merge_and_unload + save_pretrained", f"{total / GIB:.2f}", f"{theirs_s:.1f}",
                 f"{cp_seconds / theirs_s:.2f}x", f"{theirs_s / ours_s:.2f}x", f"{theirs_rss / GIB:.2f} ({theirs_rss / ours_rss:.1f}x ours)"])
    print(f"bench_merge_lora.py, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; nproc {os.cpu_count()}; "
          f"1-minute load before {load:.2f}, after {os.getloadavg()[0]:.2f}; InternVL2-40B-wide, PEFT r 16 on every LLM linear")
    print(markdown_table(["path", "GiB", "seconds", "vs cp", "time vs ours", "peak RSS GiB"], rows))
    shutil.rmtree(native, ignore_errors=True)


if __name__ == "__main__":
    main()
