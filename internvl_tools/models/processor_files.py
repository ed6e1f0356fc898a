"""The processor side files of a transformers-native checkpoint (`convert --to hf`).

What transformers' `InternVLProcessor` / `AutoProcessor` and vLLM (`InternVLForConditionalGeneration`
runs there as its InternS1 model, on the same processor) read from a folder as it is:

- the tokenizer's multimodal tokens, as attributes: `extra_special_tokens` in tokenizer_config.json
  names `start_image_token` <img>, `end_image_token` </img>, `context_image_token` <IMG_CONTEXT>
  and `video_token` <video> (the processor reads `tokenizer.start_image_token`, ...; vLLM needs
  the video token to be one token, so <video> is added to tokenizer.json as a special token after
  the last id, as OpenGVLab's published "-hf" tokenizers have it);
- chat_template.jinja: the model's own conversation format (models/templates.py), an image
  written as `<IMG_CONTEXT>` + newline where the message has it; the processor expands each
  `<IMG_CONTEXT>` into <img> + <IMG_CONTEXT> x (image_seq_length x tiles) + </img>, which gives
  the prompt text of InternVL's `chat` (and of runtime.model.InternVLRuntime) exactly;
- preprocessor_config.json for GotOcr2ImageProcessor (`crop_to_patches`, `min_patches`,
  `max_patches` from dynamic_image_size / min_dynamic_patch / max_dynamic_patch, the thumbnail
  that GotOcr2 always appends to a multi-tile image, `size` from force_image_size, bicubic,
  ImageNet mean / std), video_preprocessor_config.json for InternVLVideoProcessor (frames as
  single tiles), processor_config.json (`image_seq_length`, `processor_class`);
- generation_config.json with the template's stop token among its eos ids, so that a plain
  `generate` (and vLLM) stops where InternVL's `chat` stops.

Everything here is computed from config.json and the tokenizer files; nothing needs transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .templates import IMG_CONTEXT, IMG_END, IMG_START, get_template

VIDEO_TOKEN = "<video>"
MULTIMODAL_TOKENS = {"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT,
                     "video_token": VIDEO_TOKEN}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PROCESSOR_CLASS = "InternVLProcessor"
# every side file `processor_files` may write or replace (`convert --to original` restores these)
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
         "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def tile_size(config: dict) -> int:
    return int(config.get("force_image_size") or config["vision_config"]["image_size"])


def tokens_per_tile(config: dict) -> int:
    """(image_size / patch)^2 x downsample_ratio^2: 256 for a 448 px tile."""
    vision = config["vision_config"]
    return int((tile_size(config) // vision["patch_size"]) ** 2 * config.get("downsample_ratio", 0.5) ** 2)


# -- chat template ---------------------------------------------------------------------------

def _literal(text: str) -> str:
    """A Jinja string literal (JSON escaping is valid Jinja: \\n, \\", unicode)."""
    return json.dumps(text, ensure_ascii=False)


def chat_template(template_name: str | None) -> str:
    """The conversation format of config.json's `template` as a Jinja chat template.

    Messages are `{"role": "system" | "user" | "assistant", "content": str | [{"type": "image"},
    {"type": "video"}, {"type": "text", "text": ...}]}`; an image item renders as
    `<IMG_CONTEXT>\\n`, a video item as `<video>\\n`. The system block is always written (the
    template's default message unless the first message is a system message), as InternVL's
    conversation.py does. No BOS: the tokenizer adds it where the LLM has one."""
    record = get_template(template_name)
    prefix, _, suffix = record.system.partition("{system_message}")
    head = [
        "{#- written by internvl-tools from InternVL's conversation template '" + str(template_name) + "' -#}",
        "{%- macro render(content) -%}",
        "{%- if content is string -%}{{ content }}",
        "{%- else -%}{%- for item in content -%}",
        "{%- if item['type'] == 'image' -%}{{ " + _literal(IMG_CONTEXT + "\n") + " }}",
        "{%- elif item['type'] == 'video' -%}{{ " + _literal(VIDEO_TOKEN + "\n") + " }}",
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system_message = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        "{%- set system_message = " + _literal(record.system_message) + " -%}{%- set loop_messages = messages -%}",
        "{%- endif -%}",
    ]
    if record.user == "USER":  # vicuna: "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:"
        body = [
            "{{ " + _literal(prefix) + " + system_message + " + _literal(suffix + record.sep) + " }}",
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + " + _literal(record.sep) + " }}",
            "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + render(message['content']) + "
            + _literal(record.stop) + " }}",
            "{%- endif -%}{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}",
        ]
    else:  # MPT style: system + sep, then role + message + sep per turn, the answer's role prefix
        body = [
            "{{ " + _literal(prefix) + " + system_message + " + _literal(suffix + record.sep) + " }}",
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}{{ " + _literal(record.user) + " + render(message['content']) + "
            + _literal(record.sep) + " }}",
            "{%- elif message['role'] == 'assistant' -%}{{ " + _literal(record.assistant) + " + render(message['content']) + "
            + _literal(record.sep) + " }}",
            "{%- endif -%}{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{ " + _literal(record.assistant) + " }}{%- endif -%}",
        ]
    return "\n".join(head + body) + "\n"


# -- image / video processors ----------------------------------------------------------------

def image_processor_config(config: dict) -> tuple[dict, list[str]]:
    """preprocessor_config.json for GotOcr2ImageProcessor, and warnings for what it cannot express.

    Dynamic models: crop_to_patches with min / max_patches = min / max_dynamic_patch (GotOcr2 then
    picks the grid as InternVL's dynamic_preprocess does and appends the thumbnail when there is
    more than one tile). Single-tile models (V1-1, V1-2): one tile, resized to size x size.
    `_fast`-suffixed type: the name transformers 4.x (vLLM) resolves; transformers 5 maps it to
    the same class."""
    size = tile_size(config)
    dynamic = bool(config.get("dynamic_image_size", False))
    warnings = []
    if dynamic and not config.get("use_thumbnail", False):
        warnings.append("config.json has dynamic_image_size without use_thumbnail, but transformers' image processor "
                        "(GotOcr2) always appends a thumbnail to an image of more than one tile: the processor gives such "
                        "an image one tile more (the last) than the original preprocessing")
    out = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "processor_class": PROCESSOR_CLASS,
        "crop_to_patches": dynamic,
        "min_patches": int(config.get("min_dynamic_patch", 1)) if dynamic else 1,
        "max_patches": int(config.get("max_dynamic_patch", 12)) if dynamic else 1,
        "size": {"height": size, "width": size},
        "do_resize": True,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "do_convert_rgb": True,
        "data_format": "channels_first",
        "default_to_square": True,
    }
    return out, warnings


