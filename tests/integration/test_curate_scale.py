"""The distributed curate passes against the in-memory reference, resume of an abandoned version, bad input."""

from __future__ import annotations

import io
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.clip import build_clip
from tasks.curate import curate
from tasks.curate.filters import FilterConfig, apply_filters
from tasks.curate.scoring import cache_uri, scorer_identity, write_cache
from tasks.curate.shards import CurationInputError
from tests.helpers import write_raw_batch
from vlforge import raw, storage
from vlforge.datasets import STAGING, abandoned_versions, list_versions, open_version, remove_abandoned
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration]
DIM = 16


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    pairs = make_pairs(20, 0.0, seed=9)
    return build_clip("clip-tiny", [p.caption for p in pairs]).save(
        str(tmp_path_factory.mktemp("m") / "scorer")
    )


def _rewrite(shard_uri: str, **columns) -> None:
    t = pq.read_table(shard_uri)
    for name, values in columns.items():
        typ = t.schema.field(name).type
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, typ))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    storage.write_bytes_atomic(shard_uri, buf.getvalue())


def scored_pool(settings, scorer, source="web", seed=0, rows=(37, 50, 50, 13)):
    """Raw batches plus score caches with hand-made scores (ties), exact duplicates across shards, near
    duplicates, failed downloads and a tiny image. Returns the pool as one table with its scores and
    embeddings, in pool order, for the in-memory reference."""
    rng = np.random.default_rng(seed)
    key = scorer_identity(scorer, settings).key
    n = sum(rows)
    pairs = make_pairs(n, 0.3, seed=seed)
    write_raw_batch(settings, source, "b1", pairs[: rows[0] + rows[1]], shard_size=rows[0])
    write_raw_batch(settings, source, "b2", pairs[rows[0] + rows[1] :], shard_size=rows[2])
    shards = [s for b in ("b1", "b2") for s in raw.shard_files(raw.batch_uri(settings, source, b))]
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    for i in range(0, n - 1, 9):  # near duplicates: a small nudge of an earlier row
        emb[i + 1] = emb[i] + 0.05 * rng.normal(size=DIM)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = np.round(rng.uniform(0.0, 0.4, n), 2).astype(np.float32)  # many ties at two decimals
    scores[1::9] = scores[0:-1:9][
        : len(scores[1::9])
    ]  # a near duplicate scores as its original: both survive
    tables, start = [], 0
    for si, s in enumerate(shards):
        t = pq.read_table(s)
        m = t.num_rows
        sha, status, width = (t.column(c).to_pylist() for c in ("sha256", "status", "original_width"))
        for j in range(0, m, 7):
            sha[j] = f"shared-{si % 2}-{j % 3}"  # exact duplicates, across shards too
        status[m - 1], width[2] = "failed_to_download", 8
        _rewrite(s, sha256=sha, status=status, original_width=width)
        t = pq.read_table(s)
        ok = np.array([x == "success" for x in status])
        rows_ = np.arange(start, start + m)
        write_cache(
            cache_uri(settings, source, key, s.split("/")[-2], s),
            np.array(t.column("key").to_pylist())[ok],
            scores[rows_][ok],
            np.ones(int(ok.sum()), bool),
            emb[rows_][ok],
            emb[rows_][ok],
        )
        t = t.drop_columns(["jpg"]).append_column("decode_ok", pa.array(np.where(ok, True, None)))
        tables.append(t.append_column("raw_batch", pa.array([s.split("/")[-2]] * m)))
        start += m
    pool = pa.concat_tables(tables)
    status = np.array(pool.column("status").to_pylist())
    scores = np.where(status == "success", scores, np.nan).astype(np.float32)
    return pool, scores, emb


def _published(dv) -> dict[tuple[str, str], tuple]:
    """(raw batch, key) -> (kept, reason, rounded value, detail) of a published version."""
    data = dv.read_table("data", ["raw_batch", "key"]).to_pylist()
    out = {(r["raw_batch"], r["key"]): (True, None, None, None) for r in data}
    rej = dv.read_table(
        "rejected", ["raw_batch", "key", "reason", "reason_value", "reason_detail"]
    ).to_pylist()
    for r in rej:
        v = None if r["reason_value"] is None else round(r["reason_value"], 4)
        out[(r["raw_batch"], r["key"])] = (False, r["reason"], v, r["reason_detail"])
    return out


