"""Run an original-layout InternVL checkpoint without its remote code.

Vision tower, projector and LLM are native transformers modules built from the checkpoint
stream (eager attention); the glue — select_layer, pixel shuffle v1/v2, image-token splicing,
the chat template — is this module's own re-statement of the published architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.layout import build_layout
from ..errors import InputError
from ..io.reader import CheckpointReader
from .build import build_llm, build_vision
from ..models.templates import IMG_CONTEXT, build_prompt, get_template
from ..models.native_config import image_tokens_per_tile
from .preprocess import pixel_values as preprocess
from .tokenizer import load_tokenizer
from ..formats.dequantized import DequantizedView
from ..formats.views import open_view


def pixel_shuffle(features: torch.Tensor, ratio: float, version: str) -> torch.Tensor:
    """[N, h, w, C] -> [N, h*r, w*r, C/r^2]; v1 leaves the token grid transposed (as the original)."""
    n, w, h, c = features.shape
    x = features.reshape(n, w, int(h * ratio), int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x if version == "v1" else x.permute(0, 2, 1, 3).contiguous()


def open_for_runtime(folder: str | Path):
    """A view of the checkpoint in original key names (either layout); quantized checkpoints
    are seen dequantized (formats/dequantized.py)."""
    view = open_view(folder)
    method = (view.config().get("quantization_config") or {}).get("quant_method")
    if method is None:
        return view
    try:
        return DequantizedView(view)
    except BaseException:
        view.close()
        raise


def device_placement(device_map: dict[str, int | str]):
    """original key -> torch device, by the longest module prefix in a device map."""

    def place(key: str) -> torch.device:
        matches = [m for m in device_map if key == m or key.startswith(m + ".")]
        if not matches:
            raise InputError(f"device map has no entry for {key!r}; use the device_map.json that `shard --gpus` wrote for this checkpoint")
        device = device_map[max(matches, key=len)]
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)

    return place


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def follow_weights(runtime: "InternVLRuntime") -> None:
    """Move activations to each module's device before it runs (pipeline over devices)."""
    modules = [runtime.vision, runtime.projector]
    if runtime.llm is not None:
        modules += [*runtime.llm.model.layers, runtime.llm.model.norm, runtime.llm.lm_head]
    for module in filter(None, modules):
        device = next(module.parameters()).device
        module.register_forward_pre_hook(lambda _m, args, kwargs, d=device: (_move(args, d), _move(kwargs, d)), with_kwargs=True)


class InternVLRuntime:
    """An original checkpoint, runnable: image features, logits, greedy generation."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = torch.float32, load_llm: bool = True,
                 load_vision: bool = True, device_map: dict[str, int | str] | None = None, device: str | None = None,
                 vision_features=None):
        """`device_map` (module prefix of the original layout -> device, as `shard --gpus`
        writes it) places each tensor; activations follow the weights layer by layer.
        `device` puts the whole model on one device. `vision_features(config)` makes a
        callable pixel_values [tiles, 3, S, S] -> image embeddings [tiles, tokens, llm_hidden]
        that replaces the PyTorch vision tower and projector (e.g. export.onnx_runner.OnnxVision
        through `export.onnx_runner.onnx_vision(folder, device)`); the runtime imports no exporter."""
        if vision_features is not None:
            load_vision = False
        self.folder = Path(folder)
        if device is not None and device != "cpu":
            device_map = {"vision_model": device, "mlp1": device, "language_model": device}
        placement = device_placement(device_map) if device_map else None
        with open_for_runtime(folder) as reader:
            self.config = reader.config()
            self.layout = build_layout(self.config, reader.specs())
            if placement:
                for key in reader.keys():
                    placement(key)  # every key must be placed
            self.vision, self.projector = build_vision(reader, self.config, self.layout, dtype, placement) if load_vision else (None, None)
            self.llm = build_llm(reader, self.config, self.layout, dtype, placement) if load_llm else None
        if placement:
            follow_weights(self)
        self.onnx_vision = vision_features(self.config) if vision_features is not None else None
        self.dtype = dtype
        self.tokens_per_tile = image_tokens_per_tile(self.config)
        self.template = get_template(self.config.get("template"))  # an unknown template is an error, never a guess
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The checkpoint's own tokenizer, read without remote code: trust_remote_code=False is
        explicit, because left unset transformers asks on stdin whether to run the code an
        `auto_map` in config.json names (a prompt that hangs a non-interactive run)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles, tokens_per_tile, llm_hidden]."""
        if self.onnx_vision is not None:
            return self.onnx_vision(pixels)
        param = next(self.vision.parameters())
        hidden = self.vision(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state[:, 1:, :]
        side = int(hidden.shape[1] ** 0.5)
        grid = hidden.reshape(hidden.shape[0], side, side, -1)
        shuffled = pixel_shuffle(grid, self.config.get("downsample_ratio", 0.5), self.config.get("ps_version", "v1"))
        return self.projector(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))

    def pixel_values(self, image) -> torch.Tensor:
        """Preprocess a PIL image the way this checkpoint's config says."""
        return preprocess(image, self.config)

    def prompt_ids(self, question: str, num_tiles: int) -> torch.Tensor:
        """Token ids of the chat prompt with the image placeholder expanded."""
        text = build_prompt(self.config.get("template"), question, self.tokens_per_tile, num_tiles)
        return self.tokenizer(text, return_tensors="pt").input_ids

    @torch.no_grad()
    def embeddings(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings with the image features spliced in at the <IMG_CONTEXT> positions."""
        table = self.llm.get_input_embeddings()
        input_ids = input_ids.to(table.weight.device)
        embeds = table(input_ids)
        if features is None:
            return embeds
        context_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        mask = input_ids == context_id
        flat = features.reshape(-1, features.shape[-1]).to(embeds.device, embeds.dtype)
        if int(mask.sum()) != flat.shape[0]:
            raise InputError(f"prompt has {int(mask.sum())} image tokens but the image gives {flat.shape[0]} features")
        embeds = embeds.clone()
        embeds[mask] = flat
        return embeds

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits for every position of a prompt."""
        features = self.image_features(pixels) if pixels is not None else None
        return self.llm(inputs_embeds=self.embeddings(input_ids, features)).logits

    @torch.no_grad()
    def generate(self, question: str, image=None, max_new_tokens: int = 32) -> tuple[str, list[int]]:
        """Greedy answer to a question about an optional image: (text, new token ids)."""
        pixels = self.pixel_values(image) if image is not None else None
        input_ids = self.prompt_ids(question, pixels.shape[0] if pixels is not None else 0)
        features = self.image_features(pixels) if pixels is not None else None
        stop = self.tokenizer.convert_tokens_to_ids(get_template(self.config.get("template")).stop)
        embeds = self.embeddings(input_ids, features)
        output = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(input_ids.shape, dtype=torch.long, device=embeds.device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop)
        new = output[0].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True), new
