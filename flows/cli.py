"""The ``vlforge`` command line (Typer). Each stage command calls the stage's plain function; ``demo`` runs the
flows through Prefect; ``serve`` serves the deployments. A user error prints one line and exits with 2."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated

import typer

from flows.options import collect, model_options
from flows.params import DemoParams
from flows.train_options import collect_training, training_options
from tasks.curate.filters import FilterConfig
from tasks.experiment.curation import CurationExperimentArgs
from tasks.export.args import ExportArgs
from tasks.ingest.args import IngestArgs
from vlforge import console as ui
from vlforge import defaults
from vlforge.errors import VlforgeError, printable

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
LOGGED_COMMANDS = (
    "ingest", "curate", "recaption", "pretrain", "finetune", "demo", "export", "experiment_curation"
)  # fmt: skip


def _quiet_environment() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Prefect's ephemeral API can take a while to boot on a small, busy machine (default 20 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The ephemeral API's telemetry service: it phones home at start-up and logs an ERROR when it cannot.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _error_line(exc: BaseException | str) -> str:
    """The message as printable text for the console (rich markup in it shown as it is)."""
    from rich.markup import escape

    return escape(printable(str(exc)))


def _log_failure(command: str, exc: BaseException) -> str | None:
    """Write the traceback of a command that ran without a session to a log file of its own; its path."""
    import logging
    import traceback

    try:
        from vlforge import command_log

        path, _ = command_log.location(_settings(), command)  # kept local: the store may be what failed
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"vlforge {command}: {' '.join(sys.argv)}\n")
            fh.write("".join(traceback.format_exception(exc)))
        return path
    except Exception:  # no storage to log to (the very thing that failed): the traceback goes nowhere visible
        logging.getLogger("vlforge").debug("cannot write the failure log", exc_info=True)
        return None


def _run_unlogged(fn, args, kwargs):
    """A command that prints what it finds (datasets, lineage, promote, gc, serve): no log session, but the
    same one-line errors; an unexpected failure's traceback goes to a log file."""
    try:
        return fn(*args, **kwargs)
    except VlforgeError as exc:
        console.print(f"[bold red]error:[/] {_error_line(exc)}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        raise typer.Exit(130) from None
    except Exception as exc:
        from vlforge.storage import unreachable

        path = _log_failure(fn.__name__, exc)
        store = unreachable(exc)  # a server the user named that does not answer: their error to fix (2)
        console.print(
            f"[bold red]error:[/] {_error_line(store or f'{type(exc).__name__}: {exc}')}", highlight=False
        )
        if path:
            console.print(f"the full traceback is in the log: {path}", highlight=False)
        raise typer.Exit(2 if store else 1) from None


def user_errors(fn):
    """Run a command: library output to its log file (LOGGED_COMMANDS), a VlforgeError as one clear line and
    exit status 2, Ctrl-C as exit status 130, any other failure as one line naming the log file that holds the
    traceback (status 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_environment()
        if fn.__name__ not in LOGGED_COMMANDS:
            return _run_unlogged(fn, args, kwargs)
        with ui.session(fn.__name__, _settings(), verbose=_verbose) as log_path:
            try:
                result = fn(*args, **kwargs)
            except VlforgeError as exc:
                ui.log.error("%s", exc)
                console.print(f"[bold red]error:[/] {_error_line(exc)}", highlight=False)
                console.print(f"log: {log_path}", highlight=False)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                ui.log.exception("interrupted")
                console.print(f"interrupted; log: {log_path}", highlight=False)
                raise typer.Exit(130) from None
            except Exception as exc:
                from vlforge.storage import unreachable

                ui.log.exception("vlforge %s failed", fn.__name__)
                store = unreachable(exc)
                console.print(
                    f"[bold red]error:[/] {_error_line(store or f'{type(exc).__name__}: {exc}')}",
                    highlight=False,
                )
                console.print(f"the full traceback is in the log: {log_path}", highlight=False)
                raise typer.Exit(2 if store else 1) from None
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
@model_options(IngestArgs)
def ingest(
    url_list: Annotated[
        str,
        typer.Argument(help="URL list file, folder or glob (csv/tsv/json/jsonl/parquet), local or s3://."),
    ],
    source: Annotated[str, typer.Option(help="Source name; raw batches go to raw/<source>/.")],
    force: Annotated[
        bool, typer.Option(help="Ingest a list again although it was ingested (e.g. after a bad setting).")
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(help="For lists already ingested: fetch again only the rows that failed transiently."),
    ] = False,
    **options,
) -> None:
    """Download image-text pairs from URL lists with img2dataset (resumable; every row accounted for)."""
    from tasks.ingest import ingest as run

    args = collect(IngestArgs, options)
    with ui.stage(f"ingest {url_list} into source {source}"):
        results = run(url_list, source, _settings(), args, force=force, retry_failed=retry_failed)
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
@model_options(FilterConfig)
def curate(
    source: Annotated[str, typer.Option(help="Source whose raw batches to curate.")],
    dataset: Annotated[str, typer.Option(help="Dataset to publish a new version of.")],
    scorer: Annotated[
        str | None, typer.Option(help="CLIP scorer: models:/NAME@ALIAS, a folder or a HF id.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Scoring batch size.")] = defaults.SCORING_BATCH,
    force: Annotated[bool, typer.Option(help="Publish a new version even if nothing changed.")] = False,
    allow_empty: Annotated[
        bool, typer.Option(help="Publish the version even if the filters keep no row (refused otherwise).")
    ] = False,
    eval_set: Annotated[
        bool, typer.Option(help="Mark the version an eval set: later pools are decontaminated against it.")
    ] = False,
    **options,
) -> None:
    """Score pairs with CLIP on Ray, filter, dedup and publish a versioned Parquet dataset."""
    from tasks.curate.filters import check_score_rule

    filters = collect(FilterConfig, options)
    check_score_rule(filters.min_score, filters.top_fraction, scorer)
    settings = _settings()
    if scorer:
        _check_model_uri(scorer, settings)
    from tasks.curate import curate as run

    with ui.stage(f"curate source {source} into dataset {dataset}"):
        result = run(
            source,
            dataset,
            settings,
            scorer=scorer,
            filters=filters,
            batch_size=batch_size,
            force=force,
            allow_empty=allow_empty,
            eval_set=eval_set,
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
def recaption(
    dataset: Annotated[
        str, typer.Argument(help="Dataset to recaption: NAME (newest version) or NAME@VERSION.")
    ],
    model: Annotated[
        str, typer.Option(help="The captioning VLM: models:/NAME@ALIAS, models:/NAME/N or a folder.")
    ] = defaults.DEFAULT_VLM_URI,
    prompt: Annotated[str, typer.Option(help="The instruction the VLM answers for each image.")] = (
        "Describe the image."
    ),
    max_new_tokens: Annotated[int, typer.Option(help="Longest caption, in tokens.")] = 24,
    batch_size: Annotated[int, typer.Option(help="Images per generate call (one actor batch).")] = 16,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Publish into this dataset (default: a new version of DATASET)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Publish a new version even if nothing changed.")] = False,
) -> None:
    """Write a caption_synthetic for every row with a VLM (Ray Data batch inference) and publish a new version
    beside the original caption (resumable; the card and lineage name the captioning model)."""
    from tasks.recaption import recaption as run

    with ui.stage(f"recaption {dataset} with {model}"):
        r = run(
            dataset, _settings(), model=model, prompt=prompt, max_new_tokens=max_new_tokens,
            batch_size=batch_size, to=to, force=force,
        )  # fmt: skip
    dv = r.dataset_version
    if r.skipped:
        out.print(f"nothing new: {dv.ref} already holds captions of {r.source} by this model and prompt")
        return
    out.print(f"published {dv.ref} at {dv.uri}")
    resumed = f", {r.resumed_parts} part(s) kept from an unfinished run" if r.resumed_parts else ""
    rate = f" at {r.captions_per_s:.1f} captions/s" if r.captioned else ""
    out.print(
        f"  {r.rows} rows from {r.source}: {r.rows - r.undecodable} captioned ({r.captioned} now{rate}), "
        f"{r.undecodable} undecodable{resumed}",
        highlight=False,
    )
    out.print(f"  captioner: {r.captioner['pinned']}", highlight=False)
    if r.mlflow_run_id:
        out.print(f"  MLflow run: {r.mlflow_run_id}")


DATASET_HELP = "Dataset to train on: NAME (newest version) or NAME@VERSION."


@app.command()
@user_errors
@training_options("pretrain")
def pretrain(dataset: Annotated[str, typer.Option(help=DATASET_HELP)], **options) -> None:
    """Contrastive (CLIP) pretraining with Ray Train; logs to MLflow and registers vlforge-clip. A VLM recipe
    (--recipe vlm-tiny) trains the VLM's adapter on image-caption pairs instead and registers vlforge-vlm.
    Options without a default take the chosen recipe's (each option's help names them)."""
    from tasks.train.driver import run_training
    from tasks.train.recipes import family_of_args

    settings = _settings()
    args = collect_training("pretrain", options)  # an unknown name or another family's setting fails here
    recipe = family_of_args(args).recipe(args)  # an unknown recipe fails here
    _check_inputs(settings, dataset, args.eval_dataset, getattr(args, "init", None))
    recipe.check(settings)  # --vision-model resolves now, before Ray starts
    with ui.stage(f"pretrain {getattr(args, 'init', None) or args.recipe} on {dataset}"):
        result = run_training(recipe, dataset, settings)
    _print_train(result)


@app.command()
@user_errors
@training_options("finetune")
def finetune(dataset: Annotated[str, typer.Option(help=DATASET_HELP)], **options) -> None:
    """LoRA (peft) fine-tuning of a registered model; registers vlforge-clip-lora. --recipe vlm instruction-tunes
    a VLM (LoRA on its language model) on rows with a prompt and a response; registers vlforge-vlm-lora.
    Options without a default take the chosen recipe's (each option's help names them)."""
    from tasks.train.driver import run_training
    from tasks.train.recipes import family_of_args

    settings = _settings()
    args = collect_training("finetune", options)  # an unknown recipe or another family's setting fails here
    recipe = family_of_args(args).recipe(args)
    _check_inputs(settings, dataset, args.eval_dataset, recipe.base_model)
    recipe.check(settings)  # --base resolves (and is a model of the right kind) before Ray starts
    with ui.stage(f"fine-tune {recipe.base_model} on {dataset}"):
        result = run_training(recipe, dataset, settings)
    _print_train(result)


experiment_app = typer.Typer(
    no_args_is_help=True, help="Experiments that show what a stage is worth (vlforge experiment curation)."
)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("curation")
@user_errors
@model_options(CurationExperimentArgs)
def experiment_curation(**options) -> None:
    """Train the same recipe for the same samples seen on the pool unfiltered, CLIP-threshold filtered and
    top-fraction filtered; evaluate each on one eval set with 95% intervals (DataComp's experiment)."""
    from tasks.experiment.curation import run_curation_experiment, table_rows

    args = collect(CurationExperimentArgs, options)
    settings = _settings()
    _check_inputs(settings, args.pool, args.eval, args.scorer)
    result = run_curation_experiment(args, settings)
    for row in table_rows(result):
        out.print(
            f"{row['arm']}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "arm"), highlight=False
        )
    out.print(f"[bold]{result['verdict']}[/]", highlight=False)
    out.print(f"MLflow run: {result['mlflow_run_id']}")
    if args.output:
        out.print(f"results: {args.output}")


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


def _figures(metrics: dict[str, float]) -> list[str]:
    """``name value [low, high]`` for each metric logged with its 95% interval."""
    return [
        f"{k} {v:.3f} [{metrics[k + '_ci_low']:.3f}, {metrics[k + '_ci_high']:.3f}]"
        for k, v in sorted(metrics.items())
        if k + "_ci_low" in metrics and k + "_ci_high" in metrics
    ]


def _print_train(result) -> None:
    reg = result.registered
    out.print(f"MLflow run: {result.run_id}")
    if reg:
        out.print(f"registered {reg.uri} as {reg.alias}: {reg.decision.reason}", highlight=False)
        for line in reg.decision.lines()[1:]:  # each comparison with its 95% interval
            out.print(line, highlight=False)
    for k, v in sorted((result.metrics or {}).items()):
        out.print(f"  {k}: {v:.4f}")


@app.command()
@user_errors
@model_options(DemoParams)
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    **options,
) -> None:
    """Run the whole pipeline on synthetic data served on 127.0.0.1 (embedded defaults, no services)."""
    from flows.demo import demo as run

    params = collect(DemoParams, options)
    s = _settings()
    from vlforge.tracking import redact

    console.print(f"[bold]vlforge demo[/]: storage {s.storage_uri}, MLflow {redact(s.tracking_uri)}")
    summary = run(params)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print("\n[bold]Summary[/]")
    out.print(f"dataset version: {summary['dataset_version']} (seed set: {summary['seed_dataset']})")
    out.print(f"mismatched pairs removed by the CLIP filter: {summary['mismatched_removed']:.1%}")
    out.print(f"matched pairs kept: {summary['matched_kept']:.1%}")
    out.print(f"eval set: {summary['eval_dataset']}; fine-tuning domain: {summary['domain_dataset']}")
    for what, decision in summary["decisions"].items():
        alias = summary["aliases"][what] or "not registered"
        out.print(f"[bold]{what}[/] {summary['models'][what]} -> {alias}", highlight=False)
        for line in decision:
            out.print(f"  {line.strip()}", highlight=False)
        if what.startswith("VLM"):  # its figures and the same model on a blank image: is the image used?
            for line in _figures(summary["metrics"][what]):
                out.print(f"  {line}", highlight=False)
    for note in summary.get("notes", []):
        out.print(f"note: {note}", highlight=False)
    for stage, run_id in summary["runs"].items():
        out.print(f"MLflow run ({stage}): {run_id}")
    out.print(f"MLflow UI: mlflow ui --backend-store-uri {redact(s.tracking_uri)}")


