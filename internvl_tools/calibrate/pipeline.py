"""Layer-by-layer calibrated quantization straight from the checkpoint stream, for any method
that implements calibrate.quantizer.Quantizer (GPTQ: calibrate/gptq_quantizer.py).

1. Calibration: image + text samples go through the vision tower and mlp1 (never quantized;
   on the job's device) and are spliced into the LLM's input embeddings as the model does;
   text-only samples too.
2. For each decoder layer: build it alone from the stream (in the job's forward dtype, bf16 or
   float32: `forward_dtype`; SDPA causal attention; moved to the job's device: the layer's
   forwards, the quantizer's statistics and its math run there; the statistics and the
   quantizer's math are float32 whatever the forward dtype), let the quantizer prepare
   it, then for each input group of the dialect's record (models/dialects.py: linears in
   execution order, the native module whose input they share, the module that produces it)
   run the cached samples up to that module with a forward pre-hook that hands each input to
   the quantizer, let it quantize the group, write the tensors it returns and put their
   weights into the layer (fused tensors split as native_map's links say), so each group
   sees the outputs of the already-quantized ones. Then run the samples through the quantized
   layer to get the next layer's inputs. Activations live in memory up to a budget and on
   disk beyond it (calibrate/activations.py).
3. Everything else is copied byte for byte; config.json gets the quantizer's top-level
   quantization_config (none for a method whose output stays plain weights).

Peak memory: one decoder layer in the forward dtype, what the quantizer keeps for one group (GPTQ: one
Hessian), and the activations in memory. With `resume`, OUT.partial/ keeps the finished layers
and the activations after each layer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..io.reader import CheckpointReader
from ..formats import refuse_unannounced_quantization, to_native
from ..models.native_map import SIDECAR
from ..models.views import LayoutWriter, open_view
from ..transforms.stream import fix_lora_flags
from ..io.safetensors_format import TensorSpec
from ..io.writer import CheckpointWriter, write_file
from ..models.dialects import Dialect, Experts
from ..models.layout import Layout, build_layout
from ..models.native_map import Link, links
from ..models.templates import IMG_CONTEXT, IMG_END
from ..models.vision import NATIVE_LLM_PREFIX
from ..runtime.build import build_decoder_layer
from .activations import Activations, ResumeState
from .experts import SparseBlock, quantize_experts
from .quantizer import GroupWork, LayerWork, ModuleUpdate, Quantizer
from .samples import ROWS_FILE, Sample, builtin_samples, calibration_record, load_calibration
from .window import Window, fit_samples


@dataclass(frozen=True)
class CalibrationJob:
    """The calibration settings of a run (a resumed run must match them): samples (`calib`, a
    folder of *.jsonl, or the built-in set drawn with `seed`), tokens per sample at most,
    bytes of activations kept in memory, where layers run ("cpu" or "cuda") and in which dtype
    the decoder layers' forwards run (`forward_dtype`: "bf16", "fp32" or "auto", see forward_dtype)."""

    num_samples: int = 128
    seq_len: int = 2048
    calib: str | None = None
    seed: int = 0
    memory_budget: int = 2 * 2**30
    device: str = "cpu"
    forward_dtype: str = "auto"


@dataclass(frozen=True)
class QuantizeJob:
    """Everything that defines a calibrated run (a resumed run must match it): the method's
    scheme (`config`), the output format, and the calibration settings (CalibrationJob's fields).
    GPTQJob and AWQJob narrow `config` and give `fmt` its default."""

    config: object
    fmt: str
    num_samples: int = 128
    seq_len: int = 2048
    calib: str | None = None
    seed: int = 0
    memory_budget: int = 2 * 2**30  # bytes of activations kept in memory
    device: str = "cpu"
    forward_dtype: str = "auto"

    def calibration(self) -> CalibrationJob:
        """The calibration part of the job."""
        fields = asdict(self)
        fields.pop("config")
        fields.pop("fmt")
        return CalibrationJob(**fields)


