"""What a curation reports: MLflow run (params, counts, plots, dataset output) and Prefect artifacts."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

from tasks.curate_publish import Candidates
from tasks.filters import Decisions
from vlforge import tracking
from vlforge.datasets import DatasetVersion
from vlforge.settings import Settings


def score_histogram_png(scores: np.ndarray, keep: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ok = ~np.isnan(scores)
    bins = np.linspace(np.nanmin(scores[ok]) if ok.any() else 0, np.nanmax(scores[ok]) if ok.any() else 1, 30)
    ax.hist(scores[ok & keep], bins=bins, alpha=0.7, label="kept")
    ax.hist(scores[ok & ~keep], bins=bins, alpha=0.7, label="rejected")
    ax.set_xlabel("CLIP image-text cosine")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def example_grid_png(images: list[bytes], titles: list[str], kept: list[bool]) -> bytes:
    """A grid of examples with caption, score and decision under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = max(1, len(images))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title, k in zip(axes.flat, images, titles, kept, strict=False):
        try:
            ax.imshow(Image.open(io.BytesIO(img)).convert("RGB"))
        except Exception:
            ax.text(0.5, 0.5, "(no image)", ha="center")
        ax.set_title(title, fontsize=7, color="green" if k else "red", wrap=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _examples(cand: Candidates, dec: Decisions, shards, per_side: int = 4):
    """Best kept and a spread of rejected rows (with images) for the grid."""
    from tasks.curate_publish import _read

    t = cand.table
    scores = t.column("clip_score").to_numpy(zero_copy_only=False)
    kept = np.flatnonzero(dec.keep)[:per_side]
    rej = [i for i in np.flatnonzero(~dec.keep) if dec.reason[i] != "download_failed"][:per_side]
    captions = t.column("caption").to_pylist()
    shard_idx, row_idx = t.column("shard_index").to_numpy(), t.column("row_index").to_numpy()
    images, titles, flags = [], [], []
    columns: dict[int, object] = {}  # shard index -> its jpg column, read once
    for i in [*kept, *rej]:
        si = int(shard_idx[i])
        if si not in columns:
            columns[si] = _read(shards[si].uri, ["jpg"]).column("jpg")
        jpg = columns[si][int(row_idx[i])].as_py()
        verdict = "kept" if dec.keep[i] else dec.reason[i]
        s = "" if np.isnan(scores[i]) else f" {scores[i]:.3f}"
        images.append(jpg or b"")
        titles.append(f"{(captions[i] or '')[:40]}\n{verdict}{s}")
        flags.append(bool(dec.keep[i]))
    return images, titles, flags


def start_version_run(settings: Settings, dataset: str, source: str):
    """Start the version's run in ``vlforge-datasets`` (a context manager; the caller publishes inside it)."""
    import mlflow

    exp = tracking.ensure_experiment(settings, "datasets")
    tags = {tracking.TAG_DATASET: dataset, "vlforge.source": source, **tracking.flow_run_tags()}
    return mlflow.start_run(experiment_id=exp, tags=tags)


def log_version_details(
    dv: DatasetVersion, params: dict, counts: dict[str, int], cand: Candidates, dec: Decisions, shards
) -> None:
    """Params, counts per reason, score histogram, example grid, manifest and the version as an output."""
    import json

    import mlflow

    mlflow.set_tags({**tracking.dataset_tags(dv), "mlflow.runName": dv.ref})
    mlflow.log_params(tracking.safe_params(params))
    mlflow.log_metrics({f"count_{k}": float(v) for k, v in counts.items()})
    scores = cand.table.column("clip_score").to_numpy(zero_copy_only=False)
    files = {"manifest.json": json.dumps(dv.manifest, indent=2, default=str).encode()}
    if len(scores) and not np.isnan(scores).all():
        files["score_histogram.png"] = score_histogram_png(scores, dec.keep)
    files["examples.png"] = example_grid_png(*_examples(cand, dec, shards))
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as fh:
                fh.write(data)
            mlflow.log_artifact(path)
    tracking.log_dataset_input(dv, context="output")


def summary_markdown(
    dv: DatasetVersion, counts: dict[str, int], scorer: dict | None, run_link: str | None
) -> str:
    lines = [
        f"# Dataset {dv.ref}",
        "",
        f"- URI: `{dv.uri}`",
        f"- scorer: `{scorer['uri']}` (version {scorer.get('version')})" if scorer else "- scorer: none",
        f"- MLflow run: {run_link}" if run_link else "- MLflow run: not logged",
        "",
        "| count | pairs |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in counts.items() if v or k in ("input", "kept", "rejected")]
    return "\n".join(lines)


def prefect_artifacts(
    dv: DatasetVersion, counts: dict[str, int], scorer: dict | None, run_link: str | None
) -> None:
    """Markdown + table artifacts when running inside Prefect; a no-op otherwise."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    key = "curate-" + "".join(c if c.isalnum() else "-" for c in dv.name.lower())
    create_markdown_artifact(summary_markdown(dv, counts, scorer, run_link), key=key, description=dv.ref)
    create_table_artifact([{"count": k, "pairs": v} for k, v in counts.items()], key=key + "-counts")
