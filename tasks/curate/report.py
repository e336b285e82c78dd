"""What a curation reports: MLflow run (params, counts, plots, dataset output) and Prefect artifacts."""

from __future__ import annotations

import io

import numpy as np

from vlforge import tracking
from vlforge.datasets import DatasetVersion
from vlforge.settings import Settings


def score_histogram_png(edges: np.ndarray, kept: np.ndarray, rejected: np.ndarray) -> bytes:
    """Kept and rejected pairs per score bin (counts merged from every shard), over the populated range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = kept + rejected
    used = np.flatnonzero(total)
    lo, hi = (used[0], used[-1] + 1) if len(used) else (0, len(total))
    # About 30 bars, as before: merge neighbouring fine bins.
    step = max(1, (hi - lo) // 30)
    idx = np.arange(lo, hi, step)
    k, r = np.add.reduceat(kept[lo:hi], idx - lo), np.add.reduceat(rejected[lo:hi], idx - lo)
    left, width = edges[idx], edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(left, k, width=width * step, align="edge", alpha=0.7, label="kept")
    ax.bar(left, r, width=width * step, align="edge", alpha=0.7, label="rejected")
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


def start_version_run(settings: Settings, dataset: str, source: str):
    """The version's run in ``vlforge-datasets`` (a context manager giving its id; the caller publishes inside
    it): finished when the block ends, failed when it raises."""
    tags = {tracking.TAG_DATASET: dataset, tracking.TAG_SOURCE: source}
    return tracking.stage_run(settings, "curate", tags=tags)


def log_version_details(settings: Settings, run_id: str, dv: DatasetVersion, params: dict, out) -> None:
    """Params, counts per reason, score histogram, example grid, manifest and the version as an output.

    ``out``: the curation's aggregates (``tasks.curate.run.CurationOutput``), never the pool's rows."""
    import json

    from tasks.curate.publish import HIST_EDGES

    tracking.set_run_tags(settings, run_id, {**tracking.dataset_tags(dv), "mlflow.runName": dv.ref})
    tracking.log_to_run(settings, run_id, params=params, metrics=tracking.count_metrics(out.counts))
    files = {"manifest.json": json.dumps(dv.manifest, indent=2, default=str).encode()}
    if (out.hist_kept + out.hist_rejected).sum():
        files["score_histogram.png"] = score_histogram_png(HIST_EDGES, out.hist_kept, out.hist_rejected)
    ex = out.examples
    titles = [
        f"{e['caption'][:40]}\n{e['verdict']}" + ("" if e["score"] is None else f" {e['score']:.3f}")
        for e in ex
    ]
    files["examples.png"] = example_grid_png([e["image"] for e in ex], titles, [e["kept"] for e in ex])
    tracking.log_files(settings, run_id, files)
    tracking.log_dataset_input(settings, run_id, dv, context="output")


def prefect_artifacts(
    dv: DatasetVersion, counts: dict[str, int], scorer: dict | None, run_link: str | None
) -> None:
    """The version's summary and its counts as Prefect artifacts (inside a flow or task run; else nothing)."""
    from vlforge.artifacts import artifact_key, publish

    lines = [
        f"- URI: `{dv.uri}`",
        f"- scorer: `{scorer['uri']}` (version {scorer.get('version')})" if scorer else "- scorer: none",
        f"- MLflow run: {run_link}" if run_link else "- MLflow run: not logged",
    ]
    rows = [{"count": k, "pairs": v} for k, v in counts.items() if v or k in ("input", "kept", "rejected")]
    publish(artifact_key("curate", dv.name), f"Dataset {dv.ref}", lines, {"Counts": rows})
