"""Published versions every trainer can open: `datasets` with decoded images, WebDataset shards, `hf` folders,
the dataset card, and resumable exports."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import datasets
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from typer.testing import CliRunner

from flows.cli import app
from models.clip import build_clip
from tasks.curate import curate
from tasks.export import ExportError, export_dataset
from tests.helpers import image_size, write_raw_batch
from tests.integration.test_ingest_s3 import s3_endpoint  # noqa: F401 (a fixture)
from vlforge import raw, storage
from vlforge.datasets import VersionWriter, resolve_dataset
from vlforge.demo.synth import make_pairs
from vlforge.errors import DatasetNotFoundError
from vlforge.hfformat import IMAGE_TYPE, image_struct, with_hf_features

runner = CliRunner()


def _source_table(pairs, new_layout: bool) -> pa.Table:
    images = pa.array([p.image for p in pairs], pa.binary())
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(len(pairs))],
            "url": [f"http://127.0.0.1/img/{p.key}.jpg" for p in pairs],
            "caption": [p.caption for p in pairs],
            "image": image_struct(images) if new_layout else images,
            "clip_score": pa.array([0.25] * len(pairs), pa.float32()),
            "raw_batch": ["b1" if new_layout else "b0"] * len(pairs),
        }
    )
    return with_hf_features(table) if new_layout else table


@pytest.fixture
def two_parts(settings):
    """A version of 24 rows in two data parts: the first in the layout published before `datasets.Image`
    (plain binary `image`), the second in the current one; the same keys in both parts (two raw batches)."""
    pairs = make_pairs(24, 0.0, seed=21)
    writer = VersionWriter(settings, "two")
    writer.write_table("data", _source_table(pairs[:10], new_layout=False))
    writer.write_table("data", _source_table(pairs[10:], new_layout=True))
    dv = writer.publish({"counts": {"kept": 24}, "source": "synthetic", "filters": {}})
    return dv, pairs


def _wds_samples(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))


def test_webdataset_export_matches_the_source_rows_and_resumes_after_a_failure(settings, two_parts, tmp_path):
    dv, pairs = two_parts
    source = dv.read_table("data")  # image as encoded bytes, whichever layout each part has
    by_key = {
        f"{b}_{k}": r
        for b, k, r in zip(
            source["raw_batch"].to_pylist(), source["key"].to_pylist(), source.to_pylist(), strict=True
        )
    }
    dest = str(tmp_path / "shards")
    # A run that stops on the second data part (damaged: its image column is gone) after finishing the first
    # part's shards, as a kill would leave it (plus the temp file of a shard being written).
    part1 = dv.part_files("data")[1]
    good = storage.read_bytes(part1)
    damaged = io.BytesIO()
    pq.write_table(pq.read_table(part1).drop_columns(["image"]), damaged)
    storage.write_bytes_atomic(part1, damaged.getvalue())
    with pytest.raises(ExportError, match="has no 'image' column"):
        export_dataset(dv.ref, settings, format="webdataset", to=dest, shard_size=4)
    first = sorted(n for n in os.listdir(dest) if n.endswith(".tar"))
    assert first == ["two-00000.tar", "two-00001.tar", "two-00002.tar"]  # 10 rows of part 0 in 4s
    assert not os.path.exists(os.path.join(dest, "manifest.json"))
    stamps = {n: os.stat(os.path.join(dest, n)).st_mtime_ns for n in first}
    storage.write_bytes_atomic(os.path.join(dest, "two-00003.tar.tmp-dead"), b"half a shard")

    storage.write_bytes_atomic(part1, good)
    res = export_dataset(dv.ref, settings, format="webdataset", to=dest, shard_size=4)
    assert res.resumed == 3 and res.rows == 24 and not res.skipped
    names = sorted(n for n in os.listdir(dest))
    assert names == ["manifest.json"] + [f"two-{i:05d}.tar" for i in range(7)]  # shards never span parts
    assert {n: os.stat(os.path.join(dest, n)).st_mtime_ns for n in first} == stamps  # kept, not rewritten
    manifest = storage.read_json(os.path.join(dest, "manifest.json"))
    assert manifest["source"]["content_hash"] == dv.manifest["content_hash"] and manifest["rows"] == 24
    assert [f["rows"] for f in manifest["files"]] == [4, 4, 2, 4, 4, 4, 2]
    for f in manifest["files"]:
        assert f["sha256"] == hashlib.sha256(storage.read_bytes(os.path.join(dest, f["name"]))).hexdigest()

    samples = _wds_samples(os.path.join(dest, manifest["pattern"]))
    assert len(samples) == 24 and {s["__key__"] for s in samples} == set(by_key)
    for s in samples:
        row = by_key[s["__key__"]]
        assert s["jpg"] == row["image"] and s["txt"].decode() == row["caption"]
        meta = json.loads(s["json"])
        assert meta["url"] == row["url"] and meta["key"] == row["key"] and "image" not in meta
    # the same export again: nothing written
    again = export_dataset(dv.ref, settings, format="webdataset", to=dest, shard_size=4)
    assert again.skipped and again.manifest["content_hash"] == manifest["content_hash"]


def test_hf_export_loads_with_load_from_disk(settings, two_parts, tmp_path):
    dv, pairs = two_parts
    dest = str(tmp_path / "hf")
    result = runner.invoke(app, ["export", dv.ref, "--format", "hf", "--to", dest])
    assert result.exit_code == 0 and "24 rows" in result.output, result.output
    assert sorted(n for n in os.listdir(dest) if n.endswith(".arrow")) == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ]
    ds = datasets.load_from_disk(dest)
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 24
    for row, pair in zip(ds, pairs, strict=True):
        assert row["caption"] == pair.caption and row["image"].size == image_size(pair.image)


def test_export_errors_are_clear(settings, two_parts, tmp_path):
    dv, _ = two_parts
    with pytest.raises(ExportError, match="unknown export format 'zip'"):
        export_dataset(dv.ref, settings, format="zip", to=str(tmp_path / "x"))
    with pytest.raises(DatasetNotFoundError, match="no complete version 'nope'"):
        export_dataset("two@nope", settings, to=str(tmp_path / "x"))
    with pytest.raises(DatasetNotFoundError, match="unknown dataset 'other'"):
        export_dataset("other", settings, to=str(tmp_path / "x"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write to"):
        export_dataset(dv.ref, settings, to=str(blocker / "shards"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_dataset(dv.ref, settings, to=str(foreign))
    export_dataset(dv.ref, settings, to=str(tmp_path / "done"), shard_size=8, track=False)
    with pytest.raises(ExportError, match="already holds a webdataset export"):
        export_dataset(dv.ref, settings, to=str(tmp_path / "done"), shard_size=5)
    result = runner.invoke(app, ["export", dv.ref, "--format", "tar", "--to", str(tmp_path / "y")])
    assert result.exit_code == 2 and "unknown export format 'tar'" in result.output


def _add_columns(shard_uri: str, first_row: int, licences: list[str]) -> None:
    """The columns an ingest carries: the row's place in its URL list, and the list's own licence column."""
    t = pq.read_table(shard_uri)
    t = t.append_column("license", pa.array(licences[: t.num_rows], pa.string()))
    t = t.append_column("vlforge_row", pa.array(range(first_row, first_row + t.num_rows), pa.int64()))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    storage.write_bytes_atomic(shard_uri, buf.getvalue())


@pytest.mark.slow  # curate's passes and an export as Ray tasks (no scoring: the card's scorer line is checked
# in test_curate_registry, which scores anyway)
def test_curated_version_loads_in_datasets_has_a_card_and_exports(settings, ray_local, tmp_path):
    pairs = make_pairs(20, 0.0, seed=17)
    pairs[5] = pairs[4]  # an exact duplicate: one rejected row
    model = build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "clip"))
    url_list = "s3://lists/web-2026-11.parquet"
    uri = write_raw_batch(settings, "web", "b1", pairs, shard_size=10)
    storage.write_json_atomic(
        storage.join(uri, raw.SUCCESS), {"url_list": url_list, "mlflow_run_id": "r-ingest"}
    )
    for i, shard in enumerate(raw.shard_files(uri)):
        _add_columns(shard, 10 * i, ["cc-by-4.0"] * 10)
    res = curate("web", "ds", settings, progress=False)
    dv = res.dataset_version
    assert res.counts["kept"] == 19 and res.counts["duplicate"] == 1

    # data/: datasets' Image layout, no ingest bookkeeping; rejected/ keeps the URL list row
    files = dv.part_files("data")
    assert all(pq.read_schema(f).field("image").type == IMAGE_TYPE for f in files)
    assert all("vlforge_row" not in pq.read_schema(f).names for f in files)
    assert dv.read_table("rejected").column("vlforge_row").to_pylist() in ([4], [5])

    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 19
    by_url = {f"http://127.0.0.1/img/{p.key}.jpg": p for p in pairs}
    for row in ds:
        assert row["image"].size == image_size(by_url[row["url"]].image) == (row["width"], row["height"])

    # the card: Hub front matter, counts, lineage, licences; printed by `vlforge datasets --card`
    card = storage.read_text(storage.join(dv.uri, "README.md"))
    head = yaml.safe_load(card.split("---\n")[1])
    assert head["license"] == "cc-by-4.0" and head["size_categories"] == ["n<1K"]
    assert head["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    assert {"name": "image", "dtype": "image"} in head["dataset_info"]["features"]
    assert url_list in card and "r-ingest" in card and "| duplicate | 1 |" in card and "No scorer" in card
    assert "| cc-by-4.0 | 19 |" in card
    assert dv.manifest["described_by"] == ["README.md"]
    printed = runner.invoke(app, ["datasets", dv.ref, "--card"])
    assert printed.exit_code == 0 and printed.output == card

    # the training reader takes the new layout: Ray Data hands a struct column over as dicts
    from tasks.train.data import TRAIN_COLUMNS, preprocess_batch

    rows = pq.read_table(files[0], columns=TRAIN_COLUMNS).slice(0, 6).to_pylist()
    batch = {c: np.array([r[c] for r in rows], dtype=object) for c in TRAIN_COLUMNS}
    assert preprocess_batch(batch, model_uri=model, eval_fraction=0.0)["pixel_values"].shape[0] == 6

    # export on Ray (one task per part), recorded on the version's MLflow run
    dest = str(tmp_path / "wds")
    export_dataset(dv.ref, settings, to=dest, shard_size=4, use_ray=True)
    manifest = storage.read_json(os.path.join(dest, "manifest.json"))
    captions = {r["url"]: r["caption"] for r in dv.read_table("data").to_pylist()}
    samples = _wds_samples(os.path.join(dest, manifest["pattern"]))
    assert sorted(json.loads(s["json"])["url"] for s in samples) == sorted(captions)
    assert all(s["txt"].decode() == captions[json.loads(s["json"])["url"]] for s in samples)
    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.tags["vlforge.export.webdataset"] == dest
    arts = mlflow.MlflowClient().list_artifacts(res.mlflow_run_id, "exports")
    assert [a.path for a in arts] == [f"exports/webdataset-{manifest['content_hash'][:12]}.json"]
    assert resolve_dataset(settings, dv.ref).manifest["content_hash"] == dv.manifest["content_hash"]


@pytest.mark.integration  # moto's S3 server on loopback
@pytest.mark.usefixtures("s3_endpoint")
def test_webdataset_export_to_s3(settings, two_parts):
    dv, pairs = two_parts
    dest = "s3://vlforge-test/export-19/wds"
    res = export_dataset(dv.ref, settings, to=dest, shard_size=16, track=False)
    assert [f["name"] for f in res.files] == ["two-00000.tar", "two-00001.tar"] and res.rows == 24
    assert storage.list_names(dest) == ["manifest.json", "two-00000.tar", "two-00001.tar"]
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f"{dest}/two-00001.tar"))) as tar:
        captions = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert captions == [p.caption for p in pairs[10:]]
    assert export_dataset(dv.ref, settings, to=dest, shard_size=16, track=False).skipped
