"""The ``vlforge`` command line (Typer). Each stage command calls the stage's plain function; ``demo`` runs the
flows through Prefect; ``serve`` serves the deployments. A user error prints one line and exits with 2."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated

import typer

from models.recipes import DEFAULT_RECIPE
from vlforge import console as ui
from vlforge.errors import VlforgeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Curated image-text datasets and CLIP models."
)


class _Terminal:
    """The console people see (``vlforge.console.terminal``), looked up when used: inside a command's session
    it is the terminal the command started on, while stdout/stderr go to the command's log file."""

    def __init__(self, stderr: bool):
        self.stderr = stderr

    def __getattr__(self, name):
        return getattr(ui.terminal(stderr=self.stderr), name)


console = _Terminal(stderr=True)
out = _Terminal(stderr=False)
_verbose = False
# Commands that run libraries (Ray, MLflow, Prefect, img2dataset): their output goes to a log file. `serve` is
# a server: its output (Prefect's runner, the flow runs) is what an operator reads, and stays on the console.
LOGGED_COMMANDS = ("ingest", "curate", "pretrain", "finetune", "demo")


def _quiet_environment() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Prefect's ephemeral API can take a while to boot on a small, busy machine (default 20 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The ephemeral API's telemetry service: it phones home at start-up and logs an ERROR when it cannot.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def user_errors(fn):
    """Run a command: library output to its log file (LOGGED_COMMANDS), a VlforgeError as one clear line and
    exit status 2, any other failure as one line naming the log file that holds the traceback (status 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_environment()
        if fn.__name__ not in LOGGED_COMMANDS:
            try:
                return fn(*args, **kwargs)
            except VlforgeError as exc:
                console.print(f"[bold red]error:[/] {exc}", highlight=False)
                raise typer.Exit(2) from None
        with ui.session(fn.__name__, _settings(), verbose=_verbose) as log_path:
            try:
                result = fn(*args, **kwargs)
            except VlforgeError as exc:
                ui.log.error("%s", exc)
                console.print(f"[bold red]error:[/] {exc}", highlight=False)
                console.print(f"log: {log_path}", highlight=False)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                ui.log.exception("interrupted")
                console.print(f"interrupted; log: {log_path}", highlight=False)
                raise typer.Exit(130) from None
            except Exception as exc:
                ui.log.exception("vlforge %s failed", fn.__name__)
                console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
                console.print(f"the full traceback is in the log: {log_path}", highlight=False)
                raise typer.Exit(1) from None
            console.print(f"log: {log_path}", highlight=False, style="dim")
            return result

    return wrapper


@app.callback()
def main(
    storage: Annotated[
        str | None, typer.Option(help="Storage root (local folder or s3://); env VLFORGE_STORAGE.")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Show the full log (libraries, Ray workers) live as well."),
    ] = False,
) -> None:
    global _verbose
    if storage:
        os.environ["VLFORGE_STORAGE"] = storage
    _verbose = verbose


def _settings():
    from vlforge.settings import get_settings

    return get_settings()


@app.command()
@user_errors
def ingest(
    url_list: Annotated[
        str,
        typer.Argument(help="URL list file, folder or glob (csv/tsv/json/jsonl/parquet), local or s3://."),
    ],
    source: Annotated[str, typer.Option(help="Source name; raw batches go to raw/<source>/.")],
    url_col: str = "url",
    caption_col: str = "caption",
    shard_size: Annotated[int, typer.Option(help="Rows per shard.")] = 10_000,
    processes: Annotated[int | None, typer.Option(help="Download processes (default: cores).")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads per process.")] = None,
    distributor: Annotated[str, typer.Option(help="multiprocessing or ray.")] = "multiprocessing",
    allow_private_networks: Annotated[bool, typer.Option(help="Allow private/loopback hosts.")] = False,
    allow_network: Annotated[
        list[str] | None,
        typer.Option(help="Allow this network (CIDR, e.g. 10.1.2.0/24) as if public; repeatable."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds.")] = 10.0,
    retries: Annotated[int, typer.Option(help="Retries for transient errors.")] = 2,
    user_agent: Annotated[str | None, typer.Option(help="User agent (default names vlforge).")] = None,
    image_size: Annotated[
        int, typer.Option(help="Resize images to fit this size (img2dataset's image_size).")
    ] = 256,
    min_image_size: Annotated[
        int, typer.Option(help="Refuse images smaller than this (pixels, shorter side).")
    ] = 10,
    max_image_area: Annotated[
        int, typer.Option(help="Refuse larger images (decompression-bomb guard).")
    ] = 50_000_000,
) -> None:
    """Download image-text pairs from URL lists with img2dataset (resumable; every row accounted for)."""
    from tasks.ingest import ingest as run

    with ui.stage(f"ingest {url_list} into source {source}"):
        results = run(
            url_list,
            source,
            _settings(),
            url_col=url_col,
            caption_col=caption_col,
            shard_size=shard_size,
            processes=processes,
            threads=threads,
            distributor=distributor,
            allow_private_networks=allow_private_networks,
            allowed_networks=allow_network,
            timeout=timeout,
            retries=retries,
            user_agent=user_agent,
            image_size=image_size,
            min_image_size=min_image_size,
            max_image_area=max_image_area,
        )
    for r in results:
        state = (
            "already ingested"
            if r.skipped
            else f"{r.success_rate:.1%} success, {r.images_per_s:.1f} images/s"
        )
        out.print(f"{r.url_list} -> {r.uri} ({r.rows} rows, {state})")
        out.print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(r.counts.items())))


@app.command()
@user_errors
def curate(
    source: Annotated[str, typer.Option(help="Source whose raw batches to curate.")],
    dataset: Annotated[str, typer.Option(help="Dataset to publish a new version of.")],
    scorer: Annotated[
        str | None, typer.Option(help="CLIP scorer: models:/NAME@ALIAS, a folder or a HF id.")
    ] = None,
    min_score: Annotated[
        float | None, typer.Option(help="Keep pairs with CLIP score >= X (LAION: 0.28).")
    ] = None,
    top_fraction: Annotated[
        float | None, typer.Option(help="Keep the top F of the pool by CLIP score.")
    ] = None,
    min_image_size: Annotated[int, typer.Option(help="Drop images whose shorter side is below this.")] = 32,
    max_aspect_ratio: Annotated[float, typer.Option(help="Drop images more elongated than this.")] = 3.0,
    min_caption_chars: int = 5,
    max_caption_chars: int = 1000,
    exact_dedup: Annotated[bool, typer.Option(help="Drop exact duplicate images (sha256).")] = True,
    near_dup_threshold: Annotated[
        float | None, typer.Option(help="Drop near duplicates above this image-embedding cosine (faiss).")
    ] = None,
    near_dup_cluster_rows: Annotated[
        int, typer.Option(help="Near dedup compares within k-means clusters of about this many rows.")
    ] = 10_000,
    language: Annotated[
        list[str] | None, typer.Option(help="Keep captions in this language (repeatable).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Scoring batch size.")] = 64,
    force: Annotated[bool, typer.Option(help="Publish a new version even if nothing changed.")] = False,
) -> None:
    """Score pairs with CLIP on Ray, filter, dedup and publish a versioned Parquet dataset."""
    if min_score is not None and top_fraction is not None:
        raise VlforgeError("give either --min-score or --top-fraction, not both")
    if (min_score is not None or top_fraction is not None) and not scorer:
        raise VlforgeError(
            "--min-score and --top-fraction need a --scorer (e.g. models:/vlforge-clip@champion)"
        )
    settings = _settings()
    if scorer:
        _check_model_uri(scorer, settings)
    from tasks.curate import curate as run
    from tasks.curate.filters import FilterConfig

    filters = FilterConfig(
        min_image_size=min_image_size,
        max_aspect_ratio=max_aspect_ratio,
        min_caption_chars=min_caption_chars,
        max_caption_chars=max_caption_chars,
        exact_dedup=exact_dedup,
        near_dup_threshold=near_dup_threshold,
        near_dup_cluster_rows=near_dup_cluster_rows,
        languages=language or None,
    )
    with ui.stage(f"curate source {source} into dataset {dataset}"):
        result = run(
            source,
            dataset,
            settings,
            scorer=scorer,
            min_score=min_score,
            top_fraction=top_fraction,
            filters=filters,
            batch_size=batch_size,
            force=force,
        )
    dv = result.dataset_version
    if result.skipped:
        out.print(f"nothing new: {dv.ref} already covers every raw batch with this scorer and these filters")
        return
    out.print(f"published {dv.ref} at {dv.uri}")
    out.print("  " + ", ".join(f"{k}: {v}" for k, v in result.counts.items()))
    if result.mlflow_run_id:
        out.print(f"  MLflow run: {result.mlflow_run_id}")


@app.command()
@user_errors
def pretrain(
    dataset: Annotated[str, typer.Option(help="NAME or NAME@VERSION.")],
    recipe: Annotated[
        str, typer.Option(help="Recipe in models/configs (clip-tiny, clip-small-64, clip-vit-b-32).")
    ] = DEFAULT_RECIPE,
    init: Annotated[str | None, typer.Option(help="Start from this model URI instead of scratch.")] = None,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-3,
    num_workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 1,
    use_gpu: Annotated[
        bool | None, typer.Option("--use-gpu/--no-gpu", help="Default: GPUs if the cluster has any.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Training name; running the same name again resumes it.")
    ] = None,
    grad_accum: int = 1,
    grad_checkpointing: bool = False,
    eval_dataset: Annotated[str | None, typer.Option(help="Extra evaluation dataset.")] = None,
) -> None:
    """Contrastive (CLIP) pretraining with Ray Train; logs to MLflow and registers vlforge-clip."""
    settings = _settings()
    _check_inputs(settings, dataset, eval_dataset, init)
    from tasks.train.pretrain import pretrain as run

    with ui.stage(f"pretrain on {dataset}"):
        result = run(
            dataset,
            settings,
            recipe=recipe,
            init=init,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            num_workers=num_workers,
            use_gpu=use_gpu,
            name=name,
            grad_accum=grad_accum,
            grad_checkpointing=grad_checkpointing,
            eval_dataset=eval_dataset,
        )
    _print_train(result)


@app.command()
@user_errors
def finetune(
    dataset: Annotated[str, typer.Option(help="NAME or NAME@VERSION.")],
    base: Annotated[str, typer.Option(help="Model to adapt.")] = "models:/vlforge-clip@champion",
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 2e-3,
    lora_r: int = 8,
    lora_alpha: int = 16,
    num_workers: int = 1,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-gpu")] = None,
    name: Annotated[str | None, typer.Option(help="Training name; the same name again resumes it.")] = None,
) -> None:
    """LoRA (peft) fine-tuning of a registered model; registers vlforge-clip-lora."""
    settings = _settings()
    _check_inputs(settings, dataset, None, base)
    from tasks.train.finetune import finetune as run

    with ui.stage(f"fine-tune {base} on {dataset}"):
        result = run(
            dataset,
            settings,
            base=base,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            num_workers=num_workers,
            use_gpu=use_gpu,
            name=name,
        )
    _print_train(result)


def _check_model_uri(uri: str, settings) -> None:
    """Resolve a model URI now (one clear error in a second), before Ray or Prefect start."""
    from vlforge.registry import check_model_uri

    check_model_uri(uri, settings)


def _check_inputs(settings, dataset: str, eval_dataset: str | None, model: str | None) -> None:
    from vlforge.datasets import resolve_dataset

    for name in (dataset, eval_dataset):
        if name:
            resolve_dataset(settings, name)
    if model:
        _check_model_uri(model, settings)


def _print_train(result) -> None:
    reg = result.registered
    out.print(f"MLflow run: {result.run_id}")
    if reg:
        out.print(f"registered {reg.uri} as {reg.alias}")
    for k, v in sorted((result.metrics or {}).items()):
        out.print(f"  {k}: {v:.4f}")


@app.command()
@user_errors
def demo(
    seed_size: Annotated[int, typer.Option(help="Clean pairs used to bootstrap the scorer.")] = 300,
    pool_size: Annotated[int, typer.Option(help="Noisy pairs to curate.")] = 600,
    mismatch_fraction: Annotated[
        float, typer.Option(help="Share of deliberately mismatched captions.")
    ] = 0.3,
    top_fraction: Annotated[float, typer.Option(help="Share of the pool the CLIP filter keeps.")] = 0.6,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run the whole pipeline on synthetic data served on 127.0.0.1 (embedded defaults, no services)."""
    from flows.demo import demo as run

    s = _settings()
    from vlforge.tracking import redact

    console.print(f"[bold]vlforge demo[/]: storage {s.storage_uri}, MLflow {redact(s.tracking_uri)}")
    summary = run(
        seed_size=seed_size,
        pool_size=pool_size,
        mismatch_fraction=mismatch_fraction,
        top_fraction=top_fraction,
    )
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print("\n[bold]Summary[/]")
    out.print(f"dataset version: {summary['dataset_version']} (seed set: {summary['seed_dataset']})")
    out.print(f"mismatched pairs removed by the CLIP filter: {summary['mismatched_removed']:.1%}")
    out.print(f"matched pairs kept: {summary['matched_kept']:.1%}")
    for stage, run_id in summary["runs"].items():
        out.print(f"MLflow run ({stage}): {run_id}")
    for what, uri in summary["models"].items():
        out.print(f"model ({what}): {uri}")
    out.print(f"MLflow UI: mlflow ui --backend-store-uri {redact(s.tracking_uri)}")


