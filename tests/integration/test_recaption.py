"""``vlforge recaption``: a tiny real VLM writes ``caption_synthetic`` for every row of a pool whose captions are
60% uninformative alt text, on Ray Data, published as a new version; a killed recaption resumes part by part;
a CLIP trained on the recaptioned version (``--caption-mix``) shows the captioning VLM in its lineage; the
curation experiment with a trained VLM shows the recaptioned arms beat the unfiltered pool and match filtering."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.recaption import recaption
from tasks.recaption.stage import RecaptionInterrupted
from tests.helpers import publish_pairs
from vlforge import storage, tracking
from vlforge.datasets import STAGING, abandoned_versions, resolve_dataset
from vlforge.demo.synth import HELDOUT_COLOURS, make_pairs

ALT_TEXT = ("IMG_{}.jpg", "click to enlarge", "image", "DSC{}", "untitled", "photo {}")
PROMPT = "Describe the image."


def alt_text_pool(n: int, seed: int = 5):
    """``n`` synthetic pairs, 60% of them with an uninformative alt text instead of a caption."""
    pairs = make_pairs(n, seed=seed, size=32, prefix="pool")
    bad = set(range(0, n, 5)) | set(range(1, n, 5)) | set(range(2, n, 5))  # 3 in 5
    return [
        dataclasses.replace(p, caption=ALT_TEXT[i % len(ALT_TEXT)].format(1000 + i)) if i in bad else p
        for i, p in enumerate(pairs)
    ]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny real LLaVA (untrained): its vision tower is a tiny CLIP's, its language model a 2-layer Llama."""
    from models.clip import build_clip
    from models.vlm import build_vlm, save_vlm

    corpus = [p.caption for p in make_pairs(24, seed=3, size=32)]
    clip = build_clip("clip-tiny", corpus)
    folder = tmp_path_factory.mktemp("vlm")
    return save_vlm(build_vlm("vlm-tiny", clip, corpus), str(folder / "vlm"))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _rows(dv, columns):
    return dv.read_table("data", columns=columns).to_pydict()


@pytest.mark.slow
def test_recaption_writes_a_caption_for_every_row_and_names_its_model(settings, ray_local, vlm_dir):
    from models.vlm import load_vlm
    from models.vlm_eval import generate

    pairs = alt_text_pool(18)
    pool = publish_pairs(settings, "pool", pairs, files=3)
    carried = {
        "rejected/part-00000.parquet": b"rejected rows",
        "embeddings/img_emb/img_emb_00000.npy": b"npy",
    }
    for relpath, data in carried.items():  # what a curated version holds beside data/
        storage.write_bytes_atomic(storage.join(pool.uri, relpath), data)
    r = recaption("pool", settings, model=vlm_dir, max_new_tokens=4, batch_size=6, progress=False)

    dv = r.dataset_version
    assert not r.skipped and dv.name == "pool" and dv.version != pool.version
    assert resolve_dataset(settings, "pool").version == dv.version  # the newest version of the same dataset
    assert (r.rows, r.captioned, r.undecodable) == (18, 18, 0)
    rows = _rows(dv, ["key", "caption", "caption_synthetic"])
    assert rows["key"] == [p.key for p in pairs] and rows["caption"] == [p.caption for p in pairs]
    assert all(isinstance(c, str) and c.strip() for c in rows["caption_synthetic"])
    # The captions are the model's greedy answers, batched as the actors batch them.
    images = [p.image for p in pairs]
    assert rows["caption_synthetic"] == generate(load_vlm(vlm_dir), images, [PROMPT] * 18, 4, batch_size=6)
    names = pq.read_schema(storage.filesystem(dv.part_files("data")[0])[1]).names
    assert names.index("caption_synthetic") == names.index("caption") + 1
    for relpath, data in carried.items():
        assert storage.read_bytes(storage.join(dv.uri, relpath)) == data

    info = dv.manifest["recaption"]
    assert info["captioner"]["uri"] == vlm_dir and info["source_version"] == pool.ref == info["base"]
    assert dv.manifest["derived_from"] == pool.ref and dv.manifest["counts"] == pool.manifest["counts"]
    card = storage.read_text(storage.join(dv.uri, "README.md"))
    assert "## Synthetic captions" in card and vlm_dir in card and "caption_synthetic" in card
    run = tracking.configure(settings).get_run(r.mlflow_run_id)
    assert run.data.params["captioner_uri"] == vlm_dir and run.data.params["source_dataset"] == pool.ref
    assert run.data.tags[tracking.TAG_DATASET_VERSION] == dv.version

    # Recaptioning the newest version (itself a recaption of the same base) with the same model: nothing new.
    again = recaption("pool", settings, model=vlm_dir, max_new_tokens=4, batch_size=6, progress=False)
    assert again.skipped and again.dataset_version.version == dv.version
    # Into another dataset (--to), from the command line: the same captions, the source left as it was.
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["recaption", pool.ref, "--model", vlm_dir, "--max-new-tokens", "4", "--batch-size", "6"]
    result = CliRunner().invoke(app, [*args, "--to", "pool-recaptioned"])
    assert result.exit_code == 0, result.output
    other = resolve_dataset(settings, "pool-recaptioned")
    assert f"published {other.ref}" in result.output and "18 captioned" in result.output
    assert _rows(other, ["caption_synthetic"]) == {"caption_synthetic": rows["caption_synthetic"]}
    assert resolve_dataset(settings, "pool").version == dv.version


