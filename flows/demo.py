"""The end-to-end demo on the embedded defaults: synthetic data served on 127.0.0.1, local storage, MLflow on
SQLite, local Ray, Prefect's ephemeral API.

The curate step needs a CLIP that already knows the data, so the demo bootstraps one: it pretrains the tiny
model on a small clean seed set and registers it (``vlforge-clip@champion``), then scores the noisy pool with
that registry URI. The filter then does something real offline, and the registry is consumed by the pipeline.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field

import pyarrow.compute as pc
from prefect import flow

from flows.params import RefreshParams, TrainParams
from flows.pipeline import refresh_dataset, train
from tasks.train.args import FinetuneArgs, PretrainArgs
from vlforge import defaults, tracking
from vlforge.artifacts import publish
from vlforge.datasets import resolve_dataset
from vlforge.demo.server import ImageServer, write_url_list
from vlforge.demo.synth import make_pairs
from vlforge.settings import get_settings

DEMO_PORT = int(os.environ.get("VLFORGE_DEMO_PORT", "8730"))


@dataclass
class DemoSummary:
    seed_dataset: str
    dataset_version: str
    mismatched_removed: float  # share of deliberately mismatched pairs that the filter removed
    matched_kept: float  # share of matched pairs it kept
    runs: dict[str, str] = field(default_factory=dict)  # stage -> MLflow run id
    models: dict[str, str] = field(default_factory=dict)  # what -> registered model URI


def _start_server() -> ImageServer:
    # A fixed port keeps the URL lists, and so the raw batch ids, identical across demo runs (re-runs are no-ops).
    with contextlib.suppress(OSError):
        return ImageServer(port=DEMO_PORT).start()
    return ImageServer(port=0).start()


def filter_quality(dataset: str) -> tuple[float, float]:
    """(share of mismatched pairs removed, share of matched pairs kept) in the dataset's newest version."""
    dv = resolve_dataset(get_settings(), dataset)
    kept = dv.read_table("data", columns=["truth_matched"]).column("truth_matched")
    rejected = dv.read_table("rejected", columns=["truth_matched", "reason"])
    # Rows whose download failed say nothing about the filter: leave them out of both shares.
    if rejected.num_rows:
        rejected = rejected.filter(pc.invert(pc.starts_with(rejected.column("reason"), "download")))
    rej = rejected.column("truth_matched") if rejected.num_rows else kept.slice(0, 0)
    kept_bad, kept_good = pc.sum(pc.equal(kept, 0)).as_py() or 0, pc.sum(pc.equal(kept, 1)).as_py() or 0
    rej_bad, rej_good = pc.sum(pc.equal(rej, 0)).as_py() or 0, pc.sum(pc.equal(rej, 1)).as_py() or 0
    removed = rej_bad / max(1, rej_bad + kept_bad)
    kept_share = kept_good / max(1, kept_good + rej_good)
    return removed, kept_share


@flow(name="demo", log_prints=True)
def demo(
    seed_size: int = 300,
    pool_size: int = 600,
    mismatch_fraction: float = 0.3,
    top_fraction: float = 0.6,
    seed_epochs: int = 8,
    epochs: int = 3,
    finetune_epochs: int = 3,
) -> dict:
    """Bootstrap a scorer on a clean seed set, curate a noisy pool with it, pretrain and LoRA fine-tune."""
    settings = get_settings()
    lists_dir = os.path.join(
        settings.storage_uri if not settings.storage_is_remote else ".vlforge-demo", "demo"
    )
    os.makedirs(lists_dir, exist_ok=True)
    seed_pairs = make_pairs(seed_size, 0.0, seed=1, prefix="seed")
    pool_pairs = make_pairs(pool_size, mismatch_fraction, seed=2, prefix="pool")
    srv = _start_server()
    try:
        seed_list = write_url_list(f"{lists_dir}/seed.csv", seed_pairs, srv.add_pairs(seed_pairs))
        pool_list = write_url_list(f"{lists_dir}/pool.csv", pool_pairs, srv.add_pairs(pool_pairs))
        common = dict(allow_private_networks=True, shard_size=max(100, pool_size // 2))
        seed_ref = refresh_dataset(
            RefreshParams(
                source="demo-seed",
                location=seed_list,
                dataset="demo-seed",
                scorer=None,
                top_fraction=None,
                **common,
            )
        )
        boot = train(
            TrainParams(dataset="demo-seed", pretraining=PretrainArgs(epochs=seed_epochs), finetune=False)
        )
        pool_ref = refresh_dataset(
            RefreshParams(
                source="demo-pool",
                location=pool_list,
                dataset="demo",
                scorer=defaults.DEFAULT_MODEL_URI,
                top_fraction=top_fraction,
                **common,
            )
        )
    finally:
        srv.stop()
    trained = train(
        TrainParams(
            dataset="demo",
            pretraining=PretrainArgs(init=defaults.DEFAULT_MODEL_URI, epochs=epochs),
            finetuning=FinetuneArgs(epochs=finetune_epochs),
        )
    )
    removed, kept = filter_quality("demo")
    summary = DemoSummary(
        seed_dataset=seed_ref["dataset_version"],
        dataset_version=pool_ref["dataset_version"],
        mismatched_removed=removed,
        matched_kept=kept,
        runs={
            "bootstrap pretrain": boot["pretrain"]["run_id"],
            "curate": pool_ref.get("mlflow_run_id") or "",
            "pretrain": trained["pretrain"]["run_id"],
            "finetune": trained["finetune"]["run_id"],
        },
        models={
            "bootstrap": boot["pretrain"]["model_uri"],
            "pretrained": trained["pretrain"]["model_uri"],
            "pretrained champion": f"models:/{tracking.PRETRAINED_MODEL}@champion",
            "fine-tuned": trained["finetune"]["model_uri"],
            "fine-tuned champion": f"models:/{tracking.LORA_MODEL}@champion",
        },
    )
    publish(
        "demo",
        "vlforge demo",
        [
            f"Dataset version: `{summary.dataset_version}` (seed: `{summary.seed_dataset}`)",
            f"Mismatched pairs removed by the CLIP filter: {removed:.1%}; matched pairs kept: {kept:.1%}",
        ],
        {
            "MLflow runs": [{"stage": k, "run_id": v} for k, v in summary.runs.items()],
            "Models": [{"model": k, "uri": v} for k, v in summary.models.items()],
        },
    )
    return asdict(summary)
