"""Does curation pay? The same recipe, for the same number of samples seen, on the pool as it is and on the pool
filtered by CLIP score (DataComp's experiment, arXiv 2304.14108, at the scale of one pool).

Arms: ``unfiltered`` (the whole pool), ``threshold`` (CLIP score at least a threshold: given, or Otsu's cut of
the pool's scores), ``top_fraction`` (the best-scored share, DataComp's best 0.3) and any ``--arm`` given. Each
arm is trained with K seeds for the same samples seen (epochs = samples seen / the arm's rows, rounded to whole
steps), then evaluated on one eval dataset: zero-shot accuracy over its label column's classes and retrieval
recall@1/5, each with a bootstrap 95 % interval over the eval pairs (the seeds' predictions averaged per pair);
each filtered arm is compared with ``unfiltered`` by a paired bootstrap over the same pairs.

MLflow: a parent run in ``vlforge-experiments`` (params, per-arm metrics, the table as JSON and Markdown, a bar
chart with error bars) and one child run per arm and seed (the training itself).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.experiment.arms import (
    MERGED_CAPTION,
    THRESHOLD,
    TOP_FRACTION,
    UNFILTERED,
    ArmSpec,
    keep_mask,
    otsu_threshold,
    parse_arm,
    publish_arm,
    recaption_arms,
    score_pool,
)
from tasks.train.args import PretrainArgs
from vlforge import defaults
from vlforge.errors import VlforgeError
from vlforge.settings import Settings

log = logging.getLogger("vlforge.experiment")


_PRETRAIN = PretrainArgs()


class CurationExperimentArgs(BaseModel):
    """Settings of ``vlforge experiment curation`` (and the Prefect flow's form)."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(..., description="The pool to curate: a dataset NAME or NAME@VERSION.")
    eval: str = Field(
        ..., description="Evaluation dataset (NAME or NAME@VERSION), ideally with a label column."
    )
    scorer: str = Field(
        defaults.DEFAULT_MODEL_URI, description="CLIP that scores the pool (MLflow URI, folder, HF id)."
    )
    samples_seen: int | None = Field(
        None, gt=0, description="Training samples seen by every arm; empty = 10 epochs of the whole pool."
    )
    seeds: int = Field(2, gt=0, description="Trainings per arm (seeds 0..K-1), so the spread is visible.")
    top_fraction: float = Field(
        defaults.TOP_FRACTION, gt=0, le=1, description="The top_fraction arm's share (DataComp's best: 0.3)."
    )
    threshold: float | None = Field(
        None, description="The threshold arm's CLIP score; empty = Otsu's cut of the pool's score histogram."
    )
    arms: list[str] = Field(
        [],
        description="More arms, NAME=min_score:X or NAME=top_fraction:F (repeatable: --arm top10=top_fraction:0.1).",
    )
    label_col: str = Field(
        "label", description="The eval dataset's class column (zero-shot over its classes)."
    )
    prompt_template: str = Field("a photo of a {}", description="Zero-shot prompt of a class label.")
    recipe: str = Field(
        defaults.DEFAULT_RECIPE, description="Model recipe every arm trains (models/configs)."
    )
    # Pretraining's defaults (tasks/train/args.py), what the default recipe was measured at.
    batch_size: int = Field(_PRETRAIN.batch_size, gt=1, description="Per-worker batch size.")
    lr: float = Field(_PRETRAIN.lr, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(_PRETRAIN.warmup_steps, ge=0, description="Linear warmup steps.")
    output: str | None = Field(None, description="Also write the results as JSON to this file.")
    recaption_model: str | None = Field(
        None,
        description="A VLM (MLflow URI or folder) that recaptions the pool: adds the arms recaptioned (its captions), "
        "mixed (its caption or the original, p = 0.5) and recaption_rejects (the original caption where the threshold "
        "arm keeps the row, its caption where it does not) at the same samples seen; empty = no such arms.",
    )


def _arms(args: CurationExperimentArgs, scores: np.ndarray) -> list[ArmSpec]:
    if args.threshold is not None:
        threshold = ArmSpec(THRESHOLD, min_score=args.threshold, rule="given")
    else:
        threshold = ArmSpec(
            THRESHOLD, min_score=otsu_threshold(scores), rule="Otsu's cut of the pool's scores"
        )
    arms = [ArmSpec(UNFILTERED), threshold, ArmSpec(TOP_FRACTION, top_fraction=args.top_fraction)]
    if args.recaption_model:
        arms += recaption_arms(threshold.min_score)
    for text in args.arms:
        spec = parse_arm(text)
        if spec.name in {a.name for a in arms}:
            raise VlforgeError(f"--arms: an arm named {spec.name!r} exists already")
        arms.append(spec)
    return arms


def _eval_data(settings: Settings, ref: str, label_col: str, template: str):
    """(eval dataset version, images, captions, labels [N] int or None, class prompts or None)."""
    from vlforge.datasets import resolve_dataset

    dv = resolve_dataset(settings, ref)
    table = dv.read_table("data")
    missing = {"image", "caption"} - set(table.column_names)
    if missing:
        raise VlforgeError(f"eval dataset {dv.ref} lacks column(s) {sorted(missing)}")
    images = table.column("image").to_pylist()  # read_table hands images over as encoded bytes
    captions = [str(c) for c in table.column("caption").to_pylist()]
    if label_col not in table.column_names:
        log.warning("eval dataset %s has no %r column: zero-shot accuracy is not measured", dv.ref, label_col)
        return dv, images, captions, None, None
    names = [str(v) for v in table.column(label_col).to_pylist()]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return dv, images, captions, np.array([index[n] for n in names]), [template.format(c) for c in classes]


def per_pair_hits(bundle, images, captions, labels, prompts) -> dict[str, np.ndarray]:
    """Per eval pair, float [N]: zero-shot correct, and recall@1/@5 hit (mean of image->text and text->image;
    pairs with identical captions are interchangeable), from :func:`tasks.evaluate.retrieval_hits`."""
    from tasks.evaluate import embed_images, embed_texts, retrieval_hits, zeroshot_hits

    img = embed_images(bundle, images)
    hits = retrieval_hits(img, embed_texts(bundle, captions), ks=(1, 5), groups=captions)
    out = {f"recall_at_{k}": (hits[f"i2t_recall@{k}"] + hits[f"t2i_recall@{k}"]) / 2 for k in (1, 5)}
    if labels is not None:
        out["zero_shot_accuracy"] = zeroshot_hits(img, embed_texts(bundle, prompts), labels)
    return out


def bootstrap_ci(values: np.ndarray) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``values`` [N] (``tasks.evaluate.interval``)."""
    from tasks.evaluate import interval

    iv = interval(values)
    return iv.low, iv.high


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """mean(a - b) over the same pairs with its paired-bootstrap 95 % interval."""
    from tasks.evaluate import paired_difference as paired

    iv = paired(a, b)
    return {"difference": iv.value, "ci_low": iv.low, "ci_high": iv.high}


def run_curation_experiment(args: CurationExperimentArgs, settings: Settings) -> dict[str, Any]:
    """Run every arm with every seed and return ``{"arms": {...}, "comparisons": {...}, "verdict": str, ...}``."""
    from models.clip import load_clip
    from tasks.common import load_model
    from tasks.curate.scoring import scorer_identity
    from tasks.train.driver import run_training, steps_plan
    from tasks.train.recipes.clip import PretrainRecipe
    from vlforge import console, tracking
    from vlforge.datasets import resolve_dataset
    from vlforge.registry import check_model_uri

    pool = resolve_dataset(settings, args.pool)
    eval_dv, images, captions, labels, prompts = _eval_data(
        settings, args.eval, args.label_col, args.prompt_template
    )
    check_model_uri(args.scorer, settings)
    if args.recaption_model:
        from tasks.recaption.inputs import check_captioner

        check_captioner(args.recaption_model, settings)  # not a VLM: one clear error before any work
    table = pool.read_table("data", stored_layout=True)  # the arms keep the pool's layout
    with console.stage(f"score {pool.ref} with {args.scorer}"):
        scores = score_pool(load_model(args.scorer, settings), table)
    scorer = scorer_identity(args.scorer, settings).as_dict()
    arms = _arms(args, scores)
    recaptioned = _recaptioned_pool(args, pool, settings) if args.recaption_model else None
    samples_seen = args.samples_seen or 10 * table.num_rows
    parent = tracking.start_stage_run(
        settings, "experiments", name=f"curation {pool.ref}", tags={"vlforge.experiment": "curation",
                                                                     tracking.TAG_DATASET: pool.name}
    )  # fmt: skip
    tracking.log_to_run(
        settings, parent,
        params={**args.model_dump(exclude={"arms", "output"}), "pool_version": pool.ref, "eval_version": eval_dv.ref,
                "samples_seen": samples_seen, "arms": ",".join(a.name for a in arms)},
    )  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    per_arm_hits: dict[str, dict[str, np.ndarray]] = {}
    try:
        for spec in arms:
            extra: dict[str, Any] = {}
            if spec.caption_col == MERGED_CAPTION:  # the filter's keeps as they are, its rejects rewritten
                dv, extra["synthetic_share"] = _merged_caption_arm(
                    settings, recaptioned, table, scores, spec, scorer
                )
                rows = table.num_rows
            elif spec.recaptioned:  # every row of the pool, with the VLM's captions beside the originals
                dv, rows = recaptioned, table.num_rows
            else:
                mask = keep_mask(spec, scores)
                dv = publish_arm(settings, pool, table, spec, mask, scorer)
                rows = int(mask.sum())
            steps_per_epoch, _ = steps_plan(rows, args.batch_size, 1, 1, 1)
            epochs = max(1, round(samples_seen / (steps_per_epoch * args.batch_size)))
            seed_hits, seed_metrics = [], []
            for seed in range(args.seeds):
                with console.stage(f"arm {spec.name} ({spec.describe()}, {rows} rows), seed {seed}"):
                    train_args = PretrainArgs(
                        recipe=args.recipe, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup_steps, seed=seed,
                        eval_fraction=0.0, min_eval_pairs=0, register_model=False,
                        caption_col=spec.caption_col, caption_mix=spec.caption_mix,
                    )  # fmt: skip
                    result = run_training(
                        PretrainRecipe(train_args), dv.ref, settings, experiment="experiments",
                        run_tags={"mlflow.parentRunId": parent, "vlforge.arm": spec.name, "vlforge.seed": str(seed)},
                    )  # fmt: skip
                    hits = per_pair_hits(load_clip(result.model_dir), images, captions, labels, prompts)
                metrics = {k: float(v.mean()) for k, v in hits.items()}
                tracking.log_to_run(
                    settings, result.run_id, metrics={f"eval_{k}": v for k, v in metrics.items()}
                )
                seed_hits.append(hits)
                seed_metrics.append(metrics)
            averaged = {k: np.mean([h[k] for h in seed_hits], axis=0) for k in seed_hits[0]}
            per_arm_hits[spec.name] = averaged
            results[spec.name] = {
                **_arm_result(spec, dv, rows, epochs, steps_per_epoch, args, averaged, seed_metrics),
                **extra,
            }
        comparisons = {
            name: {k: paired_difference(per_arm_hits[name][k], per_arm_hits[UNFILTERED][k]) for k in hits}
            for name, hits in per_arm_hits.items()
            if name != UNFILTERED
        }
        out = {
            "pool": pool.ref, "eval": eval_dv.ref, "scorer": scorer, "samples_seen": samples_seen,
            "eval_pairs": len(captions), "arms": results, "comparisons": comparisons, "mlflow_run_id": parent,
        }  # fmt: skip
        if args.recaption_model:
            out["recaption_vs_filtering"] = recaption_vs_filtering(arms, results, per_arm_hits)
        out["verdict"] = verdict(out)
        _report(settings, parent, out)
    except BaseException:
        tracking.end_run(settings, parent, "FAILED")
        raise
    tracking.end_run(settings, parent)
    if args.output:
        from vlforge import storage

        storage.write_text_atomic(args.output, json.dumps(out, indent=2))
    return out


def _recaptioned_pool(args: CurationExperimentArgs, pool, settings: Settings):
    """The pool recaptioned by ``args.recaption_model``, as a version of ``<pool>-recaptioned`` (reused when the
    pool, the model and the prompt are unchanged: ``tasks.recaption``)."""
    from tasks.experiment.arms import RECAPTIONED, arm_dataset_name
    from tasks.recaption import recaption
    from vlforge import console

    with console.stage(f"recaption {pool.ref} with {args.recaption_model}"):
        target = arm_dataset_name(pool.name, RECAPTIONED)
        return recaption(pool.ref, settings, model=args.recaption_model, to=target).dataset_version


def _merged_caption_arm(settings: Settings, recaptioned, pool_table, scores, spec: ArmSpec, scorer: dict):
    """(dataset version, share of the VLM's captions) of ``recaption_rejects``: the recaptioned pool with
    ``arms.merged_caption_table``'s column, from the pool's own scores (matched by ``key``, so the rows the threshold
    arm keeps are exactly the rows that keep their caption here), published as ``<pool>-recaptioned-<arm>``
    (reused when the recaptioned pool, the scorer and the rule are unchanged)."""
    from tasks.experiment.arms import merged_caption_table

    table = recaptioned.read_table("data", stored_layout=True)
    by_key = dict(zip(pool_table.column("key").to_pylist(), scores.tolist(), strict=True))
    keys = table.column("key").to_pylist()
    if len(by_key) != pool_table.num_rows or set(keys) != set(by_key) or len(keys) != len(by_key):
        raise VlforgeError(f"{recaptioned.ref} does not hold the pool's rows one for one (by key)")
    table, synthetic = merged_caption_table(table, np.array([by_key[k] for k in keys]), spec.min_score)
    mask = np.ones(table.num_rows, bool)
    return publish_arm(settings, recaptioned, table, spec, mask, scorer), float(synthetic.mean())


def _arm_result(spec, dv, rows, epochs, steps_per_epoch, args, averaged, seed_metrics) -> dict[str, Any]:
    res: dict[str, Any] = {
        "rule": spec.describe(),
        "dataset": dv.ref,
        "rows": rows,
        "epochs": epochs,
        "samples_seen": epochs * steps_per_epoch * args.batch_size,
        "seeds": seed_metrics,
    }
    for key, values in averaged.items():
        low, high = bootstrap_ci(values)
        res[key] = float(values.mean())
        res[f"{key}_ci" if key != "zero_shot_accuracy" else "zero_shot_ci"] = [low, high]
    return res


def _primary(arms: dict[str, Any]) -> str:
    return "zero_shot_accuracy" if "zero_shot_accuracy" in arms[UNFILTERED] else "recall_at_1"


def recaption_vs_filtering(
    specs: list[ArmSpec], results: dict[str, Any], hits: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """The better recaptioned arm against the better filtering arm (by the primary metric's point estimate),
    paired over the same eval pairs: does recaptioning lose anything against throwing the bad pairs away? Picking
    the better of each on the same eval pairs favours neither side (both are picked)."""
    key = _primary(results)
    recap = [s.name for s in specs if s.recaptioned]
    filtering = [s.name for s in specs if not s.recaptioned and s.name != UNFILTERED]
    best_recap = max(recap, key=lambda n: results[n][key])
    best_filter = max(filtering, key=lambda n: results[n][key])
    return {
        "recaptioned_arm": best_recap,
        "filtering_arm": best_filter,
        **{k: paired_difference(hits[best_recap][k], hits[best_filter][k]) for k in hits[best_recap]},
        # every recaptioned arm against that filtering arm on the primary metric (the better one is picked from
        # more arms than the filtering one: these show how much the pick adds)
        "each": {n: paired_difference(hits[n][key], hits[best_filter][key]) for n in recap},
    }


def verdict(out: dict[str, Any]) -> str:
    """In words: each filtered arm against unfiltered on the primary metric (zero-shot when measured)."""
    key = _primary(out["arms"])
    lines = []
    for name, cmp in out["comparisons"].items():
        d = cmp[key]
        ci = f"(95% CI {d['ci_low']:+.3f}..{d['ci_high']:+.3f})"
        if d["ci_low"] > 0:
            word = "beats"
        elif d["ci_high"] < 0:
            word = "loses to"
        else:
            word = "does not differ beyond noise from"
        lines.append(f"{name} {word} unfiltered by {d['difference']:+.3f} {key} {ci}")
    if "recaption_vs_filtering" in out:
        rf = out["recaption_vs_filtering"]
        d = rf[key]
        lines.append(
            f"the better recaptioned arm ({rf['recaptioned_arm']}) against the better filtering arm "
            f"({rf['filtering_arm']}): {d['difference']:+.3f} {key} (95% CI {d['ci_low']:+.3f}..{d['ci_high']:+.3f})"
        )
    best = max(out["arms"], key=lambda n: out["arms"][n][key])
    lines.append(f"best arm: {best} ({out['arms'][best][key]:.3f} {key})")
    return "; ".join(lines)


def table_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, arm in out["arms"].items():
        row = {"arm": name, "rule": arm["rule"], "rows": arm["rows"], "samples_seen": arm["samples_seen"]}
        if "zero_shot_accuracy" in arm:
            lo, hi = arm["zero_shot_ci"]
            row["zero-shot"] = f"{arm['zero_shot_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
        lo, hi = arm["recall_at_1_ci"]
        row["recall@1"] = f"{arm['recall_at_1']:.3f} [{lo:.3f}, {hi:.3f}]"
        rows.append(row)
    return rows


def _chart_png(out: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, ci = (
        ("zero_shot_accuracy", "zero_shot_ci")
        if "zero_shot_accuracy" in out["arms"][UNFILTERED]
        else ("recall_at_1", "recall_at_1_ci")
    )
    names = list(out["arms"])
    means = [out["arms"][n][key] for n in names]
    err = np.array(
        [[m - out["arms"][n][ci][0], out["arms"][n][ci][1] - m] for n, m in zip(names, means, strict=True)]
    ).T
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    ax.bar(names, means, yerr=err, capsize=6, color=["#999"] + ["#3a7"] * (len(names) - 1))
    ax.set_ylabel(key.replace("_", " ") + " (95% CI)")
    ax.set_title(f"{out['pool']}: {out['samples_seen']} samples seen per arm", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _report(settings: Settings, run_id: str, out: dict[str, Any]) -> None:
    """Per-arm metrics, the table (JSON, Markdown) and the chart on the parent run; a Prefect artifact."""
    from vlforge import tracking
    from vlforge.artifacts import markdown_table, publish

    metrics = {}
    for name, arm in out["arms"].items():
        for key in ("zero_shot_accuracy", "recall_at_1", "recall_at_5"):
            if key in arm:
                metrics[f"{name}.{key}"] = arm[key]
    tracking.log_to_run(settings, run_id, metrics=metrics)
    rows = table_rows(out)
    md = publish(
        "curation-experiment",
        f"Curation experiment on {out['pool']}",
        [f"**{out['verdict']}**", "", f"Eval: `{out['eval']}` ({out['eval_pairs']} pairs); scorer "
         f"`{out['scorer']['uri']}`; {out['samples_seen']} samples seen per arm."],
        {"Arms": rows},
    )  # fmt: skip
    files = {
        "results.json": json.dumps(out, indent=2),
        "results.md": md + "\n\n" + markdown_table(rows),
        "arms.png": _chart_png(out),
    }
    tracking.log_files(settings, run_id, files)