@app.command()
@user_errors
def serve(
    refresh_cron: Annotated[str, typer.Option(help="Cron schedule of the refresh deployment.")] = "0 3 * * *",
    refresh_location: Annotated[
        str | None, typer.Option(help="Where URL lists land (folder, glob, s3://).")
    ] = None,
    refresh_source: Annotated[str | None, typer.Option(help="Source name for the refresh.")] = None,
    refresh_dataset: Annotated[str | None, typer.Option(help="Dataset the refresh publishes.")] = None,
) -> None:
    """Serve the refresh (scheduled), train and pipeline deployments to the Prefect server at PREFECT_API_URL."""
    from flows.deployments import serve_deployments

    serve_deployments(
        _settings(),
        refresh_cron=refresh_cron,
        refresh_source=refresh_source,
        refresh_location=refresh_location,
        refresh_dataset=refresh_dataset,
    )


@app.command()
@user_errors
def datasets(
    name: Annotated[str | None, typer.Argument(help="Show the versions of this dataset.")] = None,
) -> None:
    """List datasets, or the complete versions of one."""
    from vlforge.datasets import list_datasets, list_versions, resolve_dataset

    s = _settings()
    if name is None:
        for n in list_datasets(s):
            out.print(f"{n}  (latest {resolve_dataset(s, n).version})")
        return
    for v in list_versions(s, name):
        m = resolve_dataset(s, f"{name}@{v}").manifest
        out.print(f"{name}@{v}  {json.dumps(m.get('counts', {}))}")


