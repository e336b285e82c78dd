"""Benchmark: images/s of ``tasks.ingest.ingest`` against raw ``img2dataset.download`` with the same settings on
the same list (synthetic images served by ImageServer on loopback), alternating runs in one process.

    .venv/bin/python bench/ingest.py [--images 2000] [--rounds 2] [--threads 32] [--shard-size 500]

Both sides are timed end to end (vlforge: listing, staging, download, accounting, MLflow run, _SUCCESS; raw:
the download call). Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def _raw_run(list_path: str, out: str, opts) -> float:
    import img2dataset

    from tasks.ingest.run import img2dataset_kwargs, worker_environment
    from vlforge.settings import Settings

    kwargs = img2dataset_kwargs(list_path, out, ["truth_matched", "truth_colour", "truth_shape"], opts)
    kwargs["input_format"] = "csv"
    start = time.perf_counter()
    with worker_environment(Settings(storage=out), opts.max_image_area):
        img2dataset.download(**kwargs)
    elapsed = time.perf_counter() - start
    successes = 0
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            with open(os.path.join(out, name)) as f:
                successes += json.load(f)["successes"]
    return successes / elapsed


def _vlforge_run(list_path: str, storage_root: str, opts) -> float:
    from tasks.ingest import ingest
    from vlforge.settings import get_settings

    settings = get_settings(storage=storage_root)
    start = time.perf_counter()
    [result] = ingest(list_path, "bench", settings, shard_size=opts.shard_size, processes=opts.processes,
                      threads=opts.threads, timeout=opts.timeout, retries=opts.retries,
                      allow_private_networks=True)  # fmt: skip
    elapsed = time.perf_counter() - start
    return result.counts.get("success", 0) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from tasks.ingest import DownloadOptions
    from vlforge import tracking
    from vlforge.demo.server import ImageServer, write_url_list
    from vlforge.demo.synth import make_pairs
    from vlforge.settings import get_settings

    cores = os.cpu_count() or 1
    opts = DownloadOptions(
        shard_size=args.shard_size, processes=cores, threads=args.threads, timeout=10, retries=2
    )
    work = tempfile.mkdtemp(prefix="vlforge-bench-ingest-")
    # One MLflow database for every vlforge run, created before timing (as a deployed tracking store would be).
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    tracking.ensure_experiment(get_settings(storage=f"{work}/warm"), "ingest")

    pairs = make_pairs(args.images, seed=0)
    vl, rw = [], []
    with ImageServer() as srv:
        list_path = write_url_list(f"{work}/list.csv", pairs, srv.add_pairs(pairs))
        for r in range(args.rounds):
            # ABBA order: neither side always runs first (cold caches, a neighbour's burst of CPU).
            if r % 2 == 0:
                vl.append(_vlforge_run(list_path, f"{work}/vlforge-{r}", opts))
                rw.append(_raw_run(list_path, f"{work}/raw-{r}", opts))
            else:
                rw.append(_raw_run(list_path, f"{work}/raw-{r}", opts))
                vl.append(_vlforge_run(list_path, f"{work}/vlforge-{r}", opts))
            print(f"round {r}: vlforge {vl[-1]:.1f} images/s, img2dataset {rw[-1]:.1f} images/s", flush=True)

    images_per_s = statistics.median(vl)
    raw_per_s = statistics.median(rw)
    result = {
        "ratio": images_per_s / raw_per_s,
        "images_per_s": images_per_s,
        "images_per_s_per_core": images_per_s / cores,
        "raw_img2dataset_images_per_s": raw_per_s,
        "runs_vlforge": vl,
        "runs_img2dataset": rw,
        "images": args.images,
        "rounds": args.rounds,
        "cores": cores,
        "processes": opts.processes,
        "threads": opts.threads,
        "shard_size": opts.shard_size,
    }
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/ingest.json", "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"ingest: vlforge {images_per_s:.1f} images/s ({images_per_s / cores:.1f}/core), "
        f"img2dataset {raw_per_s:.1f} images/s, ratio {result['ratio']:.3f} (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
