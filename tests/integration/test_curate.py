"""The curate stage end to end on tiny data: Ray scoring, score cache, filters, publish, MLflow."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.clip import build_clip
from tasks.curate import curate
from tests.helpers import write_raw_batch
from vlforge import raw, storage, tracking
from vlforge.datasets import list_versions, resolve_dataset
from vlforge.demo.synth import make_pairs
from vlforge.errors import ModelNotFoundError, SourceNotFoundError


def _break_rows(shard_uri: str) -> None:
    """Row 0: a failed download (as img2dataset writes it); row 1: bytes that are not an image."""
    t = pq.read_table(shard_uri)
    status, jpg, err = (
        t.column("status").to_pylist(),
        t.column("jpg").to_pylist(),
        t.column("error_message").to_pylist(),
    )
    status[0], jpg[0], err[0] = "failed_to_download", None, "HTTP Error 404"
    jpg[1] = b"definitely not a jpeg"
    for name, values, typ in (
        ("status", status, pa.string()),
        ("jpg", jpg, pa.binary()),
        ("error_message", err, pa.string()),
    ):
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, typ))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    storage.write_bytes_atomic(shard_uri, buf.getvalue())


@pytest.fixture
def scorer_dir(tmp_path):
    pairs = make_pairs(40, 0.0, seed=9)
    return build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "scorer"))


def _cache_files(settings, source):
    return storage.glob(storage.join(settings.storage_uri, "scores", source, "*", "*", "*.parquet"))


@pytest.mark.slow  # several Ray scoring passes (actor start-up dominates): ~30 s idle, more on a busy box
def test_curate_scores_on_ray_publishes_and_rescoring_is_incremental(settings, ray_local, scorer_dir):
    pairs = make_pairs(40, 0.25, seed=1)
    write_raw_batch(settings, "web", "b1", pairs, shard_size=20)
    _break_rows(raw.shard_files(raw.batch_uri(settings, "web", "b1"))[0])

    res = curate("web", "ds", settings, scorer=scorer_dir, min_score=-1.0, progress=False)
    assert res.scored_rows == 39 and len(_cache_files(settings, "web")) == 2
    c = res.counts
    assert c["input"] == 40 and c["download_failed"] == 1 and c["decode_failed"] == 1 and c["kept"] == 38

    dv = resolve_dataset(settings, "ds")
    assert dv.version == res.dataset_version.version
    data = dv.read_table("data")
    for col in (
        "key",
        "url",
        "caption",
        "image",
        "width",
        "height",
        "sha256",
        "clip_score",
        "source",
        "raw_batch",
        "truth_matched",
    ):
        assert col in data.column_names, col
    assert data.num_rows == 38 and set(data.column("raw_batch").to_pylist()) == {"b1"}
    rej = dv.read_table("rejected")
    assert "image" not in rej.column_names and "jpg" not in rej.column_names
    assert sorted(rej.column("reason").to_pylist()) == ["decode_failed", "download_failed"]

    # embeddings: clip-retrieval layout, float16, L2-normalised, row-aligned with metadata and data
    emb_root = storage.join(dv.uri, "embeddings")
    img = np.concatenate([np.load(f) for f in sorted(storage.glob(emb_root + "/img_emb/*.npy"))])
    txt = np.concatenate([np.load(f) for f in sorted(storage.glob(emb_root + "/text_emb/*.npy"))])
    meta = pa.concat_tables(
        [pq.read_table(f) for f in sorted(storage.glob(emb_root + "/metadata/*.parquet"))]
    )
    assert img.dtype == np.float16 and img.shape == txt.shape and img.shape[0] == meta.num_rows == 38
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=1e-2)
    np.testing.assert_allclose(
        (img.astype(np.float32) * txt.astype(np.float32)).sum(1),
        meta.column("clip_score").to_numpy(),
        atol=1e-2,
    )

    m = dv.manifest
    assert m["counts"] == c and m["scorer"]["uri"] == scorer_dir and m["filters"]["min_score"] == -1.0
    assert [b["batch"] for b in m["raw_batches"]] == ["b1"] and m["content_hash"] and "data" in m["schema"]

    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.metrics["count.download_failed"] == 1.0 and run.data.params["scorer_uri"] == scorer_dir
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res.mlflow_run_id)}
    assert {"score_histogram.png", "examples.png", "manifest.json"} <= arts
    assert run.inputs.dataset_inputs[0].dataset.name == dv.ref

    # a new raw batch: only its shards are scored
    write_raw_batch(settings, "web", "b2", make_pairs(10, 0.0, seed=2), shard_size=20)
    res2 = curate("web", "ds", settings, scorer=scorer_dir, min_score=-1.0, progress=False)
    assert res2.scored_rows == 10 and len(_cache_files(settings, "web")) == 3
    assert res2.counts["input"] == 50 and len(list_versions(settings, "ds")) == 2

    # same inputs again: nothing to publish; forced: a new version, nothing re-scored
    assert curate("web", "ds", settings, scorer=scorer_dir, min_score=-1.0).skipped
    res3 = curate("web", "ds", settings, scorer=scorer_dir, top_fraction=0.5, force=True, track=False)
    assert res3.scored_rows == 0 and res3.counts["outside_top_fraction"] == 24  # 48 eligible -> keep 24


def test_curate_without_scorer_runs_basic_filters_only(settings):
    pairs = make_pairs(12, 0.0, seed=3)
    pairs[5] = pairs[4]  # an exact duplicate image
    write_raw_batch(settings, "plain", "b1", pairs)
    res = curate("plain", "basic", settings, track=False)
    assert res.counts["duplicate"] == 1 and res.counts["kept"] == 11 and res.scored_rows == 0
    data = res.dataset_version.read_table("data")
    assert data.column("clip_score").null_count == data.num_rows
    assert res.dataset_version.manifest["scorer"] is None


def test_missing_scorer_and_source_fail_clearly(settings, tmp_path):
    write_raw_batch(settings, "web", "b1", make_pairs(4, 0.0, seed=4))
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        curate("web", "ds", settings, scorer=str(tmp_path / "does-not-exist"), min_score=0.1)
    with pytest.raises(ModelNotFoundError, match="vlforge-clip"):
        curate("web", "ds", settings, scorer="models:/vlforge-clip@champion")
    with pytest.raises(SourceNotFoundError, match="vlforge ingest"):
        curate("nowhere", "ds", settings)


@pytest.mark.slow  # two fresh Python processes importing the stack
def test_two_concurrent_curations_publish_two_complete_versions(settings, ray_local):
    write_raw_batch(settings, "web", "b1", make_pairs(30, 0.0, seed=5))
    # The MLflow SQLite schema is created once up front: two processes racing to create it trips alembic.
    tracking.ensure_experiment(settings, "datasets")
    script = textwrap.dedent(
        """
        from tasks.curate import curate
        from vlforge.settings import get_settings
        r = curate("web", "shared", get_settings(), force=True)
        print(r.dataset_version.version)
        """
    )
    # Both on the session's Ray (as two flow runs on one cluster), not each starting a local Ray of its own.
    ray_address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "VLFORGE_STORAGE": settings.storage_uri, "VLFORGE_RAY_ADDRESS": ray_address}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    made = sorted(o[0].strip().splitlines()[-1] for o in outs)
    assert list_versions(settings, "shared") == made
    for v in made:
        dv = resolve_dataset(settings, f"shared@{v}")
        assert dv.read_table("data").num_rows == 30 and dv.manifest["counts"]["kept"] == 30
    assert resolve_dataset(settings, "shared").version == made[-1]
    latest = storage.read_text(storage.join(settings.storage_uri, "datasets", "shared", "LATEST")).strip()
    assert latest == made[-1]


def test_cpu_scorer_plan_uses_every_core_and_leaves_room_for_decoding(ray_local):
    """Without GPUs: one single-threaded actor per core, and the actors never take every logical CPU (the decode
    tasks would pend forever)."""
    from tasks.curate.scoring import MAX_CPU_SCORERS, scorer_plan

    cores = os.cpu_count() or 1
    logical = ray_local.cluster_resources()["CPU"]
    plan = scorer_plan()
    assert plan.gpus_per_actor == 0 and plan.actors == min(cores, MAX_CPU_SCORERS)
    assert plan.threads == max(1, cores // plan.actors)  # 1 up to MAX_CPU_SCORERS cores
    assert plan.actors * plan.cpus_per_actor + plan.decode_cpus <= logical
    assert plan.decode_tasks == max(1, plan.actors // 4)
    one = scorer_plan(num_scorers=1)  # one actor gets all the cores as threads
    assert one.actors == 1 and one.threads == cores and one.cpus_per_actor + one.decode_cpus <= logical
