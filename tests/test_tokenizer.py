"""Tokenizers that name a remote-code class (InternLM2Tokenizer) load without it and without a prompt."""

from __future__ import annotations

import json

import pytest

from internvl_tools.runtime.model import InternVLRuntime
from internvl_tools.runtime.tokenizer import load_tokenizer


def _name_remote_class(folder):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "InternLM2Tokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    path.write_text(json.dumps(config))


def test_remote_tokenizer_class_falls_back_to_tokenizer_json(tiny, copy_of, capsys):
    reference = load_tokenizer(tiny("InternVL2-2B"))
    folder = copy_of(tiny("InternVL2-2B"))
    _name_remote_class(folder)
    tokenizer = load_tokenizer(folder)
    assert "needs remote code" in capsys.readouterr().err
    text = "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is in the image?<|im_end|>"
    assert tokenizer(text).input_ids == reference(text).input_ids
    _, ours = InternVLRuntime(folder, dtype=None).generate("hello", max_new_tokens=3)
    _, theirs = InternVLRuntime(tiny("InternVL2-2B"), dtype=None).generate("hello", max_new_tokens=3)
    assert ours == theirs


def test_sentencepiece_only_tokenizer_is_read_as_llama(tmp_path, capsys):
    """InternLM2 repositories ship tokenizer.model only: read as a SentencePiece (Llama) tokenizer,
    with the image tokens of tokenizer_config.json added back."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat", "a picture of a dog", "what is in the image"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": {"92544": {"content": "<img>", "special": True}, "92546": {"content": "<IMG_CONTEXT>", "special": True}},
    }))
    tokenizer = load_tokenizer(folder)
    assert "needs remote code" in capsys.readouterr().err
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tokenizer("what is in the image", add_special_tokens=False).input_ids == processor.encode("what is in the image")
    ids = tokenizer("<img><IMG_CONTEXT>", add_special_tokens=False).input_ids
    assert len(ids) == 2 and tokenizer.convert_ids_to_tokens(ids) == ["<img>", "<IMG_CONTEXT>"]
