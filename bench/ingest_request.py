"""Benchmark: CPU of one download worker per image request, img2dataset's own request against vlforge's compliant
one (``tasks.ingest.fetch``), and vlforge's without the per-host gate, without the blocklist, and without both:
serial requests from one thread for ``--images`` synthetic 64 px JPEGs; the image server and the gate (64
connections, 10,000 requests/s per host: loose, as in bench/ingest.py) run in their own spawned processes, so the
figure is this process's CPU (``time.process_time``) per request, the cost a worker pays for each image before
img2dataset resizes it (the gate's table is on this machine: this process maps it and asks it itself, as a
download worker on the driver's machine does). The blocklist is 10,000 random hashes, the opt-out list 1000 entries matching nothing.

    .venv/bin/python bench/ingest_request.py [--images 200] [--reps 5]

Prints the median and the smallest of ``--reps`` passes for each variant; writes bench/results/ingest_request.json.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time

import typer
from benchkit import machine, write_result

VARIANTS = ("img2dataset", "vlforge", "no_gate", "no_blocklist", "neither")


def _serve_images(images: int, queue, stop) -> None:
    from vlforge.demo.server import ImageServer, Response
    from vlforge.demo.synth import make_pairs

    with ImageServer("127.0.0.1") as site:
        queue.put([site.add(f"/img/{p.key}.jpg", Response(p.image)) for p in make_pairs(images, seed=0)])
        stop.wait()


def _serve_gate(queue, stop) -> None:
    from tasks.ingest.politeness import HostGate, serve

    with serve(HostGate(64, 10000.0)) as address:
        queue.put(address)
        stop.wait()


def _policies(work: str, gate) -> dict:
    import numpy as np

    from tasks.ingest.blocklist import publish
    from tasks.ingest.fetch import CrawlPolicy
    from tasks.ingest.optout import load_opt_out_lists

    rng = np.random.default_rng(1)
    with open(f"{work}/blocklist.txt", "w") as f:
        f.writelines(rng.bytes(32).hex() + "\n" for _ in range(10000))
    with open(f"{work}/optout.txt", "w") as f:
        f.writelines(f"optout-{i}.example\n" if i % 2 else f"https://optout-{i}.example/gallery/\n"
                     for i in range(1000))  # fmt: skip
    ref = publish(f"{work}/blocklist.txt", work, 31)
    opt_out = load_opt_out_lists([f"{work}/optout.txt"])
    agent = "vlforge-bench"
    return {
        "vlforge": CrawlPolicy(agent, gate, ref, opt_out=opt_out),
        "no_gate": CrawlPolicy(agent, None, ref, opt_out=opt_out),
        "no_blocklist": CrawlPolicy(agent, gate, None, opt_out=opt_out),
        "neither": CrawlPolicy(agent, None, None, opt_out=opt_out),
    }


def _pass(urls: list[str], policy) -> float:
    """CPU ms per request of one serial pass (img2dataset's function when ``policy`` is None)."""
    import img2dataset.downloader as downloader

    from tasks.ingest.fetch import compliant

    start = time.process_time()
    with compliant(policy):
        for row in enumerate(urls):
            _, stream, error = downloader.download_image_with_retry(row, 10, 2, "vlforge", ["noai"])
            assert stream is not None, error
    return (time.process_time() - start) / len(urls) * 1e3


def main(images: int = 200, reps: int = 5) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    url_queue, gate_queue = spawn.Queue(), spawn.Queue()
    servers = [spawn.Process(target=_serve_images, args=(images, url_queue, stop), daemon=True),
               spawn.Process(target=_serve_gate, args=(gate_queue, stop), daemon=True)]  # fmt: skip
    for server in servers:
        server.start()
    try:
        urls, gate = url_queue.get(timeout=300), gate_queue.get(timeout=300)
        policies = _policies(tempfile.mkdtemp(prefix="vlforge-bench-request-"), gate)
        policies["img2dataset"] = None
        _pass(
            urls[:20], policies["vlforge"]
        )  # first use: the opener, the gate's connection, the blocklist load
        runs = {v: [] for v in VARIANTS}
        for _ in range(reps):  # the variants interleaved, so that a neighbour's burst hits all of them
            for variant in VARIANTS:
                runs[variant].append(_pass(urls, policies[variant]))
    finally:
        stop.set()
        for server in servers:
            server.join(10)
    result = {"images": images, "reps": reps, "cpu_ms_per_request": {}}
    for variant in VARIANTS:
        median, best = statistics.median(runs[variant]), min(runs[variant])
        result["cpu_ms_per_request"][variant] = {"median": median, "min": best, "runs": runs[variant]}
        print(f"{variant:>13}: {median:.3f} ms CPU per request (min {best:.3f})")
    result["machine"] = machine()
    write_result("ingest_request.json", result)


if __name__ == "__main__":
    typer.run(main)
