"""`quantize --method gptq`: layer-by-layer GPTQ straight from the checkpoint stream.

1. Calibration: image + text samples go through the vision tower and mlp1 (never quantized)
   and are spliced into the LLM's input embeddings as the model does; text-only samples too.
2. For each decoder layer: build it alone from the stream, run the cached inputs through it
   with hooks that accumulate each linear's Hessian, GPTQ its linears group by group (q/k/v,
   then o, then gate/up, then down: each group sees the outputs of the already-quantized
   ones), write the packed tensors, and run the inputs through the quantized layer to get the
   next layer's inputs. Activations live in memory up to a budget and on disk beyond it.
3. Everything else is copied byte for byte; config.json gets a top-level quantization_config.

Peak memory: one decoder layer in float32, its Hessians, and the activations in memory.
With `resume`, OUT.partial/ keeps the finished layers and the activations after each layer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.layout import build_layout
from ..models.native_map import links
from ..errors import InputError
from ..io.reader import CheckpointReader
from ..io.safetensors_format import TensorSpec
from ..io.writer import CheckpointWriter
from ..calibrate.samples import Sample, builtin_samples, load_samples
from ..calibrate.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, prepare_hessian
from ..formats.gptq import gptq_quantization_config, pack, packed_shapes
from ..runtime.build import build_decoder_layer
from ..models.templates import IMG_CONTEXT, build_prompt, get_template

# the order GPTQ quantizes a layer's linears in: (original module, native module that sees its input)
SEQUENCE = {
    "llama": [[("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"), ("self_attn.v_proj", "self_attn.v_proj")],
              [("self_attn.o_proj", "self_attn.o_proj")],
              [("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj")],
              [("mlp.down_proj", "mlp.down_proj")]],
    "internlm2": [[("attention.wqkv", "self_attn.q_proj")], [("attention.wo", "self_attn.o_proj")],
                  [("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj")], [("feed_forward.w2", "mlp.down_proj")]],
    "phi3": [[("self_attn.qkv_proj", "self_attn.qkv_proj")], [("self_attn.o_proj", "self_attn.o_proj")],
             [("mlp.gate_up_proj", "mlp.gate_up_proj")], [("mlp.down_proj", "mlp.down_proj")]],
}
SEQUENCE["qwen2"] = SEQUENCE["llama"]
STATE = ".gptq_state.json"
WORK = ".gptq_activations"


@dataclass(frozen=True)
class GPTQJob:
    """Everything that defines a GPTQ run (a resumed run must match it)."""

    config: GPTQConfig
    num_samples: int = 128
    seq_len: int = 2048
    calib: str | None = None
    seed: int = 0
    memory_budget: int = 2 * 2**30  # bytes of activations kept in memory
    device: str = "cpu"


class Activations:
    """Per-sample hidden states [1, T, D], in memory up to a budget, on disk beyond it."""

    def __init__(self, folder: Path, budget: int):
        self.folder, self.budget = folder, budget
        self.items: list[torch.Tensor | Path] = []
        self.in_memory = 0

    def append(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.in_memory + size <= self.budget:
            self.items.append(tensor)
            self.in_memory += size
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{len(self.items):06d}.pt"
            torch.save(tensor, path)
            self.items.append(path)

    def __iter__(self):
        for item in self.items:
            yield torch.load(item, weights_only=True) if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self.items)

    def save_all(self, folder: Path) -> None:
        """Persist every sample (resume)."""
        folder.mkdir(parents=True, exist_ok=True)
        for index, tensor in enumerate(self):
            torch.save(tensor, folder / f"{index:06d}.pt")

    @classmethod
    def load_all(cls, folder: Path, budget: int) -> "Activations":
        acts = cls(folder.with_name(folder.name + "-spill"), budget)
        for path in sorted(folder.glob("*.pt")):
            acts.append(torch.load(path, weights_only=True))
        return acts


def calibration_embeddings(reader: CheckpointReader, config: dict, layout, samples: list[Sample], seq_len: int,
                           budget: int, work: Path) -> Activations:
    """Input embeddings of every sample, image features spliced in (float32).

    The runtime's vision part (InternViT + pixel shuffle + mlp1, never quantized) and tokenizer
    make the image features and prompts; the LLM is not built, only its embedding table read."""
    from ..runtime.model import InternVLRuntime

    vision = InternVLRuntime(reader.folder, dtype=torch.float32, load_llm=False)
    embed_key = next(k for k, i in layout.keys.items() if i.family == "llm" and i.part == "embeddings")
    table = reader.get(embed_key).float()
    context_id = vision.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    template = config.get("template")
    acts = Activations(work, budget)
    for sample in samples:
        tiles = vision.pixel_values(sample.image) if sample.image is not None else None
        text = build_prompt(template, sample.question, vision.tokens_per_tile, tiles.shape[0] if tiles is not None else 0)
        text += sample.answer + get_template(template).sep
        ids = vision.tokenizer(text, return_tensors="pt").input_ids[:, :seq_len]
        embeds = table[ids]
        if tiles is not None:
            features = vision.image_features(tiles).reshape(-1, table.shape[1])
            mask = ids[0] == context_id
            embeds[0, mask] = features[: int(mask.sum())]  # a truncated prompt keeps the leading image tokens
        acts.append(embeds)
    return acts


def output_plan(reader: CheckpointReader, layout, config: GPTQConfig) -> tuple[list[TensorSpec], dict[str, list[str]]]:
    """Output specs (quantized linears expanded) and, per layer, the output names it writes."""
    specs: list[TensorSpec] = []
    per_layer: dict[str, list[str]] = {}
    for name, info in layout.keys.items():
        spec = reader.spec(name)
        if info.family == "llm" and info.part == "layer" and info.is_linear and info.param == "weight":
            rows, cols = spec.shape
            if cols % (32 // config.bits):
                raise InputError(f"{name}: {cols} input features do not pack into 32-bit words of {config.bits}-bit values")
            stem = name.removesuffix(".weight")
            for part, (shape, dtype) in packed_shapes(rows, cols, config.bits, config.group_size).items():
                specs.append(TensorSpec(f"{stem}.{part}", dtype, shape))
                per_layer.setdefault(str(info.layer), []).append(f"{stem}.{part}")
        else:
            specs.append(spec)
    return specs, per_layer


def _causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def _run_layer(layer, rotary, hidden: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(hidden.shape[1])[None]
    with torch.no_grad():
        out = layer(hidden, attention_mask=_causal_mask(hidden.shape[1]), position_ids=positions,
                    position_embeddings=rotary(hidden, positions))
    return out[0] if isinstance(out, tuple) else out


def _assign_dequantized(layer, layer_links: dict, key: str, weight: torch.Tensor, index: int) -> None:
    """Put a dequantized original weight into the native layer (splitting fused InternLM2 wqkv)."""
    link = layer_links[key]
    parts = link.split(weight) if link.split else (weight,)
    prefix = f"model.language_model.layers.{index}."
    for native, tensor in zip(link.natives, parts):
        *path, leaf = native[len(prefix):].split(".")
        module = layer
        for piece in path:
            module = getattr(module, piece)
        module._parameters[leaf] = torch.nn.Parameter(tensor.contiguous(), requires_grad=False)


def quantize_layer(reader, config: dict, layout, index: int, acts: Activations, job: GPTQJob, writer: CheckpointWriter,
                   log: Callable[[str], None]) -> Activations:
    """GPTQ one decoder layer; returns its outputs (the next layer's inputs)."""
    layer, rotary = build_decoder_layer(reader, config, layout, index, torch.float32)
    layer, rotary = layer.to(job.device), rotary.to(job.device)
    layer_links = {l.original: l for l in links(config, layout, adapt_v1=False)
                   if l.original.startswith(f"language_model.model.layers.{index}.")}
    for group in SEQUENCE[layout.dialect]:
        # the linears of a group read the same input, so they share one Hessian
        module = layer.get_submodule(group[0][1])
        accumulator = HessianAccumulator(module.in_features, job.device)
        handle = module.register_forward_pre_hook(lambda _m, args: accumulator.add(args[0]))
        for hidden in acts:
            _run_layer(layer, rotary, hidden.to(job.device))
        handle.remove()
        prepared = prepare_hessian(accumulator.take(), job.config)  # consumes H; shared by the group's linears
        for original, _native in group:
            key = f"language_model.model.layers.{index}.{original}.weight"
            result = gptq_quantize(reader.get(key).to(job.device), prepared, job.config)
            stem = key.removesuffix(".weight")
            for part, tensor in pack(result, job.config.bits).items():
                writer.write(f"{stem}.{part}", tensor)
            _assign_dequantized(layer, layer_links, key, result.dequantize().to(job.device), index)
            log(f"layer {index} {original}: GPTQ loss {result.loss:.4g}")
            del result
        del prepared
    outputs = Activations(acts.folder.parent / f"after-layer-{index}", job.memory_budget)
    for hidden in acts:
        outputs.append(_run_layer(layer, rotary, hidden.to(job.device)).cpu())
    shutil.rmtree(acts.folder, ignore_errors=True)
    return outputs


def quantize_gptq(source: Path, out: Path, job: GPTQJob, *, max_shard_size: int, overwrite: bool = False, resume: bool = False,
                  progress: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda _m: None) -> Path:
    """Run GPTQ over every decoder layer of an original-layout checkpoint and write the result."""
    with CheckpointReader(source) as reader:
        config = reader.config()
        if config.get("quantization_config"):
            raise InputError(f"{source}/config.json: the checkpoint is already quantized; quantize the bf16 checkpoint")
        if config.get("model_type") == "internvl":
            raise InputError(f"{source}: GPTQ reads the original layout; quantize it first, then `convert --to hf`")
        layout = build_layout(config, reader.specs())
        if layout.lora:
            raise InputError(f"{source}: embedded LoRA adapters; merge them first with `internvl-tools merge-lora`")
        specs, per_layer = output_plan(reader, layout, job.config)
        quantized = {name for names in per_layer.values() for name in names}
        new_config = dict(config, quantization_config=gptq_quantization_config(job.config))
        with CheckpointWriter(out, specs, max_shard_size=max_shard_size, inputs=[Path(source)], overwrite=overwrite or resume,
                              resumable=True) as writer:
            state_path, work = writer.partial / STATE, writer.partial / WORK
            state = json.loads(state_path.read_text()) if resume and writer.resumed and state_path.exists() else None
            if state is not None and state["job"] != json.loads(json.dumps(asdict(job))):
                raise InputError(f"{out}.partial: the interrupted run used other options ({state['job']}); rerun without --resume")
            done = state["layers_done"] if state else 0
            if state:
                writer.mark_written([s.name for s in specs if s.name not in quantized])
                writer.mark_written([n for layer in range(done) for n in per_layer[str(layer)]])
                acts = Activations.load_all(work / "current", job.memory_budget)
                log(f"resuming after layer {done - 1}")
            else:
                for spec in specs:
                    if spec.name not in quantized:
                        writer.copy_stored(spec.name, reader.stored(spec.name))
                samples = load_samples(Path(job.calib), job.num_samples) if job.calib else builtin_samples(job.num_samples, job.seed)
                acts = calibration_embeddings(reader, config, layout, samples, job.seq_len, job.memory_budget, work / "spill")
                _checkpoint_state(state_path, work, acts, job, 0)
            for index in range(done, layout.llm_layers):
                acts = quantize_layer(reader, config, layout, index, acts, job, writer, log)
                _checkpoint_state(state_path, work, acts, job, index + 1)
                if progress:
                    progress(index + 1)
            state_path.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            return writer.finalize(side_files_from=Path(source), files={"config.json": new_config})


def _checkpoint_state(state_path: Path, work: Path, acts: Activations, job: GPTQJob, layers_done: int) -> None:
    """Persist the activations and the number of finished layers (atomically enough: state last)."""
    fresh = work / "next"
    shutil.rmtree(fresh, ignore_errors=True)
    acts.save_all(fresh)
    shutil.rmtree(work / "current", ignore_errors=True)
    fresh.rename(work / "current")
    state_path.write_text(json.dumps({"job": asdict(job), "layers_done": layers_done}))