@app.command()
@user_errors
def serve(
    refresh_cron: Annotated[
        str, typer.Option(help="Cron schedule of the refresh deployment.")
    ] = defaults.REFRESH_CRON,
    refresh_location: Annotated[
        str | None, typer.Option(help="Where URL lists land (folder, glob, s3://).")
    ] = None,
    refresh_source: Annotated[str | None, typer.Option(help="Source name for the refresh.")] = None,
    refresh_dataset: Annotated[str | None, typer.Option(help="Dataset the refresh publishes.")] = None,
    train_on_publish: Annotated[
        str | None, typer.Option(help="Run the train deployment on each new version of this dataset.")
    ] = None,
) -> None:
    """Serve the refresh (scheduled), train and pipeline deployments to the Prefect server at PREFECT_API_URL."""
    from flows.deployments import serve_deployments

    serve_deployments(
        _settings(),
        refresh_cron=refresh_cron,
        refresh_source=refresh_source,
        refresh_location=refresh_location,
        refresh_dataset=refresh_dataset,
        train_on_publish=train_on_publish or None,
    )


@app.command()
@user_errors
def datasets(
    name: Annotated[
        str | None,
        typer.Argument(help="Show the versions of this dataset (NAME, or NAME@VERSION with --card)."),
    ] = None,
    card: Annotated[
        bool, typer.Option("--card", help="Print the version's dataset card (README.md).")
    ] = False,
) -> None:
    """List datasets, or the complete versions of one, or print a version's dataset card."""
    from vlforge.datasets import DatasetRef, list_datasets, list_versions, resolve_dataset

    s = _settings()
    if card:
        if name is None:
            raise VlforgeError("--card needs a dataset: vlforge datasets NAME[@VERSION] --card")
        from tasks.curate.card import read_card

        sys.stdout.write(read_card(resolve_dataset(s, name)))
        return
    if name is None:
        for n in list_datasets(s):
            out.print(f"{n}  (latest {resolve_dataset(s, n).version})")
        return
    dv = resolve_dataset(s, name)  # an unknown dataset or version: the same error as --card gives
    versions = [dv.version] if DatasetRef.parse(name).version else list_versions(s, dv.name)
    for v in versions:
        m = dv.manifest if v == dv.version else resolve_dataset(s, f"{dv.name}@{v}").manifest
        out.print(f"{dv.name}@{v}  {json.dumps(m.get('counts', {}))}")


