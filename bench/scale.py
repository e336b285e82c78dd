"""Scale benchmark: curate pools of N rows and report the driver's peak memory, the whole process tree's and time.

Pools are built directly in the raw-batch and score-cache layouts (no download, no model inference): img2dataset's
columns with small real JPEG bytes, shards of 10,000 rows, every 50th row an exact duplicate of the one before;
random unit embeddings of dimension 64 (clip-tiny's) or 512 (ViT-B/32's). Each curation runs in a fresh process
(its own local Ray) while this one samples the proportional set size (PSS) of that process and all its
descendants; the driver reports its own peak RSS.

Configurations per N:
- ``plain``: no scorer, exact dedup only (what the issue's single-process baseline measured);
- ``scored``: ``--top-fraction 0.3``, exact dedup and near dedup (threshold 0.95) from the score cache.

``--baseline DIR`` also runs ``plain`` with the code in DIR (for example a ``git worktree`` of the commit before
the distributed curate) side by side. Writes bench/results/scale.json.

    .venv/bin/python bench/scale.py                       # 100k and 1M rows (make bench)
    .venv/bin/python bench/scale.py --full                # + 3M rows, the 1M-row 512-dim run, 10M-row staging
    .venv/bin/python bench/scale.py --rows 100000 --baseline /tmp/vlforge-before
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Annotated

import typer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARD_ROWS = 10_000
SOURCE = "bench"

DRIVER = """
import json, sys, time
t0 = time.perf_counter()
from tasks.curate import curate
from vlforge.settings import get_settings
kw = json.loads(sys.argv[1])
if "filters" in kw:
    from tasks.curate.filters import FilterConfig
    kw["filters"] = FilterConfig(**kw["filters"])
res = curate("bench", "scale", get_settings(), progress=False, track=False, **kw)
wall = time.perf_counter() - t0
# VmHWM, not getrusage's ru_maxrss: on Linux that keeps the parent's RSS at fork/exec (the bench's own, which
# grows with the pool it built), so it cannot tell a driver that stays small.
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print("RESULT " + json.dumps({"wall_s": wall, "driver_peak_rss_mb": hwm,
      "counts": res.counts, "uri": res.dataset_version.uri, "passes_s": res.dataset_version.manifest.get("compute", {}).get("seconds")}))
"""


def _jpegs(n: int = 16) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def build_pool(storage_root: str, rows: int, dim: int, scorer_key: str | None, near_every: int = 0) -> None:
    """Raw batch ``b1`` of ``rows`` rows (+ score caches under ``scorer_key`` when given). ``near_every``: every
    such row's image embedding is a near duplicate (cosine ~0.99) of the row before."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.curate.scoring import write_cache

    jpegs = _jpegs()
    batch = os.path.join(storage_root, "raw", SOURCE, "b1")
    os.makedirs(batch, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        idx = np.arange(start, start + n)
        src = np.where(idx % 50 == 49, idx - 1, idx)  # every 50th row: an exact copy of the row before
        sha = [hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in src]
        keys = [f"{i:09d}" for i in idx]
        table = pa.table(
            {
                "url": [f"http://example.invalid/img/{i}.jpg" for i in src],
                "caption": [f"a photo of thing number {i % 1000} on a plain background" for i in src],
                "key": keys,
                "status": ["success"] * n,
                "error_message": pa.nulls(n, pa.string()),
                "width": pa.array(np.full(n, 64), pa.int32()),
                "height": pa.array(np.full(n, 64), pa.int32()),
                "original_width": pa.array(np.full(n, 64), pa.int32()),
                "original_height": pa.array(np.full(n, 64), pa.int32()),
                "exif": ["{}"] * n,
                "sha256": sha,
                "jpg": pa.array([jpegs[i % len(jpegs)] for i in src], pa.binary()),
            }
        )
        shard_uri = os.path.join(batch, f"{shard:05d}.parquet")
        pq.write_table(table, shard_uri)
        with open(os.path.join(batch, f"{shard:05d}_stats.json"), "w") as fh:
            json.dump({"count": n, "successes": n}, fh)
        if scorer_key:
            emb = rng.normal(size=(n, dim)).astype(np.float32)
            emb[idx % 50 == 49] = emb[np.flatnonzero(idx % 50 == 49) - 1]  # same image, same embedding
            if near_every:
                near = np.flatnonzero(idx % near_every == near_every - 1)
                emb[near] = emb[near - 1] + 0.02 * rng.normal(size=(len(near), dim))
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            txt = rng.normal(size=(n, dim)).astype(np.float32)
            txt /= np.linalg.norm(txt, axis=1, keepdims=True)
            cache = os.path.join(storage_root, "scores", SOURCE, scorer_key, "b1", f"{shard:05d}.parquet")
            write_cache(cache, keys, (emb * txt).sum(1), np.ones(n, bool), emb, txt)
    open(os.path.join(batch, "_SUCCESS"), "w").close()


def _tree_pss_mb(root: int) -> float:
    """PSS of ``root`` and every descendant (shared pages such as Ray's object store counted once)."""
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(pid))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def run_curate(storage_root: str, kwargs: dict, code: str) -> dict:
    env = {**os.environ, "VLFORGE_STORAGE": storage_root, "PYTHONPATH": code, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("VLFORGE_RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(kwargs)],
        env=env,
        cwd=code,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss_mb(proc.pid))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"curate failed ({proc.returncode}):\n{err[-3000:]}")
    res = json.loads(line[len("RESULT ") :])
    res["tree_peak_pss_mb"] = round(peak[0], 1)
    return res


