"""merge-lora benchmarks.

1. Wide InternVL2-Llama3-76B-shaped checkpoint + a PEFT adapter with r=16 on every LLM linear:
   `merge-lora` time vs cp + sync of the same bytes, and peak RSS.
2. Side by side with the in-memory path users run today (transformers from_pretrained ->
   peft merge_and_unload -> save_pretrained) on the wide InternVL2-40B-shaped checkpoint in the
   native layout, a size both can run here: time and peak-RSS ratios.

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
    rows = []
    src = wide_checkpoint()
    adapter = adapter_for(src, "adapter-76b-r16")
    total = folder_bytes(src)
    out, copy = WORK / "merge-out", WORK / "merge-cp"
    cp_seconds, _ = timed(cp_weights(src, fresh(copy)))
    fresh(copy)
    seconds, rss = timed([sys.executable, "-m", "internvl_tools", "merge-lora", str(src), "--adapter", str(adapter),
                          "-o", str(fresh(out)), "--json"])
    fresh(out)
    rows.append(["76B-wide, r=16 on every LLM linear", "merge-lora (streamed)", f"{total / GIB:.2f}", f"{seconds:.1f}",
                 f"{cp_seconds / seconds:.2f}x cp", f"{rss / GIB:.2f}"])

    mid = wide_checkpoint("InternVL2-40B")
    native = WORK / "40b-wide-hf"
    if not (native / "config.json").exists():
        run([sys.executable, "-m", "internvl_tools", "convert", str(mid), "-o", str(native), "--max-shard-size", "2GB"])
    ours_adapter, their_adapter = adapter_for(mid, "adapter-40b-r16"), adapter_for(mid, "adapter-40b-r16-native", native=True)
    ours_s, ours_rss = timed([sys.executable, "-m", "internvl_tools", "merge-lora", str(mid), "--adapter", str(ours_adapter),
                              "-o", str(fresh(out)), "--json"])
    fresh(out)
    theirs_s, theirs_rss = timed([sys.executable, "-c", IN_MEMORY, str(native), str(their_adapter), str(fresh(out))])
    fresh(out)
    mid_total = folder_bytes(mid)
    rows.append(["40B-wide, r=16", "merge-lora (streamed)", f"{mid_total / GIB:.2f}", f"{ours_s:.1f}", "1.00", f"{ours_rss / GIB:.2f}"])
    rows.append(["40B-wide, r=16", "transformers + peft merge_and_unload + save_pretrained", f"{mid_total / GIB:.2f}",
                 f"{theirs_s:.1f}", f"{theirs_s / ours_s:.2f}x our time", f"{theirs_rss / GIB:.2f} ({theirs_rss / ours_rss:.1f}x our RSS)"])
    print(f"cp + sync of the 76B-wide weights: {cp_seconds:.1f} s")
    print(markdown_table(["checkpoint", "path", "GiB", "seconds", "ratio", "peak RSS GiB"], rows))
    shutil.rmtree(native, ignore_errors=True)


if __name__ == "__main__":
    main()