@app.command()
@user_errors
@model_options(ExportArgs)
def export(
    dataset: Annotated[str, typer.Argument(help="NAME (its newest version) or NAME@VERSION.")],
    to: Annotated[str, typer.Option("--to", help="Destination folder: a local path or s3://bucket/prefix.")],
    **options,
) -> None:
    """Export a dataset version as WebDataset shards or a Hugging Face datasets folder (resumable)."""
    from tasks.export import export_dataset
    from vlforge.storage import join

    args = collect(ExportArgs, options)
    with ui.stage(f"export {dataset} as {args.format} to {to}"):
        r = export_dataset(dataset, _settings(), args, to=to)
    state = (
        "already exported"
        if r.skipped
        else f"{len(r.files)} files" + (f", {r.resumed} kept from an unfinished run" if r.resumed else "")
    )
    out.print(f"{r.dataset_version} -> {r.uri} ({r.format}, {r.rows} rows, {state})")
    if r.format == "webdataset":
        out.print(f"  shards: {join(r.uri, r.manifest['pattern'])}", highlight=False)
    out.print(f"  MLflow run: {r.mlflow_run_id or r.lineage_error or 'none (the version has no run)'}")


@app.command()
@user_errors
def lineage(
    target: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS (walk back) or a dataset NAME[@VERSION] (forward).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the lineage as JSON.")] = False,
) -> None:
    """Back from a registered model to its URL lists and the scorer models that curated its data (and their
    own chains), or forward from a dataset version to its models, the datasets they scored, and on."""
    from vlforge.lineage import walk_back, walk_forward

    s = _settings()
    node = walk_back(target, s) if target.startswith("models:/") else walk_forward(target, s)
    if as_json:
        out.print_json(json.dumps(node.to_dict()))
        return
    for line in node.lines():
        out.print(line, highlight=False, soft_wrap=True)  # a path or URI stays whole on one line


