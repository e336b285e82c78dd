"""Benchmark: images/s of ``tasks.ingest.ingest`` against raw ``img2dataset.download`` with the same settings on
the same list (synthetic images served by ImageServer on ``--hosts`` loopback addresses 127.0.0.1, 127.0.0.2, ...,
from a separate process, so that serving competes with neither side's driver for one interpreter lock),
alternating runs in one process.

    .venv/bin/python bench/ingest.py [--images 2000] [--rounds 2] [--threads 32] [--shard-size 500] [--hosts 8]
                                     [--warmup 200]

vlforge runs with all of its crawl compliance on: robots.txt read once per site (each site serves one, with a
rule that matches no listed URL), tdmrep.json looked up per site, an opt-out list (``--opt-out-entries`` domains
and prefixes matching no listed URL), the per-host gate over all workers (``--max-requests-per-host-per-s``,
``--max-connections-per-host``: by default loose enough not to bind, so the figure is the machinery's cost, not
the politeness it buys) and a PDQ blocklist of ``--blocklist-hashes`` random hashes every stored image is hashed
against. Both sides store the same images. Both sides are timed end to end (vlforge: listing, staging with the
robots.txt fetches, download, accounting, MLflow run, _SUCCESS; raw: the download call); vlforge's images/s
over its download phase alone (img2dataset's call with the gate served) is printed too, to tell per-image costs
from fixed ones. Writes bench/results/ingest.json.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Annotated

import typer
from benchkit import machine, write_result


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


def _vlforge_run(list_path: str, storage_root: str, opts, compliance: dict) -> float:
    from tasks.ingest import ingest
    from vlforge.settings import get_settings

    settings = get_settings(storage=storage_root)
    start = time.perf_counter()
    [result] = ingest(list_path, "bench", settings, shard_size=opts.shard_size, processes=opts.processes,
                      threads=opts.threads, timeout=opts.timeout, retries=opts.retries,
                      allow_private_networks=True, **compliance)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert set(result.counts) == {"success"}, result.counts  # compliance refused nothing: same work as raw
    _download_phase.append(result.images_per_s)  # img2dataset's call alone, without staging and accounting
    return result.counts.get("success", 0) / elapsed


_download_phase: list[float] = []  # vlforge's images/s over its download phase, one a run


def _compliance_files(work: str, args) -> dict:
    """An opt-out list and a PDQ blocklist that match nothing served, so both sides store the same images."""
    import numpy as np

    rng = np.random.default_rng(1)
    with open(f"{work}/optout.txt", "w") as f:
        for i in range(args.opt_out_entries):
            f.write(f"optout-{i}.example\n" if i % 2 else f"https://optout-{i}.example/gallery/\n")
    with open(f"{work}/blocklist.txt", "w") as f:
        for _ in range(args.blocklist_hashes):
            f.write(rng.bytes(32).hex() + "\n")
    return dict(opt_out_lists=[f"{work}/optout.txt"], blocklist=f"{work}/blocklist.txt",
                max_connections_per_host=args.max_connections_per_host,
                max_requests_per_host_per_s=args.max_requests_per_host_per_s)  # fmt: skip


def _serve(images: int, hosts: int, list_path: str, ready, stop) -> None:
    """The loopback sites (in their own process): every site serves a robots.txt whose rule matches no listed
    URL, the images are dealt to the sites in turn; the URL list is written, ``ready`` set, and the sites serve
    until ``stop`` is set."""
    import contextlib

    from vlforge.demo.server import ImageServer, Response, write_url_list
    from vlforge.demo.synth import make_pairs

    pairs = make_pairs(images, seed=0)
    with contextlib.ExitStack() as stack:
        sites = [stack.enter_context(ImageServer(host=f"127.0.0.{i + 1}")) for i in range(hosts)]
        for site in sites:
            site.add("/robots.txt", Response(b"User-agent: *\nDisallow: /private/\n", "text/plain"))
        urls = [
            sites[i % len(sites)].add(f"/img/{p.key}.jpg", Response(p.image)) for i, p in enumerate(pairs)
        ]
        write_url_list(list_path, pairs, urls)
        ready.set()
        stop.wait()


def main(
    images: int = 2000,
    rounds: int = 2,
    threads: int = 32,
    shard_size: int = 500,
    hosts: Annotated[int, typer.Option(help="loopback sites 127.0.0.1..N serving the images")] = 8,
    warmup: Annotated[int, typer.Option(help="rows of an untimed first run of each side (0: none)")] = 200,
    opt_out_entries: int = 1000,
    blocklist_hashes: int = 10000,
    max_connections_per_host: int = 64,
    max_requests_per_host_per_s: float = 10000.0,
) -> None:
    args = SimpleNamespace(**locals())  # the options by name, as the code below reads them
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from tasks.ingest import DownloadOptions
    from vlforge import tracking
    from vlforge.settings import get_settings

    cores = os.cpu_count() or 1
    opts = DownloadOptions(
        shard_size=args.shard_size, processes=cores, threads=args.threads, timeout=10, retries=2
    )
    work = tempfile.mkdtemp(prefix="vlforge-bench-ingest-")
    # One MLflow database for every vlforge run, created before timing (as a deployed tracking store would be).
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    tracking.ensure_experiment(get_settings(storage=f"{work}/warm"), "ingest")

    compliance = _compliance_files(work, args)
    list_path = f"{work}/list.csv"
    spawn = multiprocessing.get_context("spawn")
    ready, stop = spawn.Event(), spawn.Event()
    server = spawn.Process(target=_serve, args=(args.images, args.hosts, list_path, ready, stop), daemon=True)
    server.start()
    vl, rw = [], []
    try:
        if not ready.wait(600):
            raise RuntimeError("the image server process did not start")
        if args.warmup:
            # One untimed run of each side on the list's first rows: whichever side runs first would otherwise
            # also pay the imports and first-use costs the other side then finds done in this process.
            with open(list_path) as f:
                head = list(itertools.islice(f, args.warmup + 1))  # the header and the first rows
            with open(f"{work}/warmup.csv", "w") as f:
                f.writelines(head)
            _vlforge_run(f"{work}/warmup.csv", f"{work}/vlforge-warmup", opts, compliance)
            _raw_run(f"{work}/warmup.csv", f"{work}/raw-warmup", opts)
        for r in range(args.rounds):
            # ABBA order: neither side always runs first (cold caches, a neighbour's burst of CPU).
            if r % 2 == 0:
                vl.append(_vlforge_run(list_path, f"{work}/vlforge-{r}", opts, compliance))
                rw.append(_raw_run(list_path, f"{work}/raw-{r}", opts))
            else:
                rw.append(_raw_run(list_path, f"{work}/raw-{r}", opts))
                vl.append(_vlforge_run(list_path, f"{work}/vlforge-{r}", opts, compliance))
            print(f"round {r}: vlforge {vl[-1]:.1f} images/s (download phase {_download_phase[-1]:.1f}), "
                  f"img2dataset {rw[-1]:.1f} images/s", flush=True)  # fmt: skip
    finally:
        stop.set()
        server.join(10)

    images_per_s = statistics.median(vl)
    raw_per_s = statistics.median(rw)
    result = {
        "ratio": images_per_s / raw_per_s,
        "images_per_s": images_per_s,
        "images_per_s_per_core": images_per_s / cores,
        "raw_img2dataset_images_per_s": raw_per_s,
        "runs_vlforge": vl,
        "runs_img2dataset": rw,
        "runs_vlforge_download_phase": _download_phase[-len(vl) :] if vl else [],
        "images": args.images,
        "rounds": args.rounds,
        "warmup_rows": args.warmup,
        "cores": cores,
        "processes": opts.processes,
        "threads": opts.threads,
        "shard_size": opts.shard_size,
        "hosts": args.hosts,
        "servers": "one separate process",
        "compliance": {k: v for k, v in compliance.items() if k not in ("opt_out_lists", "blocklist")}
        | {
            "robots_txt": True,
            "opt_out_entries": args.opt_out_entries,
            "blocklist_hashes": args.blocklist_hashes,
        },
    }
    result["machine"] = machine()
    write_result("ingest.json", result)
    print(
        f"ingest: vlforge {images_per_s:.1f} images/s ({images_per_s / cores:.1f}/core), "
        f"img2dataset {raw_per_s:.1f} images/s, ratio {result['ratio']:.3f} (target >= 0.90)"
    )


if __name__ == "__main__":
    typer.run(main)
