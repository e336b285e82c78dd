"""The fixed cost of ingesting a small list: img2dataset's processes spawned cold, or forked from a warm server.

One process ingests ``--lists`` small lists (``--pairs`` synthetic images each, served on loopback, shards of
``--shard-size``) one after another, as a flow, the demo or a test session does, alternating the two ways
img2dataset's logger and download workers can start: ``spawn`` (img2dataset's own: each process imports
img2dataset afresh) and ``fork`` (vlforge's default, ``tasks/ingest/workers.py``: forked from one server that
imported it once; the first ``fork`` list also starts that server). Prints each list's wall time and the median of
each way (without the first list of each, which pays the process's own first-use costs); writes
bench/results/ingest_start.json.

    python bench/ingest_start.py [--lists 8] [--pairs 48] [--shard-size 16]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import typer  # noqa: E402
from benchkit import machine, write_result  # noqa: E402

MODES = ("spawn", "fork")


def main(
    lists: int = typer.Option(8, help="Lists to ingest, alternating spawn and fork."),
    pairs: int = typer.Option(48, help="Images per list."),
    shard_size: int = typer.Option(16, help="Rows per shard."),
) -> None:
    import tasks.ingest.workers as workers
    from tasks.ingest.stage import ingest
    from vlforge.demo.server import ImageServer, write_url_list
    from vlforge.demo.synth import make_pairs
    from vlforge.settings import get_settings

    forked = workers.forked_processes
    work = tempfile.mkdtemp(prefix="vlf-ingest-start-")
    os.environ.update(VLFORGE_STORAGE=f"{work}/store", MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db")
    settings = get_settings()
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    with ImageServer() as server:
        for i in range(lists):
            mode = MODES[i % 2]
            # The spawn side is img2dataset untouched: the download code without the forking wrapper.
            workers.forked_processes = forked if mode == "fork" else contextlib.nullcontext
            items = make_pairs(pairs, 0.0, seed=100 + i, prefix=f"l{i}")
            url_list = write_url_list(f"{work}/list{i}.csv", items, server.add_pairs(items))
            start = time.perf_counter()
            done = ingest(
                url_list, f"s{i}", settings, shard_size=shard_size, allowed_networks=["127.0.0.1/32"]
            )
            seconds[mode].append(time.perf_counter() - start)
            assert sum(r.rows for r in done) == pairs, done
            print(f"list {i} ({mode}): {seconds[mode][-1]:.1f} s", flush=True)
    workers.forked_processes = forked
    result = {
        "lists": lists,
        "pairs": pairs,
        "shard_size": shard_size,
        "seconds": {m: [round(s, 2) for s in v] for m, v in seconds.items()},
        "median_after_first": {
            m: round(statistics.median(v[1:]), 2) for m, v in seconds.items() if len(v) > 1
        },
        "machine": machine(),
    }
    write_result("ingest_start.json", result)


if __name__ == "__main__":
    typer.run(main)
