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
    from models.recipes import clip_config

    recipe = load_recipe(name)
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert recipe.name == raw["name"] == name
    assert recipe.image_size % recipe.patch_size == 0
    assert recipe.vision["hidden_size"] % recipe.vision["num_attention_heads"] == 0
    config = clip_config(
        recipe, 512, 0, 1, 2
    )  # transformers validates it (a stem's widths per patch size too)
    assert config.vision_config.patch_size == recipe.patch_size
    assert getattr(config.vision_config, "stem_channels", None) == recipe.vision.get("stem_channels")


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


def test_conv_stem_recipe_builds_the_conv_stem_clip_and_plain_recipes_stay_clip():
    from transformers import CLIPConfig, CLIPModel

    from models.convstem import ConvStem, VlforgeClipConfig, VlforgeClipModel

    conv = build_clip("clip-conv-tiny", ["a red star"])
    assert type(conv.model) is VlforgeClipModel and type(conv.model.config) is VlforgeClipConfig
    assert isinstance(conv.model.vision_model.embeddings.patch_embedding, ConvStem)
    plain = build_clip("clip-tiny", ["a red star"])
    assert type(plain.model) is CLIPModel and type(plain.model.config) is CLIPConfig
    # The stem gives the patchify's token grid: 32 px / 8 px = 4 x 4 patches + CLS.
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = conv.model.vision_model(pixel_values=pixels).last_hidden_state
    assert (
        tokens.shape == plain.model.vision_model(pixel_values=pixels).last_hidden_state.shape == (2, 17, 64)
    )


def test_conv_stem_clip_initialises_as_clip_with_he_init_for_the_stem():
    """The encoders get CLIP's own init (transformers skips parameterless blocks of classes it takes for remote
    code unless told otherwise); the stem gets He weights (Kaiming-normal, fan-in, ReLU gain), not CLIP's std 0.02,
    and zero biases."""
    conv = dict(build_clip("clip-conv-64", ["a red star"], seed=3).model.named_parameters())
    plain = dict(build_clip("clip-tiny", ["a red star"], seed=3).model.named_parameters())
    # Matrices (>= 1024 values: a sample std within a few %); CLIP's attention init is 3x the generic 0.02.
    shared = [n for n in plain if n in conv and plain[n].numel() >= 1024]
    assert len(shared) >= 25  # every attention, MLP, embedding and projection matrix
    for name in shared:
        assert conv[name].std().item() == pytest.approx(plain[name].std().item(), rel=0.15), name
    stem = "vision_model.embeddings.patch_embedding."
    fan_ins = (
        ("convs.0", 3 * 9),
        ("convs.1", 16 * 9),
        ("convs.2", 32 * 9),
        ("convs.3", 64 * 9),
        ("proj", 128),
    )
    for layer, fan_in in fan_ins:
        # kaiming_normal_(nonlinearity="relu"): N(0, 2 / fan_in); PyTorch's own Conv2d init has std 1/sqrt(3 fan_in)
        weight = conv[f"{stem}{layer}.weight"]
        assert weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15), layer
        assert abs(weight.mean().item()) < 0.2 * (2 / fan_in) ** 0.5, layer
        # Zero biases: else the stem's output is mostly its biases, and a VLM cannot read colour from it.
        assert not conv[f"{stem}{layer}.bias"].any(), layer


def test_conv_stem_clip_round_trips_through_save_pretrained_exactly(tmp_path):
    from models.convstem import VlforgeClipModel

    pairs = make_pairs(8, seed=5)
    bundle = build_clip("clip-conv-tiny", [p.caption for p in pairs])
    path = bundle.save(str(tmp_path / "m"))
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "vlforge_clip"
    assert saved["vision_config"]["model_type"] == "vlforge_clip_vision_model"
    assert saved["vision_config"]["stem_channels"] == [32, 64, 128]
    loaded = load_clip(path)
    assert type(loaded.model) is VlforgeClipModel
    pixels = bundle.preprocess_images([p.image for p in pairs])
    tokens = bundle.tokenize([p.caption for p in pairs])
    bundle.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.embed_images(pixels), bundle.embed_images(pixels))
        assert torch.equal(loaded.embed_texts(**tokens), bundle.embed_texts(**tokens))


def test_stem_widths_must_match_the_patch_size():
    from models.convstem import VlforgeClipVisionConfig

    assert VlforgeClipVisionConfig(patch_size=16).stem_channels == [32, 64, 128, 256]
    with pytest.raises(Exception, match="stem_channels .* 3 positive widths"):
        VlforgeClipVisionConfig(patch_size=8, stem_channels=[32, 64])
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        VlforgeClipVisionConfig(patch_size=14)


def test_lora_on_a_conv_stem_clip_leaves_the_stem_alone_and_merges_to_the_same_function(tmp_path):
    from models.convstem import VlforgeClipModel
    from models.lora import merge_lora
    from tests.helpers import lora_with_live_adapters

    pairs = make_pairs(8, seed=6)
    bundle = build_clip("clip-conv-tiny", [p.caption for p in pairs])
    peft_model, inputs, before = lora_with_live_adapters(bundle, pairs)
    adapted = {n.split(".lora_")[0] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert adapted and not any("patch_embedding" in n for n in adapted)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "patch_embedding" in n)
    with torch.no_grad():
        merged = merge_lora(peft_model)
    assert type(merged) is VlforgeClipModel
    merged.save_pretrained(str(tmp_path / "merged"))
    bundle.tokenizer.save_pretrained(str(tmp_path / "merged"))
    bundle.image_processor.save_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        after = load_clip(str(tmp_path / "merged")).model(**inputs)
    torch.testing.assert_close(before.image_embeds, after.image_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(before.text_embeds, after.text_embeds, atol=1e-5, rtol=1e-4)
