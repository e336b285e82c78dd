"""Bad input never loses data (issue #26): every command given bad arguments answers with one clear line and exit
status 2, and leaves the storage exactly as it was. Each test drives the CLI as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.helpers import publish_synthetic_dataset, write_raw_batch
from vlforge import storage
from vlforge.datasets import list_versions, resolve_dataset
from vlforge.demo.synth import make_pairs

pytestmark = pytest.mark.integration
runner = CliRunner()


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every file under the storage root with its size and modification time (command logs aside)."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == "logs" or rel.startswith("logs" + os.sep):
            continue
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            found[os.path.join(rel, f)] = (st.st_size, st.st_mtime_ns)
    return found


def refused(args: list[str], root, *expected: str) -> str:
    """Run ``vlforge ARGS``: exit status 2, each ``expected`` text in the one error, no traceback, nothing on
    disk changed. Returns the output."""
    before = snapshot(root)
    result = runner.invoke(app, args)
    out = result.output
    assert result.exit_code == 2, (args, result.exit_code, out)
    assert "Traceback" not in out, out
    for text in expected:
        assert text in out, (args, out)
    assert snapshot(root) == before, f"vlforge {' '.join(args)} changed the storage"
    return out


@pytest.fixture
def store(settings):
    """Storage holding dataset ``d`` with two published versions and one abandoned (killed) version folder."""
    first, _ = publish_synthetic_dataset(settings, "d", n=6)
    second, _ = publish_synthetic_dataset(settings, "d", n=6)
    abandoned = storage.join(settings.storage_uri, "datasets", "d", "20200101T000000000000Z-dead")
    storage.write_text_atomic(storage.join(abandoned, "data", "part-00000.parquet"), "half-written")
    return settings, [first.version, second.version], abandoned


def test_gc_outside_a_dataset_name_removes_nothing(store):
    settings, versions, _ = store
    root = settings.storage_uri
    for args in (["gc", "."], ["gc", ".."], ["gc", f"d/{versions[0]}"], ["gc", "../datasets"], ["gc", "a b"]):
        refused(args, root, "invalid dataset name")
    refused(["gc", f"d@{versions[0]}"], root, "gc takes a dataset name, not a version")
    refused(["gc", "nosuch"], root, "unknown dataset 'nosuch'")


def test_gc_removes_only_abandoned_versions_of_the_named_dataset(store, tmp_path):
    settings, versions, abandoned = store
    other = storage.join(settings.storage_uri, "datasets", "other", "20200101T000000000000Z-beef")
    storage.write_text_atomic(storage.join(other, "data", "part-00000.parquet"), "half-written")
    result = runner.invoke(app, ["gc", "d"])
    assert result.exit_code == 0, result.output
    assert "1 abandoned version(s) removed" in result.output
    assert not storage.exists(abandoned) and storage.exists(other)  # only the named dataset's
    assert list_versions(settings, "d") == versions  # published versions untouched
    for v in versions:
        assert resolve_dataset(settings, f"d@{v}").read_table().num_rows == 6


def test_export_refuses_destinations_inside_the_storage_root_and_escaping_prefixes(store, tmp_path):
    settings, versions, _ = store
    root = settings.storage_uri
    for dest in (f"{root}/datasets/d/wds", root, f"{root}/../{os.path.basename(root)}/x"):
        refused(["export", "d", "--to", dest], root, "inside the storage root")
    outside = tmp_path / "out"
    for prefix in ("../escaped", "a/b", ".hidden"):
        refused(["export", "d", "--to", str(outside), "--prefix", prefix], root, "invalid export prefix name")
    assert not outside.exists() and not (tmp_path / "escaped-00000.tar").exists()
    refused(["export", "d", "--to", str(outside), "--shard-size", "0"], root, "--shard-size")
    assert list_versions(settings, "d") == versions  # no export became a "version"


def test_datasets_names_unknown_datasets_and_versions(store):
    settings, versions, _ = store
    root = settings.storage_uri
    refused(["datasets", "nosuch"], root, "unknown dataset 'nosuch'")
    refused(["datasets", "d@nope"], root, "has no complete version 'nope'")
    refused(["datasets", "x" * 300], root, "invalid dataset name", "(300 characters)")
    out = runner.invoke(app, ["datasets", f"d@{versions[1]}"]).output
    assert f"d@{versions[1]}" in out and f"d@{versions[0]}" not in out


def test_datasets_on_an_unreachable_object_store_is_one_line(settings, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("VLFORGE_STORAGE", "s3://nobucket/prefix")
    monkeypatch.setenv("VLFORGE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 2, result.output
    assert f"the object store at http://127.0.0.1:{port} does not answer" in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) <= 8


@pytest.fixture
def registered(settings):
    """A stand-in registered model ``m`` with two versions, registered without runs (not by vlforge)."""
    from vlforge.tracking import configure

    client = configure(settings)
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=str(settings.storage_uri))
    client.set_registered_model_alias("m", "champion", "1")
    return client


def test_promote_and_lineage_refuse_malformed_uris_and_aliases(settings, registered):
    root = settings.storage_uri
    for uri in ("models:/m/1x", "models:/m/abc", "models:/m/", "models:/m/1/extra"):
        refused(["promote", uri], root, "the version must be a number")
    refused(["promote", "models:/m"], root, "promote needs the version to promote")
    refused(["promote", "models:/m/1", "--alias", ""], root, "invalid alias ''")
    refused(["promote", "models:/m/1", "--alias", "bad alias/.."], root, "invalid alias")
    refused(["promote", "models:/m/1", "--alias", "latest"], root, "reserved by MLflow")
    refused(["lineage", "models:/m/1"], root, "registered without an MLflow run")
    assert str(registered.get_model_version_by_alias("m", "champion").version) == "1"  # nothing moved
    assert not registered.get_model_version("m", "2").aliases


def test_ingest_refuses_bad_names_and_out_of_range_options(settings, tmp_path):
    root = settings.storage_uri
    url_list = tmp_path / "list.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a red circle\n")
    for source in ("has space", "a\\b", "x:y", "../up", "x" * 300):
        refused(["ingest", str(url_list), "--source", source], root, "invalid source name")
    for option, value, text in (
        ("--timeout", "-1", "--timeout must be > 0"),
        ("--timeout", "0", "--timeout must be > 0"),
        ("--image-size", "0", "--image-size must be >= 16"),
        ("--retries", "-1", "--retries must be >= 0"),
        ("--shard-size", "0", "--shard-size must be >= 1"),
        ("--threads", "0", "--threads must be >= 1"),
    ):
        refused(["ingest", str(url_list), "--source", "web", option, value], root, text)


def test_failed_ingests_leave_no_staging_behind_and_escape_binary_bytes(settings, tmp_path):
    root = settings.storage_uri
    empty = tmp_path / "empty.csv"
    empty.write_text("url,caption\n")
    no_caption = tmp_path / "nocap.csv"
    no_caption.write_text("url,text\nhttp://127.0.0.1:9/a.jpg,a red circle\n")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    refused(["ingest", str(empty), "--source", "web"], root, "the list is empty")
    refused(["ingest", str(no_caption), "--source", "web"], root, "missing column(s) 'caption'")
    out = refused(["ingest", str(binary), "--source", "web"], root, "cannot be read")
    assert not any(ch in out for ch in "\x00\x01\x1b\x7f"), "raw control bytes reached the terminal"
    assert not os.path.exists(os.path.join(root, "raw"))


def test_curate_option_errors_name_the_option(store):
    settings, _, _ = store
    write_raw_batch(settings, "src", "b1", make_pairs(8, seed=1))
    root = settings.storage_uri
    base = ["curate", "--source", "src", "--dataset", "d2"]
    refused(
        [*base, "--scorer", "x", "--top-fraction", "1.5"], root, "--top-fraction must be in (0, 1] (got 1.5)"
    )
    refused(
        [*base, "--scorer", "x", "--near-dup-threshold", "2"], root, "--near-dup-threshold must be in (0, 1]"
    )
    refused([*base, "--max-aspect-ratio", "0"], root, "--max-aspect-ratio must be >= 1 (got 0.0)")
    refused([*base, "--language", "zz"], root, "--language 'zz' is not a language code")
    refused(
        [*base, "--min-caption-chars", "2000"],
        root,
        "--min-caption-chars (2000) is above --max-caption-chars",
    )
    refused([*base, "--batch-size", "0"], root, "--batch-size must be >= 1")
    refused(["curate", "--source", "a b", "--dataset", "d2"], root, "invalid source name")
    refused(["curate", "--source", "src", "--dataset", "../d"], root, "invalid dataset name")
    refused(["pretrain", "--dataset", "d", "--name", "a b"], root, "invalid training name")
    refused(["pretrain", "--dataset", "d", "--lr", "-1"], root, "--lr must be > 0 (got -1.0)")
    refused(["finetune", "--dataset", "d", "--lora-r", "0"], root, "--lora-r must be > 0")


@pytest.mark.slow  # Ray: two real curations
def test_curate_refuses_to_publish_an_empty_version_unless_asked(store):
    settings, versions, abandoned = store
    storage.remove(
        abandoned
    )  # a curate of d removes the abandoned versions of d (by design): not this test's
    write_raw_batch(settings, "src", "b1", make_pairs(8, seed=1))
    root = settings.storage_uri
    args = ["curate", "--source", "src", "--dataset", "d", "--min-caption-chars", "900"]
    out = refused(args, root, "the filters kept none of the 8 pairs", "caption_too_short: 8", "--allow-empty")
    assert "published d@" not in out
    assert resolve_dataset(settings, "d").version == versions[-1]  # the latest is still the last real one
    result = runner.invoke(app, [*args, "--allow-empty"])
    assert result.exit_code == 0, result.output
    assert resolve_dataset(settings, "d").manifest["counts"]["kept"] == 0


def _vlforge(args: list[str], settings) -> subprocess.Popen:
    env = dict(os.environ, VLFORGE_STORAGE=settings.storage_uri, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "flows.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command) of every process below ``pid`` now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                names[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append((child, names.get(child, "")))
            todo.append(child)
    return out


@pytest.mark.slow  # a fresh process importing the stack and starting Ray
def test_ctrl_c_during_ray_start_up_exits_130_without_a_crash(settings):
    write_raw_batch(settings, "src", "b1", make_pairs(8, seed=1))
    proc = _vlforge(["curate", "--source", "src", "--dataset", "d"], settings)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # the moment Ray's raylet exists
        if any("raylet" in cmd for _, cmd in _descendants(proc.pid)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, out)
    assert "interrupted" in out and "Traceback" not in out and "Segmentation" not in out, out
    assert list_versions(settings, "d") == []
    time.sleep(2)
    assert not _descendants(proc.pid)  # the local Ray died with its driver


@pytest.mark.slow  # two fresh processes curating at once
def test_two_curates_of_the_same_inputs_publish_one_version(settings):
    write_raw_batch(settings, "src", "b1", make_pairs(30, seed=1))
    procs = [_vlforge(["curate", "--source", "src", "--dataset", "twice"], settings) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("published twice@" in o for o in outs) == 1, outs
    assert sum("nothing new" in o for o in outs) == 1, outs
    versions = list_versions(settings, "twice")
    assert len(versions) == 1
    assert not [
        v for v in os.listdir(os.path.join(settings.storage_uri, "datasets", "twice")) if v[0].isdigit()
    ][1:]
    assert json.loads(json.dumps(resolve_dataset(settings, "twice").manifest["counts"]))["kept"] == 30


def test_ingest_force_redoes_a_batch_ingested_with_a_bad_setting(settings, image_server, tmp_path):
    from tasks.ingest import ingest
    from vlforge.demo.server import write_url_list

    pairs = make_pairs(4, seed=3)
    url_list = write_url_list(str(tmp_path / "list.csv"), pairs, image_server.add_pairs(pairs))
    fast = dict(processes=1, threads=2, timeout=5.0, retries=0, allow_private_networks=True)
    [first] = ingest(url_list, "web", settings, image_size=16, **fast)
    [again] = ingest(url_list, "web", settings, image_size=48, **fast)
    assert again.skipped  # the bad setting sticks without --force ...
    [forced] = ingest(url_list, "web", settings, image_size=48, force=True, **fast)
    assert not forced.skipped and forced.batch_id == first.batch_id and forced.counts == {"success": 4}
    assert _image_sizes(forced.uri) == {(48, 48)}  # ... and is redone with it


def _image_sizes(batch_uri: str) -> set[tuple[int, int]]:
    """The sizes of the images a raw batch stored."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    sizes = set()
    for f in storage.glob(storage.join(batch_uri, "*.parquet")):
        t = pq.read_table(f, columns=["status", "jpg"])
        for status, data in zip(t.column("status").to_pylist(), t.column("jpg").to_pylist(), strict=True):
            if status == "success":
                sizes.add(Image.open(io.BytesIO(data)).size)
    return sizes