@functools.lru_cache(maxsize=None)  # asked once per decoder layer; the answer does not change within a run
def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 matrix products natively: a CUDA device of compute capability
    >= 8.0, or a CPU whose flags (Linux /proc/cpuinfo) list avx512_bf16 or amx_bf16, the
    instructions oneDNN's bf16 GEMM uses; elsewhere bf16 is emulated and slower than float32."""
    if torch.device(device).type == "cuda":  # is_bf16_supported() alone also says True where bf16 is emulated (< 8.0)
        return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def forward_dtype(name: str, device: str) -> torch.dtype:
    """The dtype the decoder layers' calibration forwards run in: "bf16", "fp32", or "auto" = bf16
    where `device` computes it natively (native_bf16), float32 elsewhere. bf16 is what GPTQModel,
    llm-compressor and AutoAWQ calibrate in (the checkpoint's dtype); the Hessians, input statistics
    and the quantizers' math stay float32 either way. ValueError for another name."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"forward dtype {name!r}: bf16, fp32 or auto")
    return dtypes[name]


def fit_window(reader: CheckpointReader, config: dict, samples: list[Sample], seq_len: int, count: int | None = None) -> Window:
    """The samples fitted into `seq_len` tokens with the checkpoint's tokenizer and tiling
    (calibrate/window.py: the system prompt left out when it takes more than half, images tiled
    smaller rather than split, the end cut), the first `count` that keep content. InputError when
    no sample keeps any content. Reads the tokenizer and config only (no weights)."""
    from ..runtime.model import InternVLRuntime

    runtime = InternVLRuntime(reader.folder, dtype=None, load_llm=False, load_vision=False)
    tokenizer = runtime.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(IMG_END)
    return fit_samples(samples, seq_len, config.get("template"), lambda text: tokenizer(text).input_ids, runtime.tokens_per_tile,
                       runtime.config, tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
                       end_id if isinstance(end_id, int) and end_id != tokenizer.unk_token_id else None, count)


def calibration_embeddings(reader: CheckpointReader, config: dict, layout: Layout, window: Window, budget: int, work: Path,
                           log: Callable[[str], None] = lambda _m: None, device: str = "cpu") -> Activations:
    """Input embeddings of every fitted sample (`window`: fit_window), float32 [1, T, hidden] on the
    CPU with T <= the window's seq_len, image features spliced in at the IMG_CONTEXT tokens (every
    image whole: the window never splits one); spilled into `work` beyond `budget` bytes.

    The runtime's vision part (InternViT + pixel shuffle + mlp1, never quantized; float32, run on
    `device`, the job's "cpu" or "cuda") makes the image features, each image tiled as the window
    chose (its max_dynamic_patch); the LLM is not built, only its embedding table read (on the CPU)."""
    from ..runtime.model import InternVLRuntime
    from ..runtime.preprocess import pixel_values

    vision = InternVLRuntime(reader.folder, dtype=torch.float32, load_llm=False, device=device)
    embed_key = next(k for k, i in layout.keys.items() if i.family == "llm" and i.part == "embeddings")
    table = reader.get(embed_key).float()
    context_id = vision.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    acts = Activations(work, budget)
    for number, fitted in enumerate(window.used, 1):
        ids = torch.tensor([fitted.ids], dtype=torch.long)
        embeds = table[ids]
        if fitted.tiles:
            low = vision.config.get("min_dynamic_patch", 1)
            tiles = pixel_values(fitted.sample.image, dict(vision.config, max_dynamic_patch=fitted.max_tiles,
                                                           min_dynamic_patch=min(low, fitted.max_tiles)))
            features = vision.image_features(tiles).reshape(-1, table.shape[1]).cpu()
            mask = ids[0] == context_id
            if tiles.shape[0] != fitted.tiles or int(mask.sum()) != features.shape[0]:
                raise RuntimeError(f"calibration sample {number}: {int(mask.sum())} image tokens in the window, "
                                   f"{features.shape[0]} image features ({tiles.shape[0]} tiles, {fitted.tiles} planned)")
            embeds[0, mask] = features
        acts.append(embeds)
        log(f"calibration {number}/{len(window.used)} samples")
    del vision
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the tower's memory goes back before the decoder layers are built
    return acts


def output_plan(reader: CheckpointReader, layout: Layout, quantizer: Quantizer) -> tuple[list[TensorSpec], dict[int, list[str]]]:
    """The output's tensor specs (decoder-layer keys as the quantizer replaces them, the rest as
    they are) and, per layer, the names the quantizer writes. InputError from the quantizer."""
    from .outputs import check_group_size

    specs: list[TensorSpec] = []
    per_layer: dict[int, list[str]] = {}
    group_size = getattr(getattr(quantizer, "config", None), "group_size", 0)
    widths = {name: reader.spec(name).shape[-1] for name, info in layout.keys.items()
              if info.family == "llm" and info.part == "layer" and info.is_linear and info.param == "weight"
              and len(reader.spec(name).shape) == 2}
    check_group_size(widths, group_size, what="AWQ" if "awq" in type(quantizer).__module__ else "GPTQ")
    for name, info in layout.keys.items():
        spec = reader.spec(name)
        replaced = quantizer.output_specs(spec, info) if info.family == "llm" and info.part == "layer" else None
        if replaced is None:
            specs.append(spec)
        else:
            specs.extend(replaced)
            per_layer.setdefault(info.layer, []).extend(s.name for s in replaced)
    return specs, per_layer


class _Captured(Exception):
    """Ends a forward at a pre-hook once the wanted input is seen."""


class DecoderLayer:
    """One decoder layer under calibration: the native module (forward dtype, on `device`), its rotary
    embedding, the cached samples, and the original-layout view of its modules.

    `stems` maps an original module name ("attention.wqkv") to its key stem
    ("language_model.model.layers.3.attention.wqkv"); `layer_links` maps an original key to
    its native_map Link (native names, split and merge). KeyError for a module the layer lacks."""

    def __init__(self, index: int, module: torch.nn.Module, rotary: torch.nn.Module, acts: Activations,
                 stems: dict[str, str], layer_links: dict[str, Link], device: str, experts: Experts | None = None):
        self.index, self.module, self.rotary, self.acts = index, module, rotary, acts
        self.stems, self.links, self.device = stems, layer_links, device
        self.experts = experts  # a sparse layer's experts: fused in memory (models/dialects.Experts)
        self.dtype = next(module.parameters()).dtype  # the forward dtype
        config = next((m.config for m in module.modules() if hasattr(m, "config")), None)
        self._sdpa = getattr(config, "_attn_implementation", None) == "sdpa"  # causal without a mask
        self._native_prefix = f"{NATIVE_LLM_PREFIX}.layers.{index}."

    def expert_rows(self, module: str) -> tuple[torch.nn.Parameter, int, slice] | None:
        """(fused parameter, expert, its rows) of an expert linear ("mlp.experts.5.up_proj"), else None."""
        parsed = self.experts.parse(module) if self.experts is not None else None
        if parsed is None:
            return None
        expert, linear = parsed
        param, chunk, chunks = self.experts.fused_slot(linear)
        fused = self.module.get_parameter(f"{self.experts.prefix}.{param}")
        rows = fused.shape[1] // chunks
        return fused, expert, slice(chunk * rows, (chunk + 1) * rows)

    def work(self, dialect: Dialect, log: Callable[[str], None], llm_config: dict | None = None,
             budget: int = 2 * 2**30) -> LayerWork:
        """The LayerWork a quantizer sees for this layer (with `llm_config`, a sparse layer's routing
        in LayerWork.sparse; `budget`: the activation budget in bytes)."""
        sparse = None
        if self.experts is not None and llm_config is not None:
            act = self.module.get_submodule(self.experts.prefix).act_fn
            sparse = SparseBlock(self.experts, self.experts.settings(llm_config), act, budget)
        return LayerWork(self.index, dialect, self.weight, self.set_weight, self.inputs, self.outputs, log, self.device,
                         self.bias, sparse)

    def _params(self, module: str, param: str = "weight") -> tuple[Link, list[torch.nn.Module], list[str]]:
        link = self.links[f"{self.stems[module]}.{param}"]
        owners, leaves = [], []
        for native in link.natives:
            *path, leaf = native.removeprefix(self._native_prefix).split(".")
            owners.append(self.module.get_submodule(".".join(path)))
            leaves.append(leaf)
        return link, owners, leaves

    def weight(self, module: str) -> torch.Tensor:
        """The current weight of an original-layout module (fused tensors merged), float32 (a copy
        when the layer runs in bf16); read-only."""
        slot = self.expert_rows(module)
        if slot is not None:
            fused, expert, rows = slot
            return fused.detach()[expert, rows].float()
        link, owners, leaves = self._params(module)
        parts = [owner._parameters[leaf].detach().float() for owner, leaf in zip(owners, leaves)]
        return link.merge(*parts) if link.merge else parts[0]

    def bias(self, module: str) -> torch.Tensor | None:
        """The current bias of an original-layout module (float32; read-only), None when it has none."""
        if f"{self.stems[module]}.bias" not in self.links:
            return None
        link, owners, leaves = self._params(module, "bias")
        parts = [owner._parameters[leaf].detach().float() for owner, leaf in zip(owners, leaves)]
        return link.merge(*parts) if link.merge else parts[0]

    def set_weight(self, module: str, tensor: torch.Tensor, param: str = "weight") -> None:
        """Put an original-layout weight (or `param` "bias") into the native layer (split when fused),
        on the layer's device, in the layer's dtype."""
        slot = self.expert_rows(module) if param == "weight" else None
        if slot is not None:  # an expert's rows of the fused parameter, in place
            fused, expert, rows = slot
            with torch.no_grad():
                fused[expert, rows].copy_(tensor.to(fused.device, fused.dtype))
            return
        link, owners, leaves = self._params(module, param)
        parts = link.split(tensor) if link.split else (tensor,)
        for owner, leaf, part in zip(owners, leaves, parts):
            dtype = owner._parameters[leaf].dtype
            owner._parameters[leaf] = torch.nn.Parameter(part.to(self.device, dtype).contiguous(), requires_grad=False)

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.device, self.dtype)
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = None  # SDPA attention (build_decoder_layer(attention="sdpa")) is causal without one
        if not self._sdpa:
            mask = torch.full((hidden.shape[1],) * 2, float("-inf"), device=hidden.device, dtype=self.dtype).triu(1)[None, None]
        with torch.no_grad():
            out = self.module(hidden, attention_mask=mask, position_ids=positions,
                              position_embeddings=self.rotary(hidden, positions))
        return out[0] if isinstance(out, tuple) else out

    def inputs(self, hook: str) -> Iterator[torch.Tensor]:
        """Per cached sample, the input of native module `hook` (the forward stops there)."""
        target = self.module.get_submodule(hook)

        def capture(_module, args):
            raise _Captured(args[0])

        for hidden in self.acts:
            handle = target.register_forward_pre_hook(capture)  # only while this sample runs
            try:
                self._forward(hidden)
            except _Captured as seen:
                captured = seen.args[0]
            else:
                raise RuntimeError(f"layer {self.index}: {hook} never ran in the decoder layer's forward")
            finally:
                handle.remove()
            yield captured

    def outputs(self) -> Iterator[torch.Tensor]:
        """Per cached sample, the layer's output [1, T, hidden] under its current weights (forward dtype)."""
        for hidden in self.acts:
            yield self._forward(hidden)