def video_processor_config(config: dict) -> dict:
    """video_preprocessor_config.json: each frame one size x size tile, ImageNet-normalised."""
    size = tile_size(config)
    return {
        "video_processor_type": "InternVLVideoProcessor",
        "processor_class": PROCESSOR_CLASS,
        "size": {"height": size, "width": size},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "do_convert_rgb": True,
        "do_sample_frames": False,
        "initial_shift": True,
    }


def processor_config(config: dict) -> dict:
    return {"processor_class": PROCESSOR_CLASS, "image_seq_length": tokens_per_tile(config)}


# -- tokenizer -------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it as JSON ({exc})") from exc


def tokenizer_files(folder: Path) -> tuple[dict[str, object], int]:
    """tokenizer.json (with <video> added) and tokenizer_config.json (the multimodal tokens as
    attributes, processor_class), and the id of <video>. Raises InputError without tokenizer.json
    or without the image tokens (an InternVL tokenizer has them)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise InputError(f"{folder}: no tokenizer.json; the native checkpoint's processor needs the fast tokenizer "
                         "(save one with AutoTokenizer.from_pretrained(CKPT, trust_remote_code=True).save_pretrained(CKPT))")
    tokenizer = _read_json(path)
    added = tokenizer.setdefault("added_tokens", [])
    vocab = tokenizer.get("model", {}).get("vocab", {}) or {}
    ids = {**(vocab if isinstance(vocab, dict) else {}), **{t["content"]: t["id"] for t in added}}
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in ids]
    if missing:
        raise InputError(f"{path}: no {missing[0]} token; an InternVL tokenizer has <img>, </img> and <IMG_CONTEXT>")
    if VIDEO_TOKEN in ids:
        video_id = ids[VIDEO_TOKEN]
    else:
        video_id = max(ids.values()) + 1
        added.append({"id": video_id, "content": VIDEO_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    config_path = folder / "tokenizer_config.json"
    tok_config = _read_json(config_path) if config_path.exists() else {}
    tok_config.pop("chat_template", None)  # chat_template.jinja is the one template
    decoder = tok_config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and str(video_id) not in decoder:
        decoder[str(video_id)] = {"content": VIDEO_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
    if "auto_map" in tok_config:  # a remote-code tokenizer class (InternLM2Tokenizer): the native folder has no code
        tok_config.pop("auto_map")
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tok_config.get("extra_special_tokens")
    tok_config["extra_special_tokens"] = {**(extra if isinstance(extra, dict) else {}), **MULTIMODAL_TOKENS}
    if isinstance(extra, list):  # a transformers-5 list of extra tokens: keep them as additional special tokens
        tok_config["additional_special_tokens"] = list(dict.fromkeys([*tok_config.get("additional_special_tokens", []), *extra]))
    tok_config["processor_class"] = PROCESSOR_CLASS
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False), "tokenizer_config.json": tok_config}, video_id


def generation_config(folder: Path, stop_id: int | None) -> dict:
    """generation_config.json with the template's stop token among the eos ids: InternVL's `chat`
    stops there (and only there), so without a generation eos the stop token is the one; eos ids
    the file already has are kept."""
    path = Path(folder) / "generation_config.json"
    out = _read_json(path) if path.exists() else {}
    if stop_id is None:
        return out
    eos = out.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    out["eos_token_id"] = eos + [stop_id] if stop_id not in eos else eos
    return out


def token_id(tokenizer_json: str, token: str) -> int | None:
    data = json.loads(tokenizer_json)
    for item in data.get("added_tokens", []):
        if item["content"] == token:
            return item["id"]
    return (data.get("model", {}).get("vocab") or {}).get(token)


def processor_files(folder: Path, config: dict) -> tuple[dict[str, object], list[str]]:
    """Every processor side file of the native checkpoint for an original config.json and its
    folder's tokenizer files: {file name: content}, and warnings (one line each)."""
    files, _ = tokenizer_files(folder)
    image, warnings = image_processor_config(config)
    stop = get_template(config.get("template")).stop
    files.update({
        "chat_template.jinja": chat_template(config.get("template")),
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video_processor_config(config),
        "processor_config.json": processor_config(config),
        "generation_config.json": generation_config(folder, token_id(files["tokenizer.json"], stop)),
    })
    return files, warnings


def original_side_files(folder: Path) -> dict[str, str | None]:
    """The current text of every file `processor_files` writes (None: absent), for the sidecar."""
    return {name: ((Path(folder) / name).read_text(encoding="utf-8") if (Path(folder) / name).exists() else None)
            for name in FILES}
