"""Does curation pay? One full curation experiment through the real stages, DataComp-style (``make experiment``).

A labelled synthetic world is served on 127.0.0.1 and goes through ingest and curate like any URL list: a clean
seed set (which bootstraps the scorer: ``pretrain`` on it), a noisy pool (``--noise`` of its captions name another
colour and another shape) curated with the basic filters only, and a labelled eval set drawn separately. Then
``vlforge experiment curation`` trains the same recipe for the same samples seen on the unfiltered pool, on a CLIP
threshold arm and on a top-fraction arm, with ``--seeds`` seeds each, and prints the table and the verdict.
Writes bench/results/curation_experiment.json.

    python bench/curation_experiment.py [--pool 800] [--noise 0.4] [--seed-pairs 300] [--eval 300] [--seeds 2]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from typing import Annotated

import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "curation_experiment.json")


def main(
    pool: int = 800,
    noise: float = 0.4,
    seed_pairs: int = 300,
    eval: int = 300,
    seeds: int = 2,
    samples_seen: int | None = None,
    storage: Annotated[
        str | None, typer.Option(help="storage root (default: a fresh temporary folder)")
    ] = None,
) -> None:
    os.environ["VLFORGE_STORAGE"] = storage or tempfile.mkdtemp(prefix="vlforge-experiment-")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    from tasks.curate import curate
    from tasks.experiment.curation import CurationExperimentArgs, run_curation_experiment, table_rows
    from tasks.ingest import ingest
    from tasks.train.pretrain import pretrain
    from vlforge.demo.server import ImageServer, write_url_list
    from vlforge.demo.synth import make_pairs
    from vlforge.settings import get_settings

    settings = get_settings()
    lists = os.path.join(settings.storage_uri, "lists")
    os.makedirs(lists, exist_ok=True)
    sets = {
        "seed": make_pairs(seed_pairs, 0.0, seed=101, prefix="seed"),
        "pool": make_pairs(pool, noise, seed=102, prefix="pool"),
        "eval": make_pairs(eval, 0.0, seed=103, prefix="eval"),
    }
    t0 = time.perf_counter()
    server = ImageServer().start()
    try:
        for name, pairs in sets.items():
            path = write_url_list(os.path.join(lists, f"{name}.csv"), pairs, server.add_pairs(pairs))
            ingest(path, f"exp-{name}", settings, allow_private_networks=True, shard_size=500)
            curate(f"exp-{name}", f"exp-{name}", settings)  # the basic filters only: no scorer
    finally:
        server.stop()
    scorer = pretrain("exp-seed", settings, epochs=8)
    prepared = time.perf_counter() - t0
    exp_args = CurationExperimentArgs(
        pool="exp-pool",
        eval="exp-eval",
        scorer=scorer.model_uri,
        seeds=seeds,
        samples_seen=samples_seen,
    )
    t1 = time.perf_counter()
    out = run_curation_experiment(exp_args, settings)
    wall = time.perf_counter() - t1
    for row in table_rows(out):
        print(row)
    print(out["verdict"])
    record = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "pool": pool, "noise": noise, "seed_pairs": seed_pairs, "eval_pairs": eval,
        "seeds": seeds, "prepare_s": round(prepared, 1), "experiment_s": round(wall, 1), "result": out,
    }  # fmt: skip
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(record, fh, indent=2)
    print(f"wall: prepare {prepared:.0f} s, experiment {wall:.0f} s; {RESULTS}")


if __name__ == "__main__":
    typer.run(main)