def quantize_layer(reader: CheckpointReader, config: dict, layout: Layout, index: int, acts: Activations, quantizer: Quantizer,
                   job: CalibrationJob, writer: CheckpointWriter, planned: list[str], all_links: dict[str, Link],
                   log: Callable[[str], None]) -> Activations:
    """Quantize decoder layer `index` with `quantizer`, writing its `planned` tensors; returns the
    layer's outputs (the next layer's inputs). RuntimeError when the quantizer leaves a planned
    tensor unwritten."""
    dtype = forward_dtype(job.forward_dtype, job.device)
    module, rotary = build_decoder_layer(reader, config, layout, index, dtype, attention="sdpa")
    stems = {}
    for key in layout.llm_layer_keys(index):
        info = layout.keys[key]
        stems[info.module] = key.removesuffix(f".{info.param}")
    layer = DecoderLayer(index, module.to(job.device), rotary.to(job.device), acts, stems, all_links, job.device,
                         layout.record.experts)
    work = layer.work(layout.record, log, config["llm_config"], job.memory_budget)
    written: set[str] = set()

    def apply(updates: Iterable[tuple[str, ModuleUpdate]]) -> None:
        for name, update in updates:
            for suffix, tensor in update.tensors.items():
                writer.write(f"{stems[name]}.{suffix}", tensor)
                written.add(f"{stems[name]}.{suffix}")
            if update.weight is not None:
                layer.set_weight(name, update.weight)
            if update.bias is not None:
                layer.set_weight(name, update.bias, "bias")

    apply(quantizer.prepare_layer(work))
    for group in layout.record.groups:
        for inputs in layer.inputs(group.hook):
            quantizer.observe(group, inputs)
        apply(quantizer.quantize_group(GroupWork(work, group)))
    if layout.record.experts is not None:  # each expert on the tokens routed to it (calibrate/experts.py)
        quantize_experts(layer, work, quantizer, apply, config["llm_config"], job.memory_budget)
    missing = [name for name in planned if name not in written]
    if missing:
        raise RuntimeError(f"{quantizer.name}: layer {index} left {len(missing)} planned tensors unwritten (first: {missing[0]})")
    outputs = Activations(acts.folder.parent / f"after-layer-{index}", job.memory_budget)
    for hidden in layer.outputs():
        outputs.append(hidden.cpu())
    acts.discard()
    return outputs


