"""The end-to-end demo on the embedded defaults: synthetic data served on 127.0.0.1, local storage, MLflow on
SQLite, local Ray, Prefect's ephemeral API.

The curate step needs a CLIP that already knows the data, so the demo bootstraps one: it pretrains the default
recipe on a small clean seed set and registers it (``vlforge-clip``, the first version: champion), then scores the
noisy pool with that registry URI and pretrains on the curated pool from it. Every CLIP of that line is judged on
one labelled eval set (``demo-eval``); the curated model becomes champion only if it beats the bootstrap model
there beyond noise (it also trains more: from the bootstrap, ``epochs`` more on top of its ``seed_epochs``, so
that comparison mixes curation with compute, and the summary says so; ``vlforge experiment curation`` isolates
curation). The LoRA fine-tune adapts the champion to a domain it has never seen (the same classes on dark,
noisy backgrounds: ``demo-domain``) and is promoted only if it beats its base on that domain and is shown to keep
the general eval set within the margin (the lower 95% bound of its difference above minus the margin). With ``vlm`` (the default), the VLM leg follows: a LLaVA-style ``vlm-tiny`` on the
champion CLIP's vision tower, stage 1 on the curated pool's captions (``vlforge-vlm``), stage 2 instruction-tuned
with LoRA on "What colour is the shape?" rows ingested from their own URL list (``demo-instruct``,
``vlforge-vlm-lora``), promoted only if it beats its stage-1 base on held-out instructions; each with its
blank-image baseline. The summary prints each model's figures with 95% intervals and the registry's decisions
with their reasons, whichever way they went.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field

import pyarrow.compute as pc
from prefect import flow

from flows.params import DemoParams, RefreshParams, TrainParams
from flows.pipeline import refresh_dataset, train
from tasks.curate.filters import FilterConfig
from tasks.ingest.args import IngestArgs
from tasks.train.args import FinetuneArgs, PretrainArgs, VlmFinetuneArgs, VlmPretrainArgs
from vlforge import defaults, tracking
from vlforge.artifacts import publish
from vlforge.datasets import resolve_dataset
from vlforge.demo.server import ImageServer, write_url_list
from vlforge.demo.synth import DESCRIBE, INSTRUCTIONS, class_prompts, make_pairs
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
    eval_dataset: str = ""  # the labelled set every CLIP of the line is judged on
    domain_dataset: str = ""  # the fine-tune's domain
    instruct_dataset: str = ""  # the VLM's instruction set (stage 2)
    aliases: dict[str, str | None] = field(default_factory=dict)  # what -> alias the registry gave it
    decisions: dict[str, list[str]] = field(default_factory=dict)  # what -> the decision and its comparisons
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # what -> eval metrics with intervals
    notes: list[str] = field(default_factory=list)  # what the decisions do not show by themselves


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
def demo(params: DemoParams | None = None) -> dict:
    """Bootstrap a scorer on a clean seed set, curate a noisy pool with it, pretrain on the curated pool, LoRA
    fine-tune to a new domain; every model judged with intervals, promoted only on evidence. ``params``: the
    sizes and epochs (:class:`flows.params.DemoParams`; default its defaults)."""
    p = params or DemoParams()
    seed_size, pool_size, eval_size, domain_size = p.seed_size, p.pool_size, p.eval_size, p.domain_size
    seed_epochs, epochs, finetune_epochs, vlm = p.seed_epochs, p.epochs, p.finetune_epochs, p.vlm
    settings = get_settings()
    lists_dir = os.path.join(
        settings.storage_uri if not settings.storage_is_remote else ".vlforge-demo", "demo"
    )
    os.makedirs(lists_dir, exist_ok=True)
    sets = {
        "seed": make_pairs(seed_size, 0.0, seed=1, prefix="seed"),
        "pool": make_pairs(pool_size, p.mismatch_fraction, seed=2, prefix="pool"),
        "eval": make_pairs(eval_size, 0.0, seed=3, prefix="eval"),
        "domain": make_pairs(domain_size, 0.0, seed=4, prefix="domain", domain="noisy"),
        **({"instruct": make_pairs(p.instruct_size, 0.0, seed=5, prefix="instruct")} if vlm else {}),
    }
    prompts = class_prompts()
    srv = _start_server()
    refs: dict[str, dict] = {}
    try:
        lists = {
            k: write_url_list(
                f"{lists_dir}/{k}.csv",
                v,
                srv.add_pairs(v),
                (INSTRUCTIONS[0], DESCRIBE) if k == "instruct" else (),
            )
            for k, v in sets.items()
        }
        # The demo's own loopback server: no site to be polite to, so requests are not paced per host.
        download = IngestArgs(allow_private_networks=True, shard_size=max(100, pool_size // 2),
                              max_requests_per_host_per_s=10_000.0, max_connections_per_host=64)  # fmt: skip
        unscored = FilterConfig()  # the clean sets: basic filters, no CLIP score rule
        for what in [k for k in sets if k != "pool"]:
            refs[what] = refresh_dataset(
                RefreshParams(source=f"demo-{what}", location=lists[what], dataset=f"demo-{what}", scorer=None,
                              filters=unscored, ingest=download)
            )  # fmt: skip
        judged = dict(eval_dataset="demo-eval", class_prompts=prompts, min_eval_pairs=0)
        boot = train(
            TrainParams(
                dataset="demo-seed", pretraining=PretrainArgs(epochs=seed_epochs, **judged), finetune=False
            )
        )
        refs["pool"] = refresh_dataset(
            RefreshParams(source="demo-pool", location=lists["pool"], dataset="demo",
                          scorer=defaults.DEFAULT_MODEL_URI, filters=FilterConfig(top_fraction=p.top_fraction),
                          ingest=download)
        )  # fmt: skip
    finally:
        srv.stop()
    trained = train(
        TrainParams(
            dataset="demo",
            pretraining=PretrainArgs(init=defaults.DEFAULT_MODEL_URI, epochs=epochs, **judged),
            finetune_dataset="demo-domain",
            # lr 2e-3, not the fine-tune default 5e-5 (chosen to pass the gate on a new domain without forgetting,
            # BENCHMARKS.md "LoRA defaults"): at the demo's few epochs the default barely moves the fine-tune on its
            # domain; 2e-3 moves it further while staying within the margin on demo-eval, though whether it beats
            # its base beyond noise varies with the demo's sizes (BENCHMARKS.md "End to end"; tests/e2e/test_demo.py
            # asserts today's decision, challenger). The gate judges it on both.
            finetuning=FinetuneArgs(
                epochs=finetune_epochs, lr=2e-3, class_prompts=prompts, general_eval="demo-eval"
            ),
        )
    )
    stages = {
        "bootstrap": boot["pretrain"],
        "pretrained": trained["pretrain"],
        "fine-tuned": trained["finetune"],
    }
    runs = {
        "bootstrap pretrain": boot["pretrain"]["run_id"],
        "curate": refs["pool"].get("mlflow_run_id") or "",
        "pretrain": trained["pretrain"]["run_id"],
        "finetune": trained["finetune"]["run_id"],
    }
    if vlm:
        # Stage 1 on the curated pool's captions with the champion CLIP as the vision tower (the flywheel: the
        # CLIP that curated the data sees for the VLM), stage 2 on the instruction set.
        vlms = train(vlm_train_params(p.vlm_epochs, p.vlm_finetune_epochs))
        stages |= {"VLM": vlms["vlm_pretrain"], "VLM instruction-tuned": vlms["vlm_finetune"]}
        runs |= {"VLM stage 1": vlms["vlm_pretrain"]["run_id"], "VLM stage 2": vlms["vlm_finetune"]["run_id"]}
    removed, kept = filter_quality("demo")
    summary = DemoSummary(
        seed_dataset=refs["seed"]["dataset_version"],
        dataset_version=refs["pool"]["dataset_version"],
        mismatched_removed=removed,
        matched_kept=kept,
        runs=runs,
        models={
            **{what: st["model_uri"] for what, st in stages.items()},
            "pretrained champion": f"models:/{tracking.PRETRAINED_MODEL}@champion",
            "fine-tuned champion": f"models:/{tracking.LORA_MODEL}@champion",
        },
        eval_dataset=refs["eval"]["dataset_version"],
        domain_dataset=refs["domain"]["dataset_version"],
        instruct_dataset=refs["instruct"]["dataset_version"] if vlm else "",
        aliases={what: st["alias"] for what, st in stages.items()},
        decisions={what: st["decision"] for what, st in stages.items()},
        metrics={what: _judged_metrics(st["metrics"]) for what, st in stages.items()},
        notes=[compute_note(seed_epochs, epochs)],
    )
    publish(
        "demo",
        "vlforge demo",
        [
            f"Dataset version: `{summary.dataset_version}` (seed: `{summary.seed_dataset}`)",
            f"Mismatched pairs removed by the CLIP filter: {removed:.1%}; matched pairs kept: {kept:.1%}",
            *[f"- {what}: `{summary.models[what]}` -> {summary.aliases[what]}" for what in stages],
            *[f"  - {line.strip()}" for what in stages for line in summary.decisions[what]],
            *[f"Note: {note}" for note in summary.notes],
        ],
        {
            "MLflow runs": [{"stage": k, "run_id": v} for k, v in summary.runs.items()],
            "Models": [{"model": k, "uri": v} for k, v in summary.models.items()],
        },
    )
    return asdict(summary)


def compute_note(seed_epochs: int, epochs: int) -> str:
    """Why "curated beats bootstrap" is not curation alone: the curated model starts from the bootstrap and trains
    more epochs on top of it."""
    return (
        f"the curated model starts from the bootstrap model ({seed_epochs} epochs on the seed set) and trains "
        f"{epochs} more epochs on the curated pool, so its comparison with the bootstrap mixes curation with "
        "compute; `vlforge experiment curation` isolates curation (the same recipe, seeds and samples seen on "
        "the filtered and the unfiltered pool, docs/experiments.md)."
    )


def vlm_train_params(epochs: int, finetune_epochs: int) -> TrainParams:
    """The demo's VLM leg as the train flow's typed form: only the two VLM steps, stage 1 on the curated pool
    with the champion CLIP's vision tower, stage 2 on ``demo-instruct``'s prompt and response columns."""
    return TrainParams(
        dataset="demo", pretrain=False, finetune=False,
        vlm_pretrain=True,
        vlm_pretraining=VlmPretrainArgs(vision_model=defaults.DEFAULT_MODEL_URI, epochs=epochs, lr=2e-3,
                                        warmup_steps=2, min_eval_pairs=0),
        vlm_finetune=True, vlm_finetune_dataset="demo-instruct",
        # 100 held-out instructions: an accuracy whose interval can tell the image from a blank one
        vlm_finetuning=VlmFinetuneArgs(epochs=finetune_epochs, warmup_steps=2, min_eval_pairs=100),
    )  # fmt: skip


def _judged_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The figures a person reads first, with intervals: zero-shot accuracy and recall@1 on each eval set for a
    CLIP; caption and instruction accuracy, and the same on a blank image, for a VLM."""
    keep = ("zeroshot_accuracy", "i2t_recall_at_1", "mean_recall", "caption_accuracy", "instruction_accuracy")
    return {k: v for k, v in metrics.items() if any(k.endswith(x) or f"{x}_ci_" in k for x in keep)}