@app.command()
@user_errors
def lineage(
    target: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS (walk back) or a dataset NAME[@VERSION] (forward).")
    ],
) -> None:
    """Walk back from a registered model to its URL lists, or forward from a dataset version to its models."""
    from vlforge.lineage import models_trained_on, walk_back

    s = _settings()
    if target.startswith("models:/"):
        node, indent = walk_back(target, s), ""
        while node is not None:
            out.print(f"{indent}{node.model} (run {node.run_id}) trained on {node.dataset or '?'}")
            for b in node.raw_batches:
                out.print(f"{indent}  raw batch {b}")
            for u in node.url_lists:
                out.print(f"{indent}  url list {u}")
            node, indent = node.base, indent + "  "
        return
    for uri in models_trained_on(target, s):
        out.print(uri)


if __name__ == "__main__":
    sys.exit(app())


@app.command()
@user_errors
def gc(
    dataset: Annotated[str | None, typer.Argument(help="Only this dataset (default: every dataset).")] = None,
) -> None:
    """Remove abandoned dataset versions: folders without a manifest whose writer is gone (a killed curate).

    A version being written by a live process is left alone; the next curate of the same inputs would resume an
    abandoned one instead, so run this to reclaim the space when you will not re-run it."""
    from vlforge.datasets import remove_abandoned

    removed = remove_abandoned(_settings(), dataset)
    for a in removed:
        out.print(f"removed {a.name}@{a.version} ({a.uri})")
    out.print(f"{len(removed)} abandoned version(s) removed")