def quantize_calibrated(source: Path, out: Path, quantizer: Quantizer, job: CalibrationJob, *, max_shard_size: int,
                        overwrite: bool = False, resume: bool = False, progress: Callable[[int], None] | None = None,
                        log: Callable[[str], None] = lambda _m: None) -> Path:
    """Quantize every decoder layer of an original-layout checkpoint with `quantizer` and write OUT.

    `progress(n)` is called after each finished layer (n layers done); `log` gets progress lines
    and warnings. `resume` continues an interrupted run from OUT.partial/. Raises InputError for a
    quantized, native-layout or LoRA-carrying input, and for a resume whose options differ."""
    method = quantizer.name.upper()
    with open_view(source, native_dialect=True) as reader:
        config = reader.config()
        if config.get("quantization_config"):
            raise InputError(f"{source}/config.json: the checkpoint is already quantized; quantize the bf16 checkpoint")
        refuse_unannounced_quantization(getattr(reader, "reader", reader).keys())  # before OUT.partial exists
        layout = build_layout(config, reader.specs())
        if layout.lora:
            raise InputError(f"{source}: embedded LoRA adapters; merge them first with `internvl-tools merge-lora`")
        if layout.record.experts is not None and not quantizer.supports_experts:
            raise InputError(f"{source}: {method} does not calibrate a sparse layer's experts ({layout.dialect}); "
                             "use --method gptq or awq (each expert on the tokens routed to it) or --method int8")
        specs, per_layer = output_plan(reader, layout, quantizer)
        replaced = {name for names in per_layer.values() for name in names}
        quantization_config = quantizer.quantization_config(layout)
        native = reader.layout_name == "native"
        files = _output_config(source, reader, config, quantization_config, [s.name for s in specs]) if native else \
            {"config.json": dict(config, **({"quantization_config": quantization_config} if quantization_config else {}))}
        files = fix_lora_flags(files, Path(source), [s.name for s in specs])
        all_links = {link.original: link for link in links(config, layout, adapt_v1=False)}
        planned = LayoutWriter(reader, None).specs(specs) if native else specs

        def load_samples():
            if not job.calib:
                return builtin_samples(job.num_samples, job.seed)
            loaded = load_calibration(Path(job.calib), job.num_samples)
            if len(loaded) < job.num_samples:  # all the rows there are: calibrated on fewer, said once (the record counts them)
                log(f"warning: --calib {job.calib} holds {len(loaded)} rows, fewer than --num-samples {job.num_samples}; "
                    f"calibrating on all {len(loaded)} (add rows for the full count)")
            return loaded

        def load_window() -> Window:
            samples = load_samples()
            try:
                window = fit_window(reader, config, samples, job.seq_len, job.num_samples)
            except InputError:  # no sample keeps content: later ones may
                window = None
            if (window is None or window.dropped) and len(samples) == job.num_samples:
                # the next samples of the set (--calib: the next rows) stand in for dropped ones
                more = builtin_samples(4 * job.num_samples, job.seed) if not job.calib else \
                    load_calibration(Path(job.calib), 4 * job.num_samples)
                if len(more) > len(samples):
                    window = fit_window(reader, config, more, job.seq_len, job.num_samples)
            window = window or fit_window(reader, config, samples, job.seq_len, job.num_samples)  # the refusal
            if window.warning():
                log(window.warning())
            return window

        # bad calibration data, or a --seq-len that leaves it no room, is refused before OUT.partial exists
        # (a resumed run reads its rows from there)
        window = None if resume else load_window()
        # the dtype "auto" stands for on this machine: a partial resumed where it means another is refused by name
        resolved = _DTYPE_NAMES[forward_dtype(job.forward_dtype, job.device)]
        run = {"method": quantizer.name, "options": quantizer.options(), "calibration": dict(asdict(job), forward_dtype=resolved)}
        partial = Path(out).with_name(Path(out).name + ".partial")
        reopen, leftover = _resume_check(partial, run, str(Path(source).resolve()), log) if resume else (False, None)
        with CheckpointWriter(out, planned, max_shard_size=max_shard_size, inputs=[Path(source)], overwrite=overwrite or resume,
                              resumable=True, reopen=reopen, leftover=leftover) as raw_writer:
            writer = LayoutWriter(reader, raw_writer)
            state = ResumeState(raw_writer.partial, quantizer.name, run, str(Path(source).resolve()))
            done = state.load(raw_writer.partial) if resume and raw_writer.resumed else None
            if resume and raw_writer.resumed and done is None:
                log(f"note: --resume: {raw_writer.partial} holds no finished layer (the run stopped while calibrating); "
                    "starting from the first layer")
            if done is not None:
                writer.mark_written([s.name for s in specs if s.name not in replaced])
                writer.mark_written([n for layer in range(done) for n in per_layer.get(layer, [])])
                acts = state.activations(job.memory_budget)
                quantizer.restore(state.stats)  # the finished layers' statistics: the summary counts every layer
                log(f"resuming after layer {done - 1}")
            else:
                done = 0
                for spec in specs:
                    if spec.name not in replaced:
                        writer.copy(spec.name)
                window = window if window is not None else load_window()
                record, rows = calibration_record([f.sample for f in window.used], job.calib, job.seed,
                                                  dict(window.record(), forward_dtype=resolved))
                write_file(raw_writer.partial / ROWS_FILE, {"calibration": record, "rows": rows})  # kept for --resume
                acts = calibration_embeddings(reader, config, layout, window, job.memory_budget, state.spill, log, job.device)
                state.save(acts, 0)
            for index in range(done, layout.llm_layers):
                acts = quantize_layer(reader, config, layout, index, acts, quantizer, job, writer, per_layer.get(index, []),
                                      all_links, log)
                state.save(acts, index + 1, quantizer.state())
                if progress:
                    progress(index + 1)
            state.clear()
            if (raw_writer.partial / ROWS_FILE).exists():  # absent only in a partial from before it was recorded
                files = _with_calibration(files, json.loads((raw_writer.partial / ROWS_FILE).read_text()), quantizer)
            return raw_writer.finalize(side_files_from=Path(source), files=files)