@pytest.mark.slow
def test_a_killed_recaption_resumes_without_redoing_finished_parts(settings, ray_local, vlm_dir):
    pairs = alt_text_pool(18, seed=6)
    publish_pairs(settings, "pool", pairs, files=3)
    opts = dict(model=vlm_dir, max_new_tokens=3, batch_size=6, progress=False, track=False)
    with pytest.raises(RecaptionInterrupted):
        recaption("pool", settings, stop_after_parts=1, **opts)  # as if killed after its first part
    [left] = [v for v in storage.list_names(storage.join(settings.storage_uri, "datasets", "pool"))
              if v != resolve_dataset(settings, "pool").version and v != "LATEST"]  # fmt: skip
    folder = storage.join(settings.storage_uri, "datasets", "pool", left)
    written = {p: os.path.getmtime(p) for p in storage.glob(folder + "/data/*.parquet")}
    assert len(written) == 1
    claim = storage.read_json(storage.join(folder, STAGING))  # its process is gone
    storage.write_json_atomic(storage.join(folder, STAGING), {**claim, "pid": _dead_pid()})

    r = recaption("pool", settings, **opts)
    assert r.dataset_version.version == left and r.resumed_parts == 1
    assert r.captioned == 12  # the two parts left, not the finished one
    assert all(os.path.getmtime(p) == t for p, t in written.items())
    rows = _rows(r.dataset_version, ["key", "caption_synthetic"])
    assert rows["key"] == [p.key for p in pairs] and all(rows["caption_synthetic"])
    assert abandoned_versions(settings, "pool") == []
    assert not storage.exists(storage.join(r.dataset_version.uri, "_parts"))


@pytest.mark.slow
def test_clip_trains_on_mixed_synthetic_captions_and_lineage_names_the_captioner(
    settings, ray_local, vlm_dir
):
    """The flywheel's second turn: pool -> VLM (registered) -> recaptioned pool -> next CLIP."""
    import numpy as np

    from tasks.evaluate import Evaluation, Interval
    from tasks.register import register_model
    from tasks.train.pretrain import pretrain
    from vlforge.lineage import walk_back, walk_forward

    pool = publish_pairs(settings, "pool", alt_text_pool(40, seed=7), files=2)
    client = tracking.configure(settings)
    run_id = client.create_run(
        tracking.ensure_experiment(settings, "pretrain"), tags=tracking.dataset_tags(pool)
    ).info.run_id
    zero = Evaluation(pool.ref, 1, {"caption_accuracy": np.zeros(1)}, {"caption_accuracy": Interval(0, 0, 0)},
                      primary="caption_accuracy")  # fmt: skip
    vlm = register_model(
        vlm_dir, name=tracking.VLM_MODEL, run_id=run_id, evaluation=zero, settings=settings, pyfunc="vlm"
    )
    client.set_terminated(run_id)
    r = recaption("pool", settings, model=f"models:/{tracking.VLM_MODEL}@champion", max_new_tokens=3,
                  batch_size=8, progress=False)  # fmt: skip
    assert r.captioner["pinned"] == vlm.uri

    result = pretrain("pool", settings, recipe="clip-tiny", epochs=1, batch_size=8, warmup_steps=1,
                      min_eval_pairs=0, caption_mix=0.5, seed=3)  # fmt: skip
    params = client.get_run(result.run_id).data.params
    assert params["caption_mix"] == "0.5" and params["dataset"] == r.dataset_version.ref

    back = walk_back(result.model_uri, settings)
    assert back.dataset == r.dataset_version.ref and back.captioner_uri == vlm.uri
    assert back.captioner.model == vlm.uri and back.captioner.dataset == pool.ref
    assert any("captions written by:" in line for line in back.lines())
    forward = walk_forward(pool.ref, settings)
    [vlm_use] = forward.models
    assert vlm_use.model == vlm.uri
    assert [d.dataset for d in vlm_use.captioned] == [r.dataset_version.ref]
    assert [m.model for m in vlm_use.captioned[0].models] == [result.model_uri]
    assert [d.dataset for d in forward.recaptioned] == [r.dataset_version.ref]