def _reference(pool, config, scores, emb) -> dict[str, tuple]:
    dec = apply_filters(pool, config, scores, emb)
    keys = list(zip(pool.column("raw_batch").to_pylist(), pool.column("key").to_pylist(), strict=True))
    return {
        k: (bool(dec.keep[i]), dec.reason[i], None if v is None else round(v, 4), dec.reason_detail[i])
        for i, (k, v) in enumerate(zip(keys, dec.reason_value, strict=True))
    }


@pytest.mark.slow
def test_distributed_passes_keep_exactly_the_rows_of_the_in_memory_reference(settings, ray_local, scorer_dir):
    pool, scores, emb = scored_pool(settings, scorer_dir)
    config = FilterConfig(top_fraction=0.37, near_dup_threshold=0.95)
    res = curate("web", "ds", settings, scorer=scorer_dir, filters=config, progress=False, track=False)
    assert res.scored_rows == 0  # every shard came from the cache written above
    got, want = _published(res.dataset_version), _reference(pool, config, scores, emb)
    assert got == want
    c = res.counts
    eligible = c["input"] - c["download_failed"] - c["too_small"]
    assert c["outside_top_fraction"] == eligible - int(np.ceil(0.37 * eligible))
    assert c["duplicate"] > 0 and c["near_duplicate"] > 0  # the pool exercises both shuffles
    assert res.dataset_version.manifest["selection"]["near_dup_clusters"] == 1


@pytest.mark.slow
def test_clustered_near_dedup_only_drops_true_near_duplicates(settings, ray_local, scorer_dir):
    """Past ``near_dup_cluster_rows`` the near dedup runs per k-means cluster: every row it drops is a real near
    duplicate of a kept row, and it finds nearly all that the all-pairs reference finds."""
    pool, scores, emb = scored_pool(settings, scorer_dir, seed=3, rows=(700, 700, 700, 400))
    config = FilterConfig(exact_dedup=False, near_dup_threshold=0.95, near_dup_cluster_rows=1000)
    res = curate("web", "near", settings, scorer=scorer_dir, filters=config, progress=False, track=False)
    assert res.dataset_version.manifest["selection"]["near_dup_clusters"] == 3
    got, want = _published(res.dataset_version), _reference(pool, config, scores, emb)
    dropped = {k for k, v in got.items() if v[1] == "near_duplicate"}
    ref = {k for k, v in want.items() if v[1] == "near_duplicate"}
    assert all(got[k][2] > 0.95 for k in dropped)
    kept = {k[1] for k, v in got.items() if v[0]}  # keys (the detail names the winner by key)
    assert all(got[k][3].rsplit("key ", 1)[1] in kept for k in dropped)  # the winner itself was kept
    assert len(dropped & ref) >= 0.9 * len(ref) and len(dropped - ref) <= 0.05 * len(ref)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_an_abandoned_version_is_resumed_and_others_are_removed(settings, ray_local, scorer_dir):
    scored_pool(settings, scorer_dir)
    config = FilterConfig(top_fraction=0.5)
    fresh = curate("web", "ref", settings, scorer=scorer_dir, filters=config, progress=False, track=False)

    # A run of the same inputs killed after two of its four shards: folder, claim and those shards' parts.
    from tasks.curate.run import run_curation
    from tasks.curate.scoring import list_shards
    from tasks.curate.shards import ShardRef
    from tasks.curate.stage import _fingerprint

    info = scorer_identity(scorer_dir, settings)
    shards = list_shards(settings, "web", ["b1", "b2"], info.key)
    refs = [ShardRef(i, s.batch, s.uri, s.cache_uri, info.key) for i, s in enumerate(shards)]
    fingerprint = _fingerprint(["b1", "b2"], info, config)
    stale, _ = open_version(settings, "ds", "other inputs")  # to be abandoned too, for other inputs
    writer, resumed = open_version(settings, "ds", fingerprint)
    assert not resumed
    run_curation(refs, "web", config, writer, settings, progress=False)
    for tag in [f"{i:05d}" for i in range(2, len(refs))]:  # as if killed after the first two shards
        for f in storage.glob(f"{writer.uri}/*/*{tag}.*") + storage.glob(
            f"{writer.uri}/embeddings/*/*{tag}.*"
        ):
            storage.remove(f)
    for w in (stale, writer):  # their process is gone
        claim = storage.read_json(storage.join(w.uri, STAGING))
        storage.write_json_atomic(storage.join(w.uri, STAGING), {**claim, "pid": _dead_pid()})
    written = {p: os.path.getmtime(p) for p in storage.glob(writer.uri + "/data/*.parquet")}
    assert len(written) == 2 and list_versions(settings, "ds") == []

    res = curate("web", "ds", settings, scorer=scorer_dir, filters=config, progress=False, track=False)
    assert res.dataset_version.version == writer.version  # the abandoned folder, completed
    assert all(os.path.getmtime(p) == t for p, t in written.items())  # its finished shards were kept
    assert not storage.exists(stale.uri) and not storage.exists(storage.join(writer.uri, STAGING))
    assert _published(res.dataset_version) == _published(fresh.dataset_version)
    assert (
        res.counts == fresh.counts
        and res.dataset_version.manifest["content_hash"] == fresh.dataset_version.manifest["content_hash"]
    )
    assert abandoned_versions(settings, "ds") == [] and remove_abandoned(settings) == []


