"""The CLIP recipe: every shipped config loads, tiny models build, save/load round-trips offline."""

from __future__ import annotations

import json

import pytest
import torch

from models.clip import build_clip, clip_loss, load_clip
from models.recipes import CONFIG_DIR, list_recipes, load_recipe
from vlforge.demo.synth import make_pairs
from vlforge.errors import ModelNotFoundError


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_config_loads(name):
    recipe = load_recipe(name)
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert recipe.name == raw["name"] == name
    assert recipe.image_size % recipe.patch_size == 0
    assert recipe.vision["hidden_size"] % recipe.vision["num_attention_heads"] == 0


def test_vit_b32_config_matches_the_paper_architecture():
    from models.recipes import clip_config

    cfg = clip_config(load_recipe("clip-vit-b-32"), 49408, 49406, 49407, 0)
    assert (
        cfg.vision_config.hidden_size,
        cfg.vision_config.num_hidden_layers,
        cfg.vision_config.patch_size,
    ) == (768, 12, 32)
    assert (cfg.text_config.hidden_size, cfg.text_config.max_position_embeddings, cfg.projection_dim) == (
        512,
        77,
        512,
    )


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="known recipes: .*clip-tiny"):
        load_recipe("clip-huge")


def test_tiny_clip_round_trips_through_save_pretrained(tmp_path):
    pairs = make_pairs(16, seed=4)
    bundle = build_clip("clip-tiny", [p.caption for p in pairs])
    assert bundle.tokenizer.eos_token_id != 2  # keeps transformers' CLIP on eos pooling, not legacy argmax
    before = bundle.score([p.image for p in pairs], [p.caption for p in pairs])
    path = bundle.save(str(tmp_path / "m"))
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    loaded = load_clip(path)
    after = loaded.score([p.image for p in pairs], [p.caption for p in pairs])
    assert after == pytest.approx(before, abs=1e-5)
    assert loaded.preprocess_images([pairs[0].image]).shape == (1, 3, 32, 32)


def test_loss_is_low_for_aligned_and_high_for_shuffled_embeddings():
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(4.0)
    aligned = clip_loss(emb, emb, scale)
    shuffled = clip_loss(emb, emb.roll(1, 0), scale)
    assert aligned < 0.1 < shuffled


def test_missing_model_errors_name_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_clip(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelNotFoundError, match="Hugging Face id"):
        load_clip("nobody/no-such-clip")


def test_folded_quick_gelu_scores_like_the_original():
    from models.clip import fold_quick_gelu

    pairs = make_pairs(8, seed=5)
    bundle = build_clip("clip-tiny", [p.caption for p in pairs])
    bundle.model.eval()
    images, texts = [p.image for p in pairs], [p.caption for p in pairs]
    with torch.no_grad():
        img_before = bundle.embed_images(bundle.preprocess_images(images))
        txt_before = bundle.embed_texts(**bundle.tokenize(texts))
    cfg = bundle.model.config
    layers = cfg.vision_config.num_hidden_layers + cfg.text_config.num_hidden_layers
    assert fold_quick_gelu(bundle.model) == layers
    assert fold_quick_gelu(bundle.model) == 0  # idempotent: nothing left to fold
    with torch.no_grad():
        img_after = bundle.embed_images(bundle.preprocess_images(images))
        txt_after = bundle.embed_texts(**bundle.tokenize(texts))
    torch.testing.assert_close(img_after, img_before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt_after, txt_before, atol=1e-5, rtol=1e-4)


def test_padding_to_the_longest_caption_embeds_like_full_context_padding():
    pairs = make_pairs(8, seed=6)
    bundle = build_clip("clip-tiny", [p.caption for p in pairs])
    bundle.model.eval()
    texts = [p.caption for p in pairs] + ["a"]  # one much shorter than the rest
    short, full = bundle.tokenize(texts), bundle.tokenize(texts, fixed_length=True)
    assert full["input_ids"].shape == (len(texts), bundle.max_length)
    assert short["input_ids"].shape[1] == int(full["attention_mask"].sum(1).max()) < bundle.max_length
    with torch.no_grad():
        torch.testing.assert_close(
            bundle.embed_texts(**short), bundle.embed_texts(**full), atol=1e-5, rtol=1e-4
        )


def test_pixels_are_centre_cropped_uint8_then_normalised_per_channel():
    """The decode tasks' uint8 crop, normalised by the scorer, is CLIP's (x / 255 - mean) / std, channels first."""
    import numpy as np

    from models.imageproc import resize_center_crop

    pairs = make_pairs(3, seed=7, size=48)
    bundle = build_clip("clip-tiny", [p.caption for p in pairs])
    raw = np.stack([resize_center_crop(p.image, bundle.image_size) for p in pairs])
    assert raw.dtype == np.uint8 and raw.shape == (3, bundle.image_size, bundle.image_size, 3)
    mean = np.asarray(bundle.image_processor.image_mean, dtype=np.float32)
    std = np.asarray(bundle.image_processor.image_std, dtype=np.float32)
    expected = torch.from_numpy(((raw.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy())
    torch.testing.assert_close(bundle.normalize_pixels(torch.from_numpy(raw)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        bundle.preprocess_images([p.image for p in pairs]), expected, atol=1e-5, rtol=1e-5
    )
