"""The curation experiment: on a pool with 40 % wrong captions, both CLIP-filtered arms beat the unfiltered arm at
equal samples seen, on a labelled eval set the arms never trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.experiment.arms import ArmSpec, keep_mask, otsu_threshold, parse_arm
from tests.helpers import publish_synthetic_dataset
from vlforge.errors import VlforgeError


def test_arm_rules():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    assert keep_mask(ArmSpec("t", top_fraction=0.4), scores).tolist() == [False, True, False, True, False]
    assert keep_mask(ArmSpec("t", top_fraction=0.2), scores).tolist() == [False, True, False, False, False]
    assert keep_mask(ArmSpec("m", min_score=0.5), scores).tolist() == [False, True, True, True, False]
    assert keep_mask(ArmSpec("u"), scores).all()
    assert parse_arm("top10=top_fraction:0.1") == ArmSpec("top10", top_fraction=0.1)
    for bad in ("top10", "x=top_fraction:2", "x=min_score:a", "x=size:3", "x=min_score:0.1,top_fraction:0.2"):
        with pytest.raises(VlforgeError):
            parse_arm(bad)
    # Two groups of scores: Otsu's cut falls between them.
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(0.05, 0.02, 400), rng.normal(0.3, 0.03, 600)])
    assert 0.09 < otsu_threshold(two) < 0.24


SAMPLES_SEEN = 1200
CLIP_TINY = dict(recipe="clip-tiny", batch_size=32, lr=3e-3, warmup_steps=10)


@pytest.mark.slow
@pytest.mark.integration
def test_filtered_arms_beat_unfiltered_at_equal_samples_seen(settings, ray_local, tmp_path):
    from mlflow import MlflowClient

    from tasks.experiment.curation import CurationExperimentArgs, run_curation_experiment
    from tasks.train.pretrain import pretrain

    # The scorer: a CLIP trained on a small clean seed set (the demo's bootstrap), registered.
    publish_synthetic_dataset(settings, "seed", n=192, seed=11, prefix="seed")
    # clip-tiny at its own settings (batch 32, lr 3e-3, 10 warmup steps): what the figures below were measured with,
    # and a quarter of the default recipe's steps (the default's shapes are not what this test is about).
    scorer = pretrain("seed", settings, epochs=8, **CLIP_TINY)
    publish_synthetic_dataset(settings, "pool", n=240, mismatch_fraction=0.4, seed=12, prefix="pool")
    publish_synthetic_dataset(settings, "heldout", n=160, seed=13, labels=True, prefix="eval")

    output = tmp_path / "experiment.json"
    # A 240-pair pool is tiny: DataComp's top 30 % keeps 72 pairs, about half the clean ones, too few to learn 16
    # classes from (measured: a tie with unfiltered). The top half keeps ~all the clean pairs and few wrong ones.
    # 1200 samples seen (5 epochs of the pool) suffice: with other data seeds (101-103, 201-203) both filtered arms
    # beat unfiltered by +0.09 to +0.22 zero-shot accuracy, each 95 % interval above 0 (measured).
    args = CurationExperimentArgs(
        pool="pool", eval="heldout", scorer=scorer.model_uri, seeds=1, samples_seen=SAMPLES_SEEN, top_fraction=0.5,
        output=str(output), **CLIP_TINY,
    )  # fmt: skip
    out = run_curation_experiment(args, settings)

    arms = out["arms"]
    assert set(arms) == {"unfiltered", "threshold", "top_fraction"}
    assert arms["unfiltered"]["rows"] == 240 and arms["top_fraction"]["rows"] == 120
    for name, arm in arms.items():
        # Equal compute: samples seen within one epoch of the target, whatever the arm's size.
        assert abs(arm["samples_seen"] - SAMPLES_SEEN) <= arm["rows"], (name, arm["samples_seen"])
        lo, hi = arm["zero_shot_ci"]
        assert lo <= arm["zero_shot_accuracy"] <= hi and len(arm["seeds"]) == 1
    for name in ("threshold", "top_fraction"):
        assert arms[name]["zero_shot_accuracy"] > arms["unfiltered"]["zero_shot_accuracy"], out["verdict"]
        assert out["comparisons"][name]["zero_shot_accuracy"]["difference"] > 0
    assert out["verdict"].startswith("threshold ") and "; top_fraction " in out["verdict"]
    assert json.loads(output.read_text())["arms"].keys() == arms.keys()

    # The arm datasets are real versions whose manifests name the pool and the scorer.
    from vlforge.datasets import resolve_dataset

    top = resolve_dataset(settings, arms["top_fraction"]["dataset"])
    assert top.manifest["experiment"]["pool"].startswith("pool@")
    assert top.manifest["scorer"]["uri"] == scorer.model_uri

    # One parent run in vlforge-experiments, one child per arm and seed, the table and chart as artifacts.
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name("vlforge-experiments")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == out["mlflow_run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["vlforge.arm"] for r in children) == sorted(arms)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.json", "arms.png"}
    assert parent.data.metrics["top_fraction.zero_shot_accuracy"] == pytest.approx(
        arms["top_fraction"]["zero_shot_accuracy"]
    )
