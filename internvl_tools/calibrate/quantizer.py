"""The interface between the layer-by-layer calibrated pipeline and a quantization method.

The pipeline (calibrate/pipeline.py) owns everything that is not the method: the calibration
embeddings, building each decoder layer alone from the stream, the activation cache, hooks,
writing tensors, resume. A method (GPTQ in calibrate/gptq_quantizer.py; AWQ next) implements
`Quantizer` and sees one decoder layer at a time:

    for each decoder layer (float32, built alone from the checkpoint):
        apply(quantizer.prepare_layer(layer))               # optional, e.g. AWQ scale search + folds
        for each input group of the dialect (models/dialects.py InputGroup, execution order):
            for each cached sample: quantizer.observe(group, input of group.hook)  # [1, T, in]
            apply(quantizer.quantize_group(GroupWork(layer, group)))
        check every planned tensor of the layer was written; run the samples through the
        (now quantized) layer -> the next layer's inputs; save the resume state

where apply(updates) takes the (module, ModuleUpdate) pairs as they come: it writes each
update's tensors (a tensor written twice is an error) and puts its weight into the layer, so
later groups see the quantized outputs (true-sequential) and no two dequantized copies of a
big linear need to be alive at once.

Module names are those of the original (remote-code) layout inside a decoder layer, e.g.
"self_attn.q_proj" or "attention.wqkv"; the pipeline maps them to the native modules it runs
(fused InternLM2 `wqkv` split into q/k/v) and to checkpoint keys
("language_model.model.layers.{index}.{module}.{suffix}").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..io.safetensors_format import TensorSpec
from ..models.dialects import Dialect, InputGroup
from ..models.layout import KeyInfo, Layout


class ModuleUpdate(NamedTuple):
    """What a quantizer did to one module of a decoder layer.

    `tensors`: suffix -> tensor, written as "<module key>.<suffix>" (e.g. "qweight", "scales"; a
    rescaled norm writes "weight"); every name must be one `Quantizer.output_specs` planned.
    `weight`: the float32 weight (same shape as the module's original-layout weight, e.g. [out, in]
    for a linear) the layer computes with from now on (for a quantized linear, its dequantized
    weight), or None to leave the layer's module as it is."""

    tensors: dict[str, torch.Tensor]
    weight: torch.Tensor | None
    bias: torch.Tensor | None = None  # a new float32 bias [out] for the layer's module (AWQ folds into a biased v_proj)


@dataclass(frozen=True)
class LayerWork:
    """One decoder layer as a quantizer sees it (built and driven by the pipeline).

    index: the layer number. dialect: the LLM's dialect record (linears, groups, norms).
    weight(module): the module's current float32 weight, original layout ([out, in] for a linear,
        fused tensors merged); read-only (it may share storage with the layer), change it with
        set_weight. KeyError for a module the layer does not have.
    set_weight(module, tensor): put a float32 weight (original layout) into the layer.
    inputs(hook): for each cached sample, the input of the native module `hook`
        (e.g. "self_attn.q_proj"; InputGroup.hook) under the layer's current weights: float32
        [1, T, in] on `device`, recomputed lazily (nothing cached; one sample at a time).
    outputs(): for each cached sample, the layer's output [1, T, hidden] under its current
        weights (float32, on `device`): the forward a method reruns to measure an error.
    log: one line of progress or a warning (a warning starts with "warning: ").
    device: where the layer and its inputs live ("cpu", "cuda").
    bias(module): the module's current float32 bias [out], or None when it has none.
    sparse: a sparse layer's routing (calibrate/experts.SparseBlock: the experts record, their
        settings and activation, the activation budget); None for a dense layer.
    """

    index: int
    dialect: Dialect
    weight: Callable[[str], torch.Tensor]
    set_weight: Callable[[str, torch.Tensor], None]
    inputs: Callable[[str], Iterator[torch.Tensor]]
    outputs: Callable[[], Iterator[torch.Tensor]]
    log: Callable[[str], None]
    device: str = "cpu"
    bias: Callable[[str], torch.Tensor | None] = lambda _module: None
    sparse: object | None = None  # an experts.SparseBlock (not imported: experts builds on this module)


