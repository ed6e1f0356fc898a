"""Fitting calibration samples into `--seq-len` tokens so that their content reaches the model.

A sample is rendered in the model's chat template (system prompt, user turn with the image block
`<img>` + `<IMG_CONTEXT>` x tokens per tile x tiles + `</img>`, assistant answer, further turns)
and tokenized with the checkpoint's own tokenizer. When it is longer than `--seq-len`:

1. the system prompt stays only when it takes at most half of `--seq-len` (it is the same in
   every sample: 164 tokens on the tiny test tokenizer, about 30-50 on InternVL's real ones);
   otherwise the sample is rendered without it (the template with an empty system message, a
   prompt InternVL's chat also accepts), so a short window holds the user's content, not
   the same system prompt in every sample;
2. an image is never split: when its tokens (at the checkpoint's `max_dynamic_patch`) do not
   fit with up to a quarter of `--seq-len` of the text that follows, it is tiled again with
   fewer tiles (exactly as a smaller `max_dynamic_patch` tiles it, down to one tile);
3. the window is the first `--seq-len` tokens of that rendering (the end of the conversation is
   cut, as GPTQModel and llm-compressor truncate calibration samples).

A sample that keeps no content token (the window ends within the user turn's header) or whose
image does not fit in one tile is dropped (quantize lets the next samples of the built-in set,
or the next rows of `--calib`, stand in); when every sample is dropped, `fit_samples` raises
InputError naming the smallest `--seq-len` that fits them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from ..models.templates import get_template
from ..runtime.preprocess import target_grid
from .samples import Sample


@dataclass(frozen=True)
class Fitted:
    """A sample as it reaches the model: its token ids (at most seq_len), the tiling of its image
    (`tiles`; `max_tiles`: the max_dynamic_patch it was tiled with, None for no image; `retiled`:
    fewer tiles than the checkpoint's own tiling gives), whether the system prompt was kept, the
    tokens of the rendering the window starts (`rendered`) and of the whole sample as rendered
    with the system prompt and the checkpoint's tiling (`full`)."""

    sample: Sample
    ids: list[int]
    tiles: int
    max_tiles: int | None
    system: bool
    rendered: int  # tokens of the rendering the window was taken from
    full: int
    retiled: bool

    @property
    def end_cut(self) -> bool:
        """The end of the conversation did not fit."""
        return len(self.ids) < self.rendered

    @property
    def cut(self) -> bool:
        """The sample lost content: fewer tiles, or its end cut (a dropped system prompt alone loses none)."""
        return self.retiled or self.end_cut


@dataclass(frozen=True)
class Dropped:
    """A sample that keeps no content in the window: the --seq-len it needs at least, and its whole length."""

    sample: Sample
    need: int
    full: int


@dataclass(frozen=True)
class Window:
    """What `--seq-len` made of the samples: the ones used (Fitted) and the ones dropped."""

    seq_len: int
    used: list[Fitted]
    dropped: list[Dropped]
    system_tokens: int
    header_tokens: int

    @property
    def tokens(self) -> int:
        """Tokens that reach the model, all samples together."""
        return sum(len(f.ids) for f in self.used)

    def whole_from(self) -> int:
        """The --seq-len from which every sample fits whole (system prompt and full tiling)."""
        return max([f.full for f in self.used] + [d.full for d in self.dropped])

    def record(self) -> dict:
        """The counts quantize records (config.json's quantization_calibration, --json)."""
        return {"seq_len": self.seq_len, "tokens": self.tokens, "cut": sum(f.cut for f in self.used),
                "system_prompt_dropped": sum(not f.system for f in self.used),
                "retiled": sum(f.retiled for f in self.used), "dropped": len(self.dropped)}

    def warning(self) -> str | None:
        """One line when samples lost content (fewer tiles, end cut) or were dropped; else None (a
        left-out system prompt alone is no loss: it is recorded, not warned about)."""
        lost = sum(f.cut for f in self.used) + len(self.dropped)
        if not lost:
            return None
        counts = [(sum(f.retiled for f in self.used), "image tiled with fewer tiles", "images tiled with fewer tiles"),
                  (sum(f.end_cut for f in self.used), "end cut", "ends cut"),
                  (len(self.dropped), "dropped: no room for its image or any content (later samples stand in)",
                   "dropped: no room for their images or any content (later samples stand in)"),
                  (sum(not f.system for f in self.used), f"without the {self.system_tokens}-token system prompt "
                   "(more than half of --seq-len)", f"without the {self.system_tokens}-token system prompt "
                   "(more than half of --seq-len)")]
        parts = "; ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts if n)
        total = len(self.used) + len(self.dropped)
        return (f"warning: --seq-len {self.seq_len}: {lost} of {total} calibration samples lose content ({parts}); "
                f"calibrating on {len(self.used)} samples, {self.tokens} tokens; --seq-len {self.whole_from()} keeps "
                "every sample whole")


def tile_options(width: int, height: int, config: dict) -> list[tuple[int, int]]:
    """(max_dynamic_patch, tiles) for an image of width x height, from the checkpoint's own setting down
    to one tile, one entry per distinct tile count, most tiles first (runtime/preprocess.py's tiling)."""
    if not config.get("dynamic_image_size"):
        return [(1, 1)]
    size = config.get("force_image_size") or config["vision_config"]["image_size"]
    low, high = config.get("min_dynamic_patch", 1), config.get("max_dynamic_patch", 12)
    options: dict[int, int] = {}
    for max_num in range(high, 0, -1):
        cols, rows = target_grid(width, height, size, min(low, max_num), max_num)
        tiles = cols * rows + (1 if config.get("use_thumbnail") and cols * rows != 1 else 0)
        options.setdefault(tiles, max_num)
    return [(max_num, tiles) for tiles, max_num in sorted(options.items(), reverse=True)]


def fit_samples(samples: list[Sample], seq_len: int, template_name: str, tokenize: Callable[[str], list[int]],
                tokens_per_tile: int, config: dict, context_id: int, end_id: int | None, count: int | None = None) -> Window:
    """Fit every sample into `seq_len` tokens (module docstring). `tokenize`: text -> token ids as the
    runtime's tokenizer makes them; `config`: the checkpoint's (tiling settings); `context_id` /
    `end_id`: the ids of <IMG_CONTEXT> and </img> (None when </img> is not one token).
    `count`: stop once that many samples are used (later samples stand in for dropped ones).
    InputError when no sample keeps any content, naming the --seq-len that keeps them all."""
    chat = get_template(template_name)
    blank = Sample("", "")
    bare = blank.text(template_name, system=False)
    system_tokens = len(tokenize(blank.text(template_name))) - len(tokenize(bare))
    header = len(tokenize("USER:" if chat.user == "USER" else bare.split(chat.user)[0] + chat.user))
    used, dropped = [], []
    for sample in samples:
        if count is not None and len(used) >= count:
            break
        options = tile_options(*sample.image.size, config) if sample.image is not None else [(None, 0)]
        full_ids = tokenize(sample.text(template_name, tokens_per_tile, options[0][1]))
        if len(full_ids) <= seq_len:
            used.append(Fitted(sample, full_ids, options[0][1], options[0][0], True, len(full_ids), len(full_ids), False))
            continue
        fitted = None
        for system in ((True, False) if system_tokens <= seq_len // 2 else (False,)):
            fallback = None
            for max_tiles, tiles in options:
                ids = tokenize(sample.text(template_name, tokens_per_tile, tiles, system))
                if not tiles:  # text only: at least one token past the user turn's header
                    if (system_tokens if system else 0) + header < seq_len:
                        fitted = (ids, tiles, max_tiles, system)
                    break
                last = max(i for i, t in enumerate(ids) if t == context_id)
                end = last + 2 if end_id is not None and last + 1 < len(ids) and ids[last + 1] == end_id else last + 1
                if end + min(len(ids) - end, seq_len // 4) <= seq_len:  # the image and some of the text after it
                    fitted = (ids, tiles, max_tiles, system)
                    break
                if fallback is None and end <= seq_len:  # the image whole, at most a little text after it
                    fallback = (ids, tiles, max_tiles, system)
            fitted = fitted or fallback
            if fitted:
                break
        if fitted is None:
            need = header + (tokens_per_tile * options[-1][1] + 2 if options[-1][1] else 1)
            dropped.append(Dropped(sample, need, len(full_ids)))
            continue
        ids, tiles, max_tiles, system = fitted
        used.append(Fitted(sample, ids[:seq_len], tiles, max_tiles, system, len(ids), len(full_ids), tiles != options[0][1]))
    window = Window(seq_len, used, dropped, system_tokens, header)
    if not used:
        # the figures are of the samples that would be calibrated (the first `count`), not of every stand-in tried
        dropped = dropped[:count] if count is not None else dropped
        window = Window(seq_len, used, dropped, system_tokens, header)
        image = " and an image at one tile " + str(tokens_per_tile + 2) + " more" if any(d.sample.image is not None for d in dropped) else ""
        raise InputError(f"--seq-len {seq_len} leaves no room for the calibration data: the chat template's user-turn header "
                         f"alone is {header} tokens{image} (the {system_tokens}-token system prompt is left out when it takes "
                         f"more than half of --seq-len); pass --seq-len >= {max(d.need for d in dropped)} "
                         f"(>= {window.whole_from()} keeps every sample whole)")
    return window
