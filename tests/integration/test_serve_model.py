"""``mlflow models serve -m models:/vlforge-clip@champion --env-manager local`` answers REST requests with a
real image (base64) and caption: embeddings and a score."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest

from tasks.evaluate import Evaluation
from tasks.register import register_model
from tests.integration.servers import mlflow_models_serve, post_json
from vlforge.demo.synth import make_pairs
from vlforge.tracking import PRETRAINED_MODEL, configure, ensure_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def champion(settings, tmp_path):
    """A tiny CLIP registered as models:/vlforge-clip@champion in the test's SQLite registry."""
    from models.clip import build_clip

    pairs = make_pairs(8, seed=21)
    model_dir = build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "final"))
    run_id = configure(settings).create_run(ensure_experiment(settings, "pretrain")).info.run_id
    reg = register_model(
        model_dir,
        name=PRETRAINED_MODEL,
        run_id=run_id,
        evaluation=Evaluation.of("synth@holdout", {"mean_recall": np.full(8, 0.1)}),
        settings=settings,
    )
    assert reg.alias == "champion"
    return pairs


def test_models_serve_answers_with_embeddings_and_score(settings, champion, tmp_path):
    pairs = champion
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri}
    with mlflow_models_serve(f"models:/{PRETRAINED_MODEL}@champion", tmp_path, env) as base:
        both = post_json(
            base + "/invocations",
            {
                "dataframe_split": {
                    "columns": ["image", "text"],
                    "data": [[base64.b64encode(p.image).decode(), p.caption] for p in pairs[:2]],
                }
            },
        )["predictions"]
        assert len(both) == 2
        for row in both:
            assert set(row) == {"image_embedding", "text_embedding", "score"}
            img, txt = np.array(row["image_embedding"]), np.array(row["text_embedding"])
            assert np.linalg.norm(img) == pytest.approx(1.0, abs=1e-5)
            assert np.linalg.norm(txt) == pytest.approx(1.0, abs=1e-5)
            assert row["score"] == pytest.approx(float(img @ txt), abs=1e-5)
        texts_only = post_json(
            base + "/invocations",
            {"dataframe_split": {"columns": ["text"], "data": [[pairs[0].caption]]}},
        )["predictions"]
        assert set(texts_only[0]) == {"text_embedding"}
        assert texts_only[0]["text_embedding"] == pytest.approx(both[0]["text_embedding"], abs=1e-5)