# how the options of a calibrated run read on the command line: job key -> (flag, its negation for a boolean)
_FLAGS = {
    "bits": ("--bits", None), "group_size": ("--group-size", None), "zero_point": ("--zero-point", "--no-zero-point"),
    "sym": ("--sym", "--asym"), "desc_act": ("--desc-act", None), "damp": ("--damp", None),
    "act_group_aware": ("--act-group-aware", "--no-act-group-aware"), "format": ("--format", None),
    "num_samples": ("--num-samples", None), "seq_len": ("--seq-len", None), "calib": ("--calib", None),
    "device": ("--device", None), "forward_dtype": ("--forward-dtype", None),
}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _option_text(key: str, value: object) -> str:
    """One option value as the command line spells it ("--num-samples 4", "--no-zero-point")."""
    flag, negated = _FLAGS.get(key, (key, None))
    if isinstance(value, bool):
        return flag if value else (negated or f"without {flag}")
    if key == "calib" and value is None:
        return "the built-in set (no --calib)"
    return f"{flag} {value}"


def _run_format(run: dict) -> str:
    """The output format of a run record (GPTQ records it only when it is not gptq)."""
    return run["options"].get("format", run["method"])


def option_differences(was: dict, now: dict) -> list[str]:
    """The options two run records ({"method", "options", "calibration"}) differ in, as
    "--num-samples 4 (now 3)" / "--zero-point (now --no-zero-point)", the earlier run's value first."""
    before = {**was.get("options", {}), **was.get("calibration", {})}
    after = {**now.get("options", {}), **now.get("calibration", {})}
    lines = []
    for key in dict.fromkeys([*before, *after]):
        old, new = before.get(key), after.get(key)
        if old != new:
            plain = old is not None and new is not None and not isinstance(new, bool)  # "--num-samples 4 (now 3)"
            lines.append(f"{_option_text(key, old)} (now {new if plain else _option_text(key, new)})")
    return lines


