"""What the layer-by-layer pipeline keeps between decoder layers: the activation cache and the
resume state.

`Activations` holds one hidden-state tensor per calibration sample ([1, T, hidden], float32,
T = that sample's token count): in memory while their total stays within a byte budget, in
`.pt` files beyond it, so the cache never outgrows the budget whatever the sample count.

`ResumeState` lives in OUT.partial/ (the writer's resumable folder): `.{method}_state.json`
(the run's options and how many layers are finished) and `.{method}_activations/current/`
(the inputs of the next layer). The state file is written last, so an interruption at any
point leaves either the previous consistent state or the new one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import InputError


class Activations:
    """Per-sample hidden states [1, T, D], in memory up to `budget` bytes, on disk beyond it.

    `folder` receives the spilled samples (`000007.pt`, ...); it is created on the first spill
    and belongs to this cache (`discard` removes it)."""

    def __init__(self, folder: Path, budget: int):
        self.folder, self.budget = folder, budget
        self.items: list[torch.Tensor | Path] = []
        self.in_memory = 0

    def append(self, tensor: torch.Tensor) -> None:
        """Add one sample's hidden states (any dtype/shape; kept as given, on its device)."""
        size = tensor.numel() * tensor.element_size()
        if self.in_memory + size <= self.budget:
            self.items.append(tensor)
            self.in_memory += size
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{len(self.items):06d}.pt"
            torch.save(tensor, path)
            self.items.append(path)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The samples in order (spilled ones read back one at a time)."""
        for item in self.items:
            yield torch.load(item, weights_only=True) if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self.items)

    def discard(self) -> None:
        """Drop the samples and the spill folder."""
        self.items, self.in_memory = [], 0
        shutil.rmtree(self.folder, ignore_errors=True)

    def save_all(self, folder: Path) -> None:
        """Persist every sample as `folder/NNNNNN.pt` (resume)."""
        folder.mkdir(parents=True, exist_ok=True)
        for index, tensor in enumerate(self):
            torch.save(tensor, folder / f"{index:06d}.pt")

    @classmethod
    def load_all(cls, folder: Path, budget: int) -> "Activations":
        """Read back what `save_all` wrote, spilling beyond `budget` into `folder`-spill/."""
        acts = cls(folder.with_name(folder.name + "-spill"), budget)
        for path in sorted(folder.glob("*.pt")):
            acts.append(torch.load(path, weights_only=True))
        return acts


class ResumeState:
    """The resume state of one calibrated run inside OUT.partial/.

    `method` names the files (`.gptq_state.json`, `.gptq_activations/`); `job` is the JSON-able
    description of the run (method options and calibration settings) that a resumed run must
    match exactly; `source` the input folder it was started from (recorded, compared by the
    pipeline). The state file also keeps the quantizer's statistics of the finished layers
    (`Quantizer.state()`), so a resumed run's summary counts every layer."""

    def __init__(self, partial: Path, method: str, job: dict, source: str | None = None):
        self.path = partial / f".{method}_state.json"
        self.work = partial / f".{method}_activations"
        self.job = json.loads(json.dumps(job))  # as it reads back from JSON (tuples -> lists)
        self.source = source
        self.stats: dict = {}  # the quantizer's statistics as the last load() read them

    @staticmethod
    def read(partial: Path) -> dict | None:
        """The newest state file of any method in `partial` ({"job", "layers_done", "stats", "source"}:
        the last two absent in a state from before they were recorded), None when there is none
        or it does not parse."""
        files = sorted(partial.glob(".*_state.json"), key=lambda p: p.stat().st_mtime) if partial.is_dir() else []
        for path in reversed(files):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and isinstance(state.get("job"), dict) and "layers_done" in state:
                return state
        return None

    def load(self, where: Path) -> int | None:
        """Layers finished by an interrupted run, or None when there is no state to resume; their
        statistics go to `self.stats`.

        Raises InputError (naming `where`, the partial folder) when that run used other options
        (the pipeline names the differing options before it gets here)."""
        if not self.path.exists():
            return None
        state = json.loads(self.path.read_text())
        if state["job"] != self.job:
            raise InputError(f"{where}: the interrupted run used other options; rerun it with the same options, "
                             "or drop --resume to start over")
        self.stats = state.get("stats") or {}
        return int(state["layers_done"])

    @property
    def spill(self) -> Path:
        """Where the calibration embeddings spill beyond the memory budget."""
        return self.work / "spill"

    def activations(self, budget: int) -> Activations:
        """The saved inputs of the next layer."""
        return Activations.load_all(self.work / "current", budget)

    def save(self, acts: Activations, layers_done: int, stats: dict | None = None) -> None:
        """Persist the next layer's inputs, then the number of finished layers and the quantizer's
        statistics of those layers (JSON-able; state file last)."""
        fresh = self.work / "next"
        shutil.rmtree(fresh, ignore_errors=True)
        acts.save_all(fresh)
        shutil.rmtree(self.work / "current", ignore_errors=True)
        fresh.rename(self.work / "current")
        state = {"job": self.job, "layers_done": layers_done, "stats": stats or {},
                 **({"source": self.source} if self.source else {})}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.path)

    def clear(self) -> None:
        """Remove the state and the saved activations (the run is complete)."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
