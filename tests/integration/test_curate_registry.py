"""A scorer addressed by an MLflow registry URI (models:/vlforge-clip/1)."""

from __future__ import annotations

import mlflow
import pytest

from models.clip import build_clip
from tasks.curate import curate
from tasks.curate.card import read_card
from tests.helpers import write_raw_batch
from vlforge import tracking
from vlforge.demo.synth import make_pairs


class _Folder(mlflow.pyfunc.PythonModel):
    """A trivial pyfunc whose only job here is to carry the save_pretrained folder as artifact "model"."""

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.slow  # one Ray scoring pass + MLflow model logging
def test_curate_with_a_registry_uri_scorer(settings, ray_local, tmp_path):
    pairs = make_pairs(16, 0.0, seed=7)
    folder = build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "clip"))
    tracking.configure(settings)
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(settings, "pretrain")):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=_Folder(),
            artifacts={"model": folder},
            registered_model_name="vlforge-clip",
        )
    write_raw_batch(settings, "web", "b1", pairs)
    res = curate("web", "ds", settings, scorer="models:/vlforge-clip/1", min_score=-1.0, progress=False)
    scorer = res.dataset_version.manifest["scorer"]
    assert (
        scorer["name"] == "vlforge-clip"
        and scorer["version"] == "1"
        and scorer["uri"] == "models:/vlforge-clip/1"
    )
    assert res.scored_rows == 16 and res.counts["kept"] == 16
    assert mlflow.get_run(res.mlflow_run_id).data.params["scorer_version"] == "1"
    card = read_card(res.dataset_version)  # the card names the scorer's registered version
    assert "CLIP scorer `models:/vlforge-clip/1` (registered model vlforge-clip, version 1)" in card