def _resume_check(partial: Path, run: dict, source: str, log: Callable[[str], None]) -> tuple[bool, Callable[[Path], None]]:
    """Before a --resume run opens OUT.partial/ (`run`: its record, `source`: the resolved input):
    whether the writer may reopen it, and what to say if the writer then replaces it (its shards
    planned for other tensors). One note line when there is no partial; one warning line (and a
    fresh start) for a partial from another input, method or --format; InputError naming each
    differing option (was, now) and the fix for a partial of the same run with other options."""
    def replaced(_partial: Path) -> None:
        log(f"warning: --resume: {partial} is not resumed: its shards were planned for other tensors (another "
            "--max-shard-size, or the input changed since); starting fresh")

    if not partial.exists():
        log(f"note: --resume: there is no {partial.name} to resume; starting from the first layer")
        return False, replaced
    previous = ResumeState.read(partial)
    if previous is None:
        return True, replaced
    was, now = previous["job"], json.loads(json.dumps(run))  # as it reads back from JSON (tuples -> lists)
    reason = None
    if previous.get("source") and previous["source"] != source:
        reason = f"it was started from another input ({previous['source']})"
    elif was.get("method") != now["method"]:
        reason = f"it was started by --method {was.get('method')} (now {now['method']})"
    elif _run_format(was) != _run_format(now):
        reason = f"it was started with --format {_run_format(was)} (now {_run_format(now)})"
    if reason:
        log(f"warning: --resume: {partial} is not resumed: {reason}; starting fresh")
        return False, lambda _partial: None
    if was != now:
        differ = option_differences(was, now)
        raise InputError(f"{partial}: the interrupted run used other options: {'; '.join(differ) or 'internal settings'}; "
                         f"rerun with its options to resume, or drop --resume (or remove {partial}) to start over")
    return True, replaced