@dataclass(frozen=True)
class GroupWork:
    """One input group of a layer: `group.linears` (original names, execution order) read the
    input of native module `group.hook`, produced by module `group.after` (None: no exact fold).

    For one routed expert of a sparse layer (calibrate/experts.py) `tokens` is the number of
    calibration tokens routed to it (0: it saw none, and nothing was observed) out of
    `calibration_tokens` in all; both None for a dense group."""

    layer: LayerWork
    group: InputGroup
    tokens: int | None = None
    calibration_tokens: int | None = None

    def inputs(self) -> Iterator[torch.Tensor]:
        """The group's input per cached sample, float32 [1, T, in] (see LayerWork.inputs)."""
        return self.layer.inputs(self.group.hook)


class Quantizer(ABC):
    """A calibrated quantization method plugged into calibrate.pipeline.quantize_calibrated.

    A quantizer holds at most one layer's worth of statistics at a time (e.g. one Hessian per
    input group for GPTQ); the pipeline holds the layer and the activations."""

    name: str = "quantizer"  # names the resume files (.{name}_state.json) and the log lines
    # whether the method calibrates a sparse layer's experts (their groups come interleaved: several groups observed
    # before the first is quantized, and an expert that no token reached is quantized having observed nothing)
    supports_experts: bool = False

    @abstractmethod
    def options(self) -> dict:
        """The method's settings as a JSON-able dict: a resumed run must match them exactly."""

    @abstractmethod
    def output_specs(self, spec: TensorSpec, info: KeyInfo) -> list[TensorSpec] | None:
        """The tensors that replace decoder-layer key `spec.name` in the output, or None to copy
        it unchanged. Called once per decoder-layer key before any work, so the writer can plan
        the shards; raise InputError when the method cannot handle the tensor (e.g. a width
        that does not pack)."""

    @abstractmethod
    def quantization_config(self, layout: Layout) -> dict | None:
        """The top-level `quantization_config` for the output's config.json (None: the output
        holds plain weights and gets none)."""

    def prepare_layer(self, work: LayerWork) -> Iterable[tuple[str, ModuleUpdate]]:
        """Called once per layer before its groups, with the layer still in float32: the place
        for changes across groups (AWQ: search each group's input scales on the layer's forward,
        fold 1/s into `after` and s into the group's linears, here as ModuleUpdate({}, weight) for a
        linear quantized later and ModuleUpdate({"weight": w}, w) for a rescaled norm).
        Returns (module, update) pairs like `quantize_group`; none by default."""
        return ()

    @abstractmethod
    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        """One sample's input to `group`: float32 [1, T, in] on the layer's device, in
        sample order; the tensor must not be kept beyond what the method needs (statistics)."""

    @abstractmethod
    def quantize_group(self, work: GroupWork) -> Iterable[tuple[str, ModuleUpdate]]:
        """Quantize `work.group.linears` after every sample was observed: (module, update) pairs
        (a generator, so each is applied before the next is made, or e.g. `dict.items()`).

        Must give each linear of the group an update with its planned tensors. Errors that one
        linear can survive (a failing factorization) are handled here, with a warning through
        `work.layer.log` that names the linear, never raised."""

    def summary(self) -> dict:
        """JSON-able facts about the finished run (e.g. linears that fell back to round-to-nearest)."""
        return {}

    # attributes whose values are the statistics behind summary(), and a dict of expert-name sets
    # ("layer N mlp.experts.E" per kind), that state() / restore() carry across a resumed run
    _STATE: tuple[str, ...] = ()
    _experts: dict[str, set[str]] = {}

    def state(self) -> dict:
        """The statistics behind `summary()` so far (the `_STATE` attributes and the expert sets),
        JSON-able and exact (floats round-trip through JSON): the pipeline saves them with each
        finished layer, so a resumed run's summary counts the layers of the interrupted one too."""
        return {**{name: getattr(self, name) for name in self._STATE},
                "_experts": {kind: sorted(names) for kind, names in self._experts.items()}}

    def restore(self, state: dict) -> None:
        """Take back what `state()` returned (a resumed run, before its first layer); {} from a
        partial that recorded none."""
        for name in self._STATE:
            if name in state:
                setattr(self, name, state[name])
        self._experts = {**self._experts, **{kind: set(names) for kind, names in state.get("_experts", {}).items()}}

