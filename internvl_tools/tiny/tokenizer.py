"""A small working tokenizer with each family's special tokens (for generated checkpoints)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..models.templates import get_template

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
IMG_CONTEXT = "<IMG_CONTEXT>"

CORPUS = """\
The image shows a cat sitting on a red chair next to a window. Describe the image in detail.
What color is the car? The car is blue. How many people are in the picture? There are three people.
Please provide the bounding box coordinates of the region this sentence describes.
A chart with bars and lines; the title reads sales by quarter. Answer with the option's letter.
Question: Is there a dog in the image? Answer: yes. Question: Is the sky green? Answer: no.
A photograph of an astronaut, a cup of coffee, a rocket on the launch pad, and a cat named chelsea.
Circle, square, triangle, rectangle; red, green, blue, yellow, black, white, gray, orange, purple.
0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no A B C D the a an of in on at to is are was were
"""


def build_tokenizer(template: str, vocab_size: int = 384) -> tuple[Tokenizer, list[str], str | None, str]:
    """Train a byte-level BPE on a built-in corpus and add the template's special tokens."""
    record = get_template(template)
    specials, bos, eos = list(record.special_tokens), record.bos, record.stop
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tokenizer.add_special_tokens(IMAGE_TOKENS)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer, specials, bos, eos


def tokenizer_files(template: str, model_max_length: int = 4096) -> tuple[dict[str, object], int]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json contents, and the vocab size."""
    tokenizer, specials, bos, eos = build_tokenizer(template)
    pad = "<|endoftext|>" if "<|endoftext|>" in specials else (specials[0])
    special_map = {"eos_token": eos, "pad_token": pad, "additional_special_tokens": IMAGE_TOKENS}
    if bos:
        special_map["bos_token"] = bos
    if "<unk>" in specials:
        special_map["unk_token"] = "<unk>"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_bos_token": bool(bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    files = {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }
    return files, tokenizer.get_vocab_size(with_added_tokens=True)