def _with_calibration(files: dict[str, object], rows_file: dict, quantizer: Quantizer) -> dict[str, object]:
    """Record what the run was calibrated with: `quantization_calibration` in config.json (and the
    sidecar's original config), the row fingerprints in calibration_rows.json (verify reads both)."""
    bits = getattr(getattr(quantizer, "config", None), "bits", None)
    record = {"method": quantizer.name, **({"bits": bits} if bits else {}), **rows_file["calibration"]}
    files = dict(files, **{ROWS_FILE: rows_file})
    files["config.json"] = dict(files["config.json"], quantization_calibration=record)
    if SIDECAR in files:
        sidecar = dict(files[SIDECAR])
        sidecar["config"] = dict(sidecar["config"], quantization_calibration=record)
        files[SIDECAR] = sidecar
    return files


def _output_config(source: Path, view, config: dict, quantization_config: dict | None, keys: list[str]) -> dict[str, object]:
    """config.json (the input's native config + the quantization_config in native names) and
    internvl_original.json (the original config and keys) of a native-layout output."""
    native = dict(view.native_config)
    original = dict(config)
    if quantization_config is not None:
        native["quantization_config"] = to_native(quantization_config)
        original["quantization_config"] = quantization_config
    return {"config.json": native, SIDECAR: {**view.sidecar_extra, "config": original, "keys": keys}}
