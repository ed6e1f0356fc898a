"""The whole InternViT-6B-448px-V1-5 (45 layers, 76B's mlp1) exported AND checked on this machine.

Builds a checkpoint with InternVL2-Llama3-76B's true vision tower (45 layers of 3200 wide,
random weights) and one LLM layer, then runs `export --dtype fp16` twice in fresh processes:
without the check (time and peak RSS of the export alone) and with the automatic check, which
on a 24 GiB machine runs in segments (the whole-tower check would hold about 52 GiB).

Run: python benchmarks/bench_export_full_tower.py   (about 17 GiB of disk, ~30 min on 2 cores)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, WORK, folder_bytes, fresh, markdown_table, timed  # noqa: E402

FAMILY = "InternVL2-Llama3-76B"


def main() -> None:
    from internvl_tools.models.families import FAMILIES
    from internvl_tools.tiny.generator import make_checkpoint

    layers = FAMILIES[FAMILY].vision.num_hidden_layers
    checkpoint = WORK / f"{FAMILY}-vision{layers}"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(FAMILY, checkpoint, wide=True, vision_layers=layers, llm_layers=1, shards=8, overwrite=True)
    out = WORK / "export-full-tower"
    rows = []
    for label, extra in (("export --dtype fp16 --no-check", ["--no-check"]), ("export --dtype fp16 (automatic check)", [])):
        seconds, rss = timed([sys.executable, "-m", "internvl_tools", "export", str(checkpoint), "-o", str(fresh(out)),
                              "--dtype", "fp16", "--max-batch", "13", "--json", *extra])
        meta = json.loads((out / "export.json").read_text())
        parity = meta["parity"]
        if isinstance(parity, dict):
            check = parity["skipped"]
        else:
            check = "; ".join(f"batch {r['batch']}: {r['relative_error']:.1e} ({r.get('mode', 'whole')}, worst {r.get('worst_segment', '-')}) "
                              f"{'pass' if r['passed'] else 'FAIL'}" for r in parity)
        rows.append([label, f"{folder_bytes(out, '.data') / GIB:.2f}", f"{seconds:.0f}", f"{rss / GIB:.2f}", check])
    fresh(out)
    print(f"InternViT-6B-448px-V1-5 ({layers} layers) + mlp1 of {FAMILY}: {meta['params'] / 1e9:.2f}B parameters")
    print(markdown_table(["run", "GiB written", "seconds", "peak RSS GiB", "parity"], rows))


if __name__ == "__main__":
    main()
