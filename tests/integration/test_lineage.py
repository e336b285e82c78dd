"""Lineage of the flywheel: a model trained on a pool that a registered scorer curated shows the pool's URL list,
the scorer, and the scorer's own chain back to the seed URL list; forward from the seed dataset the same loop.

The raw batches, dataset versions and their MLflow runs come from the real stages (ingest from a loopback image
server, curate on Ray, the second one with the registered scorer); the training runs are made as the training
driver makes them (dataset tags, base model tag) around a tiny untrained CLIP, registered by ``register_model``."""

from __future__ import annotations

import json

import pytest

from tasks.curate import curate
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.register import register_model
from tasks.train.data import read_eval_data
from vlforge import tracking
from vlforge.demo.server import write_url_list
from vlforge.demo.synth import make_pairs
from vlforge.lineage import walk_back, walk_forward

pytestmark = pytest.mark.integration

FAST = dict(processes=1, threads=4, timeout=2.0, retries=1, allow_private_networks=True)


def train_and_register(settings, dv, model_dir, name=tracking.PRETRAINED_MODEL, base=None):
    """A training run tagged as the driver tags it, and the model registered from it."""
    from models.clip import load_clip

    client = tracking.configure(settings)
    tags = {**tracking.dataset_tags(dv), **({tracking.TAG_BASE_MODEL: base} if base else {})}
    run_id = client.create_run(tracking.ensure_experiment(settings, "pretrain"), tags=tags).info.run_id
    evaluation = evaluate(load_clip(model_dir), read_eval_data(dv.ref, settings), dv.ref)
    reg = register_model(
        model_dir, name=name, run_id=run_id, evaluation=evaluation, settings=settings, base_model=base
    )
    client.set_terminated(run_id)
    return reg.uri


@pytest.mark.slow  # two ingests, two curations on Ray, three registrations
def test_lineage_shows_url_lists_and_the_scorer_with_its_own_chain(
    settings, image_server, ray_local, tmp_path
):
    from typer.testing import CliRunner

    from flows.cli import app
    from models.clip import build_clip

    seed_pairs = make_pairs(12, 0.0, seed=1, prefix="seed")
    pool_pairs = make_pairs(12, 0.3, seed=2, prefix="pool")
    model_dir = build_clip("clip-tiny", [p.caption for p in seed_pairs + pool_pairs]).save(
        str(tmp_path / "m")
    )
    seed_list = write_url_list(str(tmp_path / "seed.csv"), seed_pairs, image_server.add_pairs(seed_pairs))
    pool_list = write_url_list(str(tmp_path / "pool.csv"), pool_pairs, image_server.add_pairs(pool_pairs))

    ingest(seed_list, "seed", settings, **FAST)
    seed = curate("seed", "seed", settings, progress=False).dataset_version
    scorer = train_and_register(settings, seed, model_dir)  # models:/vlforge-clip/1
    ingest(pool_list, "pool", settings, **FAST)
    pool = curate("pool", "pool", settings, scorer=scorer, top_fraction=0.6, progress=False).dataset_version
    pretrained = train_and_register(settings, pool, model_dir)
    lora = train_and_register(settings, pool, model_dir, name=tracking.LORA_MODEL, base=pretrained)

    back = walk_back(f"models:/{tracking.LORA_MODEL}@champion", settings)
    assert (back.model, back.dataset) == (lora, pool.ref)
    assert [u.rsplit("/", 1)[-1] for u in back.url_lists] == ["pool.csv"]
    assert back.scorer_uri == scorer and back.scorer.model == scorer
    assert back.scorer.dataset == seed.ref
    assert [u.rsplit("/", 1)[-1] for u in back.scorer.url_lists] == ["seed.csv"]
    assert back.scorer.scorer is None and back.scorer.scorer_uri is None  # the seed was not scored
    assert back.base.model == pretrained and back.base.scorer.model == scorer

    forward = walk_forward(seed.ref, settings)
    assert [m.model for m in forward.models] == [scorer]
    [scored] = forward.models[0].scored
    assert scored.dataset == pool.ref
    assert {m.model for m in scored.models} == {pretrained, lora}
    [pretrained_use] = [m for m in scored.models if m.model == pretrained]
    assert [m.model for m in pretrained_use.derived] == [lora]

    env = {"VLFORGE_STORAGE": settings.storage_uri}
    text = CliRunner().invoke(app, ["lineage", lora], env=env)
    assert text.exit_code == 0, text.output
    assert f"url list {pool_list}" in text.output and f"url list {seed_list}" in text.output
    assert "curated by scorer:" in text.output and scorer in text.output
    as_json = CliRunner().invoke(app, ["lineage", lora, "--json"], env=env)
    assert json.loads(as_json.output) == back.to_dict()
    fwd = CliRunner().invoke(app, ["lineage", seed.ref, "--json"], env=env)
    assert json.loads(fwd.output) == forward.to_dict()


def test_a_cycle_in_the_records_stops_the_walk(settings):
    """A scorer whose own training data names itself as the scorer (records edited by hand): both walks end."""
    import mlflow

    from vlforge.datasets import VersionWriter

    writer = VersionWriter(settings, "loop")
    dv = writer.publish({"counts": {"kept": 0}, "scorer": {"uri": "x", "name": "looped", "version": "1"}})
    client = tracking.configure(settings)
    run = client.create_run(tracking.ensure_experiment(settings, "pretrain"), tags=tracking.dataset_tags(dv))
    client.create_registered_model("looped")
    client.create_model_version("looped", "file:///nowhere", run_id=run.info.run_id)
    with mlflow.start_run(
        experiment_id=tracking.ensure_experiment(settings, "datasets")
    ):  # as curate logs it
        mlflow.set_tags(tracking.dataset_tags(dv))
        mlflow.log_params({"scorer_name": "looped", "scorer_version": "1"})

    back = walk_back("models:/looped/1", settings)
    assert back.scorer.model == "models:/looped/1" and back.scorer.stopped.startswith("cycle")
    forward = walk_forward(dv.ref, settings)
    [model] = forward.models
    assert model.scored[0].dataset == dv.ref and model.scored[0].stopped.startswith("cycle")
