"""The runtime (native modules from the stream) equals an independent reference of the original math."""

from __future__ import annotations

import pytest
import torch

from internvl_tools.errors import LayoutError
from internvl_tools.runtime.build import build_decoder_layer
from internvl_tools.runtime.model import InternVLRuntime
from internvl_tools.runtime.preprocess import target_grid, tiles

from . import reference_internvl as ref
from .conftest import DIALECT_FAMILIES
from .support import sample_image


@pytest.fixture(scope="module")
def runtimes(tiny):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = InternVLRuntime(tiny(family))
        return cache[family]

    return get


@pytest.mark.parametrize("family", DIALECT_FAMILIES)
def test_image_features_match_reference(family, runtimes, tiny):
    runtime = runtimes(family)
    pixels = runtime.pixel_values(sample_image())
    config, sd = ref.load_state(tiny(family))
    expected = ref.image_features(config, sd, pixels)
    got = runtime.image_features(pixels)
    assert got.shape == expected.shape == (pixels.shape[0], runtime.tokens_per_tile, config["llm_config"]["hidden_size"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", DIALECT_FAMILIES)
def test_logits_match_reference(family, runtimes, tiny):
    runtime = runtimes(family)
    pixels = runtime.pixel_values(sample_image(1))
    input_ids = runtime.prompt_ids("What color is the car?", pixels.shape[0])
    context_id = runtime.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    expected = ref.logits(tiny(family), input_ids, pixels, context_id)
    got = runtime.logits(input_ids, pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_v1_and_v2_differ_only_by_token_order(tiny):
    """The same weights with ps_version v1 vs v2 give the same token features, transposed grid."""
    from internvl_tools.runtime.model import pixel_shuffle

    grid = torch.randn(2, 8, 8, 5)
    v1, v2 = pixel_shuffle(grid, 0.5, "v1"), pixel_shuffle(grid, 0.5, "v2")
    assert torch.equal(v1.transpose(1, 2), v2)
    for version in ("v1", "v2"):
        assert torch.equal(pixel_shuffle(grid, 0.5, version).reshape(2, 16, 20), ref.shuffle_tokens(grid, version))


def test_select_layer_uses_earlier_layer(tiny):
    runtime = InternVLRuntime(tiny("InternVL-Chat-V1-1"))  # select_layer -2 at tiny size
    assert runtime.config["select_layer"] == -2
    assert len(runtime.vision.encoder.layer) == runtime.layout.vision_layers - 1


def test_decoder_layer_alone_matches_whole_model(tiny, runtimes):
    runtime = runtimes("InternVL2-2B")
    from internvl_tools.io.reader import CheckpointReader

    with CheckpointReader(tiny("InternVL2-2B")) as reader:
        layer, rotary = build_decoder_layer(reader, runtime.config, runtime.layout, 1, torch.float32)
    whole = runtime.llm.model.layers[1]
    for (name, a), (_, b) in zip(sorted(layer.state_dict().items()), sorted(whole.state_dict().items())):
        assert torch.equal(a, b), name
    x = torch.randn(1, 5, runtime.config["llm_config"]["hidden_size"])
    pos = torch.arange(5)[None]
    emb = rotary(x, pos)
    with torch.no_grad():
        out_alone = layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
        out_whole = whole(x, position_embeddings=runtime.llm.model.rotary_emb(x, pos), attention_mask=None, position_ids=pos)
    out_alone = out_alone[0] if isinstance(out_alone, tuple) else out_alone
    out_whole = out_whole[0] if isinstance(out_whole, tuple) else out_whole
    assert torch.equal(out_alone, out_whole)


def test_generate_is_greedy_and_deterministic(runtimes):
    runtime = runtimes("InternVL2-1B")
    text_a, ids_a = runtime.generate("What color is the car?", sample_image(), max_new_tokens=6)
    text_b, ids_b = runtime.generate("What color is the car?", sample_image(), max_new_tokens=6)
    assert ids_a == ids_b and 0 < len(ids_a) <= 6
    # greedy: each new token is the argmax of the reference logits given the prefix
    pixels = runtime.pixel_values(sample_image())
    prompt = runtime.prompt_ids("What color is the car?", pixels.shape[0])
    full = torch.cat([prompt, torch.tensor([ids_a[:-1]])], dim=1) if len(ids_a) > 1 else prompt
    logits = runtime.logits(full, pixels)[0, prompt.shape[1] - 1 :]
    assert logits.argmax(-1).tolist() == ids_a


def test_dynamic_tiles_follow_aspect_ratio():
    assert target_grid(896, 448, 448, 1, 12) == (2, 1)
    assert target_grid(448, 1344, 448, 1, 12) == (1, 3)
    assert target_grid(500, 500, 448, 1, 12) == (1, 1)
    parts = tiles(sample_image(size=(200, 100)), 56, 1, 6, thumbnail=True)
    assert len(parts) == 3 and all(p.size == (56, 56) for p in parts)  # 2x1 grid + thumbnail


def test_lora_checkpoint_refused_until_merged(tiny):
    with pytest.raises(LayoutError, match="merge-lora"):
        InternVLRuntime(tiny("InternVL2-1B", lora="embedded-llm"))


def test_missing_tensor_is_an_error(tiny, copy_of):
    import json

    folder = copy_of(tiny("InternVL2-1B"))
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 128  # tensors say 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutError, match="config"):
        InternVLRuntime(folder)
