"""The checkpoint's tokenizer, never with remote code and never with a prompt.

InternVL checkpoints often name a tokenizer class that lives in their remote code
(InternLM2's `InternLM2Tokenizer` in InternVL2-2B/8B/26B, InternVL2.5-2B/8B/26B, InternVL3-9B).
Left to itself, transformers asks on stdin whether to run that code (and waits ~30 s without
a terminal). Here `trust_remote_code=False` is explicit, and when the named class is not
available the same vocabulary is read by a class transformers ships: the fast tokenizer from
`tokenizer.json`, else the SentencePiece model `tokenizer.model` as Llama's tokenizer (InternLM2's
tokenizer is a SentencePiece BPE with byte fallback, as Llama's); the added tokens of
tokenizer_config.json (`<img>`, `<IMG_CONTEXT>`, ...) are added back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError

# what AutoTokenizer reads a vocabulary from (fast tokenizers, sentencepiece, BPE, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken", "qwen.tiktoken")


def load_tokenizer(folder: str | Path):
    """The tokenizer of a checkpoint folder (a transformers tokenizer object).

    Raises InputError naming the folder when no tokenizer can be read from it."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    folder = Path(folder)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # an original config.json's model_type is unknown to transformers
    try:
        try:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            fallback = _without_remote_code(folder)
            if fallback is None:
                if not any((folder / name).exists() for name in TOKENIZER_FILES):
                    raise InputError(f"{folder}: no tokenizer.json (nor another tokenizer file); copy the tokenizer files of "
                                     "the checkpoint it was made from into the folder") from exc
                reason = " ".join(str(exc).split())  # transformers' messages run over several lines
                raise InputError(f"{folder}: cannot load the tokenizer ({reason}); the folder needs its tokenizer files") from exc
            print(f"warning: {folder}: the tokenizer class it names needs remote code ({_class_name(folder)}); "
                  f"read with transformers' {type(fallback).__name__} instead", file=sys.stderr)
            return fallback
    finally:
        logging.set_verbosity(verbosity)


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


def _class_name(folder: Path) -> str:
    return str(_tokenizer_config(folder).get("tokenizer_class") or "unknown")


def _without_remote_code(folder: Path):
    """The vocabulary through a class transformers ships (None when there is nothing to read)."""
    config = _tokenizer_config(folder)
    if (folder / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast as shipped
    elif (folder / "tokenizer.model").exists():
        from transformers import LlamaTokenizer as shipped
    else:
        return None
    tokenizer = shipped.from_pretrained(folder, trust_remote_code=False)
    added = [_content(entry) for _, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))]
    missing = [token for token in added if token and tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer


def _content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
