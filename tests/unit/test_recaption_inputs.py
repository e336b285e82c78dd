"""Bad input to ``vlforge recaption`` and to ``pretrain --caption-col``: one clear error (exit 2) before Ray
starts and nothing published; and the ``--caption-mix`` draw (``tasks.train.data.augment_batch``) is seeded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.helpers import publish_pairs
from vlforge.datasets import VersionWriter, list_versions
from vlforge.demo.synth import make_pairs


def _publish_table(settings, name: str, table: pa.Table):
    writer = VersionWriter(settings, name)
    writer.write_table("data", table, index=0)
    return writer.publish({"counts": {"kept": table.num_rows}, "source": "synthetic", "filters": {}})


def _recaption(*args):
    return CliRunner().invoke(app, ["recaption", *args])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from models.clip import build_clip

    folder = tmp_path_factory.mktemp("clip")
    return build_clip("clip-tiny", [p.caption for p in make_pairs(12, seed=2)]).save(str(folder / "clip"))


def test_a_model_that_is_not_a_vlm_is_refused(settings, clip_dir):
    publish_pairs(settings, "pool", make_pairs(4, seed=1, size=32))
    result = _recaption("pool", "--model", clip_dir)
    assert result.exit_code == 2
    assert "is a 'clip' model, not a VLM" in result.output
    assert len(list_versions(settings, "pool")) == 1  # nothing published, no folder left behind


def test_an_unknown_model_uri_is_refused(settings):
    publish_pairs(settings, "pool", make_pairs(4, seed=1, size=32))
    result = _recaption("pool")  # the default, models:/vlforge-vlm@champion, is not registered here
    assert result.exit_code == 2 and "vlforge-vlm" in result.output


def test_a_dataset_without_images_is_refused(settings, clip_dir):
    _publish_table(settings, "texts", pa.table({"key": ["a", "b"], "caption": ["x", "y"]}))
    result = _recaption("texts", "--model", clip_dir)
    assert result.exit_code == 2 and "has no 'image' column" in result.output
    nulls = pa.table({"key": ["a"], "caption": ["x"], "image": pa.array([None], pa.binary())})
    _publish_table(settings, "blank", nulls)
    result = _recaption("blank", "--model", clip_dir)
    assert result.exit_code == 2 and "has no image bytes in any row" in result.output


def test_an_empty_dataset_is_refused(settings, clip_dir):
    empty = pa.table({"key": pa.array([], pa.string()), "image": pa.array([], pa.binary())})
    _publish_table(settings, "empty", empty)
    result = _recaption("empty", "--model", clip_dir)
    assert result.exit_code == 2 and "is empty (0 rows)" in result.output
    assert list_versions(settings, "empty") and len(list_versions(settings, "empty")) == 1


def test_settings_out_of_range_are_refused(settings, clip_dir):
    publish_pairs(settings, "pool", make_pairs(4, seed=1, size=32))
    assert "--max-new-tokens must be >= 1" in _recaption("pool", "--max-new-tokens", "0").output
    assert "--batch-size must be >= 1" in _recaption("pool", "--batch-size", "0").output


def test_pretrain_on_a_caption_column_that_does_not_exist_fails_before_ray(settings):
    import ray

    publish_pairs(settings, "pool", make_pairs(8, seed=1, size=32))
    started = ray.is_initialized()
    result = CliRunner().invoke(app, ["pretrain", "--dataset", "pool", "--caption-col", "caption_synthetic"])
    assert result.exit_code == 2
    assert (
        "has no caption column 'caption_synthetic'" in result.output and "vlforge recaption" in result.output
    )
    assert ray.is_initialized() == started
    result = CliRunner().invoke(app, ["pretrain", "--dataset", "pool", "--caption-mix", "1.5"])
    assert result.exit_code == 2 and "--caption-mix" in result.output
    result = CliRunner().invoke(
        app, ["pretrain", "--dataset", "pool", "--recipe", "vlm-tiny", "--caption-mix", "0.5"]
    )
    assert result.exit_code == 2 and "--caption-mix is a CLIP setting" in result.output


def _batch(n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.arange(n)[:, None].repeat(4, 1)  # row i's original tokens are all i
    return {
        "pixel_values": rng.random((n, 3, 2, 2), dtype=np.float32),
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "alt_input_ids": ids + 1000,  # its synthetic caption's tokens are all i + 1000
        "alt_attention_mask": np.ones_like(ids),
    }


def test_caption_mix_draws_the_synthetic_caption_with_probability_p_reproducibly():
    from tasks.train.data import augment_batch

    def synthetic_share(p, seed=0, epoch=0):
        out = augment_batch(_batch(400), seed=seed, epoch=epoch, alt_prob=p)
        assert set(out) == {"pixel_values", "input_ids", "attention_mask"}  # the alternatives are dropped
        return out["input_ids"][:, 0] >= 1000

    assert not synthetic_share(0.0).any() and synthetic_share(1.0).all()
    half = synthetic_share(0.5)
    assert 0.4 < half.mean() < 0.6
    assert (synthetic_share(0.5) == half).all()  # same seed and epoch: the same draws
    assert (synthetic_share(0.5, epoch=1) != half).any()  # each epoch draws anew
    batch = _batch(16)
    out = augment_batch({k: v.copy() for k, v in batch.items()}, seed=0, epoch=0, flip=False, alt_prob=0.5)
    source = [
        int(np.flatnonzero((batch["pixel_values"] == px).all(axis=(1, 2, 3)))[0])
        for px in out["pixel_values"]
    ]
    assert (out["input_ids"][:, 0] % 1000 == source).all()  # each image keeps one of its own two captions


def test_caption_plan_of_the_options():
    from tasks.train.data import CaptionPlan

    assert CaptionPlan.of() == CaptionPlan("caption")
    assert CaptionPlan.of("caption_synthetic").columns == ["caption_synthetic"]
    assert CaptionPlan.of(caption_mix=0.5) == CaptionPlan("caption", "caption_synthetic", 0.5)
    assert CaptionPlan.of("my_captions", 0.25) == CaptionPlan("caption", "my_captions", 0.25)