def bench_rows(rows: int, dim: int, configs: list[str], baseline: str | None, scorer_dir: str) -> dict:
    from tasks.curate.scoring import scorer_identity
    from vlforge.settings import Settings

    out = {}
    with tempfile.TemporaryDirectory(prefix=f"vlforge-scale-{rows}-") as work:
        store = os.path.join(work, "store")
        key = scorer_identity(scorer_dir, Settings(storage=store)).key if "scored" in configs else None
        t0 = time.perf_counter()
        build_pool(store, rows, dim, key)
        print(f"  pool of {rows:,} rows (dim {dim}) built in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = []
        if "plain" in configs:
            runs.append(("plain", {}, ROOT))
            if baseline:
                runs.append(("plain_baseline", {}, baseline))
        if "scored" in configs:
            filters = {"near_dup_threshold": 0.95, "top_fraction": 0.3}
            runs.append(("scored", {"scorer": scorer_dir, "filters": filters}, ROOT))
        for name, kw, code in runs:
            res = run_curate(store, kw, code)
            res["rows_per_s"] = round(rows / res["wall_s"], 1)
            res["us_per_row"] = round(1e6 * res["wall_s"] / rows, 2)
            out[name] = res
            print(
                f"  {name:15s} wall {res['wall_s']:7.1f} s  {res['rows_per_s']:>10,.0f} rows/s  driver peak RSS "
                f"{res['driver_peak_rss_mb']:7.0f} MB  tree peak PSS {res['tree_peak_pss_mb']:7.0f} MB  "
                f"kept {res['counts']['kept']:,}  passes {res.get('passes_s')}",
                flush=True,
            )
    return out


def near_agreement(rows: int, cluster_rows: int, scorer_dir: str) -> dict:
    """Clustered near dedup against the all-pairs answer (one cluster) on a pool with planted near duplicates."""
    import pyarrow.parquet as pq

    from tasks.curate.scoring import scorer_identity
    from vlforge.settings import Settings

    def dropped(uri: str) -> set[str]:
        keys = set()
        for f in sorted(os.listdir(os.path.join(uri, "rejected"))):
            t = pq.read_table(os.path.join(uri, "rejected", f), columns=["key", "reason"]).to_pylist()
            keys |= {r["key"] for r in t if r["reason"] == "near_duplicate"}
        return keys

    out = {"rows": rows, "cluster_rows": cluster_rows}
    with tempfile.TemporaryDirectory(prefix="vlforge-scale-near-") as work:
        store = os.path.join(work, "store")
        build_pool(store, rows, 64, scorer_identity(scorer_dir, Settings(storage=store)).key, near_every=10)
        sets = {}
        for name, c in (("all_pairs", max(rows, 1000)), ("clustered", cluster_rows)):
            filters = {"exact_dedup": False, "near_dup_threshold": 0.95, "near_dup_cluster_rows": c}
            res = run_curate(store, {"scorer": scorer_dir, "filters": filters, "force": True}, ROOT)
            sets[name] = dropped(res["uri"])
            out[f"{name}_wall_s"] = round(res["wall_s"], 1)
            out[f"{name}_near_dedup_s"] = (res.get("passes_s") or {}).get("near_dedup")
        ref, got = sets["all_pairs"], sets["clustered"]
        out.update(
            all_pairs_dropped=len(ref),
            clustered_dropped=len(got),
            recall=round(len(ref & got) / max(1, len(ref)), 4),
            extra=len(got - ref),
        )
    print(f"  near dedup, clustered vs all pairs: {out}", flush=True)
    return out


def main(
    rows: Annotated[str, typer.Option(help="pool sizes, comma-separated")] = "100000,1000000",
    full: Annotated[bool, typer.Option(help="also 3M rows, 1M rows at dim 512 and 10M-row staging")] = False,
    configs: Annotated[str, typer.Option(help="comma-separated")] = "plain,scored",
    baseline: Annotated[
        str | None, typer.Option(help="a checkout of the code to compare 'plain' with (side by side)")
    ] = None,
    stage_rows: Annotated[
        int, typer.Option(help="also stage a URL list of this many rows (-1: not even with --full)")
    ] = 0,
    near_rows: Annotated[int, typer.Option(help="pool for the near-dedup agreement (0: skip)")] = 50000,
) -> None:
    args = SimpleNamespace(**locals())  # the options by name, as the code below reads them
    args.rows = [int(r) for r in rows.split(",") if r]
    args.configs = [c for c in configs.split(",") if c]
    rows = sorted(set(args.rows + ([3_000_000] if args.full else [])))
    from models.clip import build_clip

    results = {"machine": _machine(), "rows": {}}
    with tempfile.TemporaryDirectory(prefix="vlforge-scale-model-") as mdir:
        scorer = build_clip("clip-tiny", ["a photo of a thing"]).save(os.path.join(mdir, "scorer"))
        for n in rows:
            print(f"== {n:,} rows", flush=True)
            results["rows"][str(n)] = bench_rows(n, 64, args.configs, args.baseline, scorer)
        if args.near_rows:
            print(f"== near dedup agreement, {args.near_rows:,} rows", flush=True)
            results["near_dedup_agreement"] = near_agreement(args.near_rows, 10_000, scorer)
        if args.full:
            print("== 1,000,000 rows at dim 512", flush=True)
            results["rows"]["1000000@512"] = bench_rows(1_000_000, 512, ["scored"], None, scorer)
    stage_rows = args.stage_rows or (10_000_000 if args.full else 0)
    if stage_rows > 0:
        try:
            from bench.scale_ingest import bench_staging
        except ImportError:
            bench_staging = None
        if bench_staging is not None:
            with tempfile.TemporaryDirectory(prefix="vlforge-scale-stage-") as work:
                results["staging"] = bench_staging(stage_rows, work)
                print(f"== staging {stage_rows:,} rows: {results['staging']}", flush=True)
    _ratios(results)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", "scale.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)
    print(json.dumps(results.get("ratios", {}), indent=2))
    print(f"wrote {path}")


def _ratios(results: dict) -> None:
    """The issue's targets as ratios: largest N against the smallest, and against the baseline code."""
    rows = sorted((int(k), v) for k, v in results["rows"].items() if "@" not in k)
    if len(rows) < 2:
        return
    (n0, small), (n1, big) = rows[0], rows[-1]
    r = {"from_rows": n0, "to_rows": n1}
    for cfg in ("plain", "scored"):
        if cfg in small and cfg in big:
            r[f"{cfg}_driver_rss_ratio"] = round(
                big[cfg]["driver_peak_rss_mb"] / small[cfg]["driver_peak_rss_mb"], 3
            )
            r[f"{cfg}_time_per_row_ratio"] = round(big[cfg]["us_per_row"] / small[cfg]["us_per_row"], 3)
    for n, res in rows:
        if "plain" in res and "plain_baseline" in res:
            r[f"plain_vs_baseline_time_{n}"] = round(
                res["plain"]["wall_s"] / res["plain_baseline"]["wall_s"], 3
            )
    results["ratios"] = r


def _machine() -> dict:
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    typer.run(main)