@app.command()
@user_errors
def promote(
    model_uri: Annotated[str, typer.Argument(help="The registered version, models:/NAME/N.")],
    alias: Annotated[str, typer.Option(help="Alias to give it.")] = "champion",
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the version's tags).")] = None,
) -> None:
    """Give a registered version an alias by hand, overriding the promotion rule; who and why are recorded."""
    from tasks.promotion import override
    from vlforge.registry import registered_version

    s = _settings()
    decision = override(model_uri, alias, s, reason=reason)
    mv = registered_version(model_uri, s)
    out.print(f"models:/{mv.name}/{mv.version} is now {alias}", highlight=False)
    for line in decision.lines():
        out.print(f"  {line}", highlight=False)


@app.command()
@user_errors
def gc(
    dataset: Annotated[str | None, typer.Argument(help="Only this dataset (default: every dataset).")] = None,
) -> None:
    """Remove abandoned dataset versions: folders without a manifest whose writer is gone (a killed curate).

    A version being written by a live process is left alone; the next curate of the same inputs would resume an
    abandoned one instead, so run this to reclaim the space when you will not re-run it."""
    from vlforge.datasets import collect_garbage

    removed = collect_garbage(_settings(), dataset)
    for a in removed:
        out.print(f"removed {a.name}@{a.version} ({a.uri})")
    out.print(f"{len(removed)} abandoned version(s) removed")


if __name__ == "__main__":
    from flows.main import run_app

    run_app(app)