def test_gc_removes_abandoned_versions_and_keeps_one_being_written(settings):
    from typer.testing import CliRunner

    from flows.cli import app

    writer, _ = open_version(settings, "live", "f")
    storage.write_text_atomic(storage.join(writer.uri, "data", "part-00000.parquet"), "partial")
    result = CliRunner().invoke(app, ["gc"])
    assert result.exit_code == 0 and "0 abandoned version(s) removed" in result.output  # its writer is alive
    assert storage.exists(writer.uri)
    claim = storage.read_json(storage.join(writer.uri, STAGING))
    storage.write_json_atomic(storage.join(writer.uri, STAGING), {**claim, "pid": _dead_pid()})
    result = CliRunner().invoke(app, ["gc", "live"])
    assert result.exit_code == 0 and f"removed live@{writer.version}" in result.output
    assert not storage.exists(writer.uri) and remove_abandoned(settings) == []


@pytest.mark.slow
def test_bad_pools_fail_clearly_and_publish_nothing(settings, ray_local, scorer_dir, tmp_path):
    scored_pool(settings, scorer_dir)
    first = curate("web", "ds", settings, scorer=scorer_dir, min_score=0.1, progress=False, track=False)
    shards = raw.shard_files(raw.batch_uri(settings, "web", "b2"))

    # A shard whose carried column has another type than the rest of the pool.
    t = pq.read_table(shards[0])
    t = t.set_column(
        t.schema.get_field_index("truth_matched"),
        "truth_matched",
        t.column("truth_matched").cast(pa.string()),
    )
    pq.write_table(t, shards[0])
    with pytest.raises(CurationInputError, match="disagree on column 'truth_matched'") as err:
        curate("web", "ds", settings, scorer=scorer_dir, min_score=0.2, progress=False, track=False)
    assert shards[0] in str(err.value)
    t = t.set_column(
        t.schema.get_field_index("truth_matched"), "truth_matched", t.column("truth_matched").cast(pa.int64())
    )
    pq.write_table(t, shards[0])

    # A score cache that belongs to another scorer.
    key = scorer_identity(scorer_dir, settings).key
    cache = cache_uri(settings, "web", key, "b2", shards[1])
    other = pq.read_table(cache).replace_schema_metadata({b"vlforge.scorer_key": b"some-other-clip"})
    pq.write_table(other, cache)
    with pytest.raises(CurationInputError, match="some-other-clip"):
        curate("web", "ds", settings, scorer=scorer_dir, min_score=0.2, progress=False, track=False)

    # A shard that is not parquet at all.
    with open(shards[1], "wb") as fh:
        fh.write(b"truncated")
    with pytest.raises(CurationInputError, match="cannot be read as parquet"):
        curate("web", "ds", settings, scorer=scorer_dir, min_score=0.3, progress=False, track=False)
    assert list_versions(settings, "ds") == [first.dataset_version.version]
