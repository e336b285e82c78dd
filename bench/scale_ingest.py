"""Benchmark: peak memory and speed of staging a big URL list (``tasks.ingest.staging.stage_list``), and of
img2dataset's own reader on the staged input.

    .venv/bin/python bench/scale_ingest.py [--rows 10000000] [--formats parquet,csv] [--reader parts,file]

Builds a synthetic list of ``rows`` rows (about 1000 hosts, IP literals so the private-address guard runs without
DNS; a few private hosts, bad schemes, malformed urls and, in the csv, unsplittable lines), stages it in a fresh
subprocess with the guard on and reports that process's peak RSS (``VmHWM``), wall time and rows/s. It also
runs img2dataset's ``Reader`` (what ``img2dataset.download`` does first in the ingest process: read each input file
and cut it into feather shards) on the staged rows, as the ingest hands them over (part files) and as one file,
each in its own subprocess. Writes bench/results/scale_ingest.json. bench/scale.py calls
``bench_staging(rows, workdir)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer

HOSTS = 1000
CHUNK = 500_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child's own peak: VmHWM of its address space. (ru_maxrss is not: exec keeps the high-water mark of the image
# it replaces, which after subprocess's vfork is the parent's, so it would report the bench process's peak.)
PEAK = """
def peak_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
"""

STAGE = (
    PEAK
    + """
import json, sys, time
from tasks.ingest.staging import stage_list
start = time.perf_counter()
from vlforge import netguard
staged = stage_list(sys.argv[1], sys.argv[2], "url", "caption", netguard.NetworkPolicy.of(False))
print(json.dumps({"seconds": time.perf_counter() - start, "rows": staged.rows, "allowed": staged.allowed,
                  "peak_rss_mb": peak_rss_mb()}))
"""
)

READER = (
    PEAK
    + """
import json, os, sys, time, inspect
from img2dataset.reader import Reader
import pyarrow.parquet as pq
stage_dir, tmp, mode = sys.argv[1:4]
start = time.perf_counter()
url_list = os.path.join(stage_dir, "input.parquet")
if mode == "parts":  # what the ingest hands img2dataset: part files of whole shards, written here
    from tasks.ingest.staging import input_parts, load_staged
    url_list = input_parts(load_staged(stage_dir), 10_000)
cols = [c for c in pq.read_schema(os.path.join(stage_dir, "input.parquet")).names if c not in ("url", "caption")]
kwargs = dict(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
              verify_hash_col=None, verify_hash_type=None, save_additional_columns=cols,
              number_sample_per_shard=10_000, done_shards=set(), tmp_path=tmp)
kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(Reader).parameters}
shards = sum(1 for _ in Reader(**kwargs))
print(json.dumps({"seconds": time.perf_counter() - start, "shards": shards, "peak_rss_mb": peak_rss_mb()}))
"""
)


def _chunk_columns(start: int, n: int, rng: np.random.Generator) -> dict[str, pa.Array]:
    """Rows ``start .. start+n``: hosts drawn with a skew (a few big hosts, a long tail), in runs as real lists
    sorted by crawl order tend to be."""
    ids = np.arange(start, start + n)
    host = (rng.zipf(1.3, size=n) - 1) % HOSTS
    host = np.repeat(host[::8], 8)[:n]  # runs of 8 rows from one host
    names = pa.array([f"93.184.{h // 200}.{h % 200 + 1}" for h in range(HOSTS)])
    url = pc.binary_join_element_wise(
        "http://", pc.take(names, pa.array(host)), "/img/", pc.cast(pa.array(ids), pa.string()), ".jpg", ""
    )
    bad = {7: "http://10.0.0.7/private.jpg", 3: "ftp://93.184.0.1/a.jpg", 5: "http://exa mple.com/a.jpg"}
    url = url.to_numpy(zero_copy_only=False)
    for offset, text in bad.items():  # a few refused rows every 250k rows
        url[(ids % 250_000) == offset] = text
    caption = pc.binary_join_element_wise(
        "a synthetic photo number ", pc.cast(pa.array(ids), pa.string()), ""
    )
    return {"url": pa.array(url, pa.string()), "caption": caption, "width_hint": pa.array(ids % 1024)}


def make_lists(
    rows: int, workdir: str, formats: tuple[str, ...] = ("parquet",), seed: int = 0
) -> dict[str, str]:
    """Write the synthetic list as ``list.parquet`` (and ``list.csv``) under ``workdir``, chunk by chunk."""
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {fmt: os.path.join(workdir, f"list.{fmt}") for fmt in formats}
    with contextlib.ExitStack() as stack:
        writer = csv_file = None
        if "csv" in paths:
            csv_file = stack.enter_context(open(paths["csv"], "w"))
            csv_file.write("url,caption,width_hint\n")
        for start in range(0, rows, CHUNK):
            cols = _chunk_columns(start, min(CHUNK, rows - start), rng)
            table = pa.table(cols)
            if "parquet" in paths:
                if writer is None:
                    writer = stack.enter_context(pq.ParquetWriter(paths["parquet"], table.schema))
                writer.write_table(table)
            if csv_file:
                lines = pc.binary_join_element_wise(
                    cols["url"], cols["caption"], pc.cast(cols["width_hint"], pa.string()), ","
                )
                csv_file.write("\n".join(lines.to_pylist()) + "\n")
                csv_file.write("http://93.184.0.1/x.jpg,an,unsplittable,row\n")  # one per chunk
    return paths


def _run(script: str, *args: str, root: str = ROOT) -> dict:
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=root, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"subprocess failed ({done.returncode}): {done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["wall_s"] = wall
    return figures


def bench_staging(
    rows: int,
    workdir: str,
    formats: tuple[str, ...] = ("parquet",),
    reader: tuple[str, ...] = (),
    baseline: str | None = None,
) -> dict:
    """Stage a synthetic ``rows``-row list (each format) in a subprocess; peak RSS, wall time, rows/s. ``reader``:
    also run img2dataset's reader on the staged rows as the ingest hands them over (``"parts"``) and/or as one
    file (``"file"``), each in its own subprocess. ``baseline``: also stage each list with the code of that checkout
    first (``<fmt>_baseline``), and say whether both staged the same rows in the same order."""
    paths = make_lists(rows, workdir, formats)
    out: dict = {"rows": rows, "hosts": HOSTS}
    for fmt, path in paths.items():
        stage_dir = os.path.join(workdir, f"stage-{fmt}")
        if baseline:
            base_dir = os.path.join(workdir, f"stage-{fmt}-baseline")
            out[f"{fmt}_baseline"] = base = _run(STAGE, path, base_dir, root=baseline)
            base["rows_per_s"] = base["rows"] / base["wall_s"]
        fig = _run(STAGE, path, stage_dir)
        if baseline:
            same = pq.read_table(os.path.join(stage_dir, "input.parquet")).equals(
                pq.read_table(os.path.join(base_dir, "input.parquet"))
            )
            fig["same_rows_as_baseline"] = same
        fig["rows_per_s"] = fig["rows"] / fig["wall_s"]
        fig["list_mb"] = os.path.getsize(path) / 2**20
        out[fmt] = fig
        if reader and fmt == "parquet":
            for mode in reader:
                tmp = os.path.join(workdir, f"reader-tmp-{mode}")
                os.makedirs(tmp, exist_ok=True)
                out[f"img2dataset_reader_{mode}"] = _run(READER, stage_dir, tmp, mode)
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(
    rows: int = 10000000,
    formats: str = "parquet,csv",
    reader: Annotated[
        str,
        typer.Option(
            help="img2dataset's reader on the staged rows: as the ingest hands them (parts), as one file (file), none"
        ),
    ] = "parts,file",
    workdir: Annotated[
        str | None, typer.Option(help="keep the lists here (default: a temporary folder)")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="a checkout of the code to stage the same lists with first (side by side)"),
    ] = None,
) -> None:
    args = SimpleNamespace(**locals())  # the options by name, as the code below reads them
    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="vlforge-scale-ingest-")
    readers = tuple(m for m in args.reader.split(",") if m in ("parts", "file"))
    try:
        result = bench_staging(
            args.rows, workdir, tuple(args.formats.split(",")), reader=readers, baseline=args.baseline
        )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for fmt in args.formats.split(","):
        f = result[fmt]
        print(
            f"staging {args.rows:,} rows ({fmt}, {f['list_mb']:.0f} MB): peak RSS {f['peak_rss_mb']:.0f} MB, "
            f"{f['wall_s']:.1f} s, {f['rows_per_s']:,.0f} rows/s, {f['allowed']:,} allowed"
        )
        b = result.get(f"{fmt}_baseline")
        if b:
            print(
                f"  baseline: peak RSS {b['peak_rss_mb']:.0f} MB, {b['wall_s']:.1f} s; this code / baseline: "
                f"RSS {f['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, wall {f['wall_s'] / b['wall_s']:.2f}x; "
                f"same rows in the same order: {f['same_rows_as_baseline']}"
            )
    for mode in readers:
        r = result[f"img2dataset_reader_{mode}"]
        print(
            f"img2dataset reader on the staged rows ({mode}): peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"{r['wall_s']:.1f} s, {r['shards']} shards"
        )
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "scale_ingest.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    typer.run(main)