# The recaptioning experiment on data no benchmark tuned on: the demo's four shapes at 64 px in the held-out palette
# (HELDOUT_COLOURS); bench/recaption_experiment.py chose the captioner and the sizes on the demo's palette
# (--palette demo) and reports the held-out palette (BENCHMARKS.md "Does recaptioning pay?"). DATA_SEED was fixed
# before any run drew from it (7400-7402), so the test's data were not picked by its result.
DATA_SEED = 7400
# The scorer and the VLM's tower, at pretraining's defaults (batch 8, lr 5e-4).
TOWER = dict(recipe="clip-conv-64")
CLIP_TINY = dict(recipe="clip-tiny", batch_size=32, lr=3e-3, warmup_steps=10)  # every arm (at 32 px)
SEED_PAIRS, POOL, EVAL, SAMPLES_SEEN, CLIP_EPOCHS, SIZE = 960, 480, 1000, 2400, 20, 64
MARGIN = -0.06  # "not worse than filtering": the paired interval's lower bound above this


def heldout_pairs(n: int, seed: int, prefix: str):
    from vlforge.demo.synth import DEMO, generate

    return generate(dataclasses.replace(DEMO, colours=HELDOUT_COLOURS, sizes=(SIZE,)), n, seed, prefix=prefix)


@pytest.mark.slow
@pytest.mark.integration
def test_recaptioning_a_60_percent_alt_text_pool_beats_unfiltered_and_matches_filtering(settings, ray_local):
    """A CLIP (clip-conv-64, the scorer and the tower) and a VLM (vlm-tiny's recipe) trained on clean pairs; the
    experiment with ``recaption_model`` on a pool whose captions are 60 % alt text reports the recaptioned, mixed
    and recaption_rejects arms with intervals at equal samples seen, and on held-out labelled eval data the better
    of them beats ``unfiltered`` (paired 95 % interval above 0) and is not worse than the better filtering arm by
    more than ``MARGIN``. Seeded and in process: the same every run.

    Measured (BENCHMARKS.md "A captioner trained on twice the pool's clean rows"; 960 seed pairs, captions naming
    colour and shape 0.91-0.95): on this data recaptioned +0.155 over unfiltered and -0.013 [-0.049, +0.024]
    against top_fraction. On the eight other held-out seeds measured the lower bound was -0.026 to +0.016 on seven
    and -0.061 on one (7700, past MARGIN by 0.001), so on other data the second assertion can still fail; with 480
    seed pairs (captions 0.59-0.71) it failed on two of five."""
    from tasks.experiment.curation import CurationExperimentArgs, run_curation_experiment
    from tasks.train.pretrain import pretrain
    from vlforge.demo.synth import with_alt_text

    publish_pairs(settings, "seed", heldout_pairs(SEED_PAIRS, DATA_SEED, "seed"))
    pool = with_alt_text(heldout_pairs(POOL, DATA_SEED + 1, "pool"), 0.6, seed=DATA_SEED + 1)
    assert sum(not p.matched for p in pool) == round(0.6 * POOL)
    publish_pairs(settings, "pool", pool)
    publish_pairs(settings, "heldout", heldout_pairs(EVAL, DATA_SEED + 2, "eval"), labels=True)
    common = dict(eval_fraction=0.0, min_eval_pairs=0, register_model=False)
    clip = pretrain("seed", settings, epochs=CLIP_EPOCHS, **TOWER, **common)  # the scorer and the VLM's tower
    vlm = pretrain("seed", settings, recipe="vlm-tiny", vision_model=clip.model_dir, **common)
    args = CurationExperimentArgs(
        pool="pool", eval="heldout", scorer=clip.model_dir, recaption_model=vlm.model_dir, seeds=1,
        samples_seen=SAMPLES_SEEN, top_fraction=0.5, **CLIP_TINY,
    )  # fmt: skip
    out = run_curation_experiment(args, settings)

    arms = out["arms"]
    assert list(arms) == [
        "unfiltered",
        "threshold",
        "top_fraction",
        "recaptioned",
        "mixed",
        "recaption_rejects",
    ]
    recaptioned = resolve_dataset(settings, arms["recaptioned"]["dataset"])
    assert arms["mixed"]["dataset"] == recaptioned.ref and recaptioned.name == "pool-recaptioned"
    assert recaptioned.manifest["recaption"]["captioner"]["uri"] == vlm.model_dir
    synthetic = _rows(recaptioned, ["caption_synthetic"])["caption_synthetic"]
    assert len(synthetic) == POOL and all(c.strip() for c in synthetic)  # a caption for every row

    # recaption_rejects: the threshold arm's rows keep their caption, the rows it drops take the VLM's
    merged = resolve_dataset(settings, arms["recaption_rejects"]["dataset"])
    assert merged.manifest["experiment"]["pool"] == recaptioned.ref  # lineage: pool, recaptioned, this arm
    rows = _rows(merged, ["key", "caption", "caption_synthetic", "caption_merged", "truth_matched"])
    kept = set(_rows(resolve_dataset(settings, arms["threshold"]["dataset"]), ["key"])["key"])
    expected = [c if k in kept else s for k, c, s in zip(rows["key"], rows["caption"], rows["caption_synthetic"],
                                                         strict=True)]  # fmt: skip
    assert rows["caption_merged"] == expected and 0 < len(kept) < POOL
    assert arms["recaption_rejects"]["synthetic_share"] == pytest.approx(1 - len(kept) / POOL)
    # what the filter rewrites is mostly the alt text (Otsu's cut keeps some alt text too: 77 % rewritten here)
    rewritten = {t: [k not in kept for k, m in zip(rows["key"], rows["truth_matched"], strict=True) if m == t]
                 for t in (0, 1)}  # fmt: skip
    assert len(rewritten[0]) == round(0.6 * POOL) and np.mean(rewritten[0]) > 0.5 > np.mean(rewritten[1])
    for name in ("recaptioned", "mixed", "recaption_rejects"):
        arm = arms[name]
        assert arm["rows"] == POOL and arm["samples_seen"] == arms["unfiltered"]["samples_seen"]
        lo, hi = arm["zero_shot_ci"]
        assert lo <= arm["zero_shot_accuracy"] <= hi
        assert set(out["comparisons"][name]) == {"zero_shot_accuracy", "recall_at_1", "recall_at_5"}
        assert f"; {name} " in out["verdict"]
    assert "best arm: " in out["verdict"] and "the better recaptioned arm (" in out["verdict"]
    runs = tracking.configure(settings).search_runs(
        [tracking.ensure_experiment(settings, "experiments")], "tags.`vlforge.arm` = 'mixed'"
    )
    assert [r.data.params["caption_mix"] for r in runs] == ["0.5"]
    assert [r.data.params["caption_col"] for r in runs] == ["caption_synthetic"]

    # The claim: the better recaptioned arm beats unfiltered beyond noise and loses at most MARGIN to filtering.
    vs = out["recaption_vs_filtering"]
    best = vs["recaptioned_arm"]
    assert best in ("recaptioned", "mixed", "recaption_rejects") and vs["filtering_arm"] in (
        "threshold",
        "top_fraction",
    )
    assert (
        set(vs["each"]) == {"recaptioned", "mixed", "recaption_rejects"}
        and vs["each"][best] == vs["zero_shot_accuracy"]
    )
    beats = out["comparisons"][best]["zero_shot_accuracy"]
    assert beats["difference"] > 0 and beats["ci_low"] > 0, out["verdict"]
    assert vs["zero_shot_accuracy"]["ci_low"] > MARGIN, out["verdict"]
