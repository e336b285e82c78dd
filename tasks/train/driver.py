"""The one training driver every recipe runs on: :func:`run_training` with a :class:`Recipe`'s hooks.

A recipe says what differs (build or load the initial model, the worker-side hooks that say what is trainable
and how to compute the loss, the final model to evaluate and register, the registry name and tags); the driver
does the rest the same way for all: resolve inputs before Ray starts, open or resume the run (refusing any
changed setting), plan the steps, write the initial model, run Ray Train, evaluate, register, end the run.

One training = one name = one folder ``<storage>/ray_results/<name>/`` (Ray Train's run folder with its
checkpoints, plus our ``vlforge_run.json``: the MLflow run id and the initial model) = one MLflow run.
Running the same name again resumes it from the newest checkpoint in the run folder (Ray Train's or the loop's own,
``tasks.train.checkpoints``) and the loop logs into the same MLflow run.

A one-worker training without a configured Ray cluster runs in this process (:func:`trains_in_driver`: Ray Train's
local mode, and no Ray at all when its tensors are small), which spares it Ray's start-up, a Ray Data pass and a
worker actor's start; several workers, or a cluster, run on Ray Train's worker group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tasks.train import checkpoints
from tasks.train.args import TrainArgs
from tasks.train.loop import LoopConfig
from vlforge import console, storage
from vlforge.datasets import DatasetVersion, new_version_id
from vlforge.settings import Settings

RUN_FILE = "vlforge_run.json"


@dataclass
class TrainResult:
    run_id: str
    model_uri: str  # models:/vlforge-clip/3 (empty when not registered)
    registered: Any  # tasks.register.RegisteredModel | None
    metrics: dict[str, float]
    model_dir: str
    resumed: bool = False
    # Wall-clock times (time.time()) at which run_training reached each phase (bench/startup.py prints them).
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingRun:
    name: str
    root: str  # <storage>/ray_results/<name>
    run_id: str
    resumed: bool
    status: str
    info: dict = field(default_factory=dict)

    @property
    def init_uri(self) -> str:
        return storage.join(self.root, "init")


def results_root(settings: Settings) -> str:
    return storage.join(settings.storage_uri, "ray_results")


def default_name(stage: str, dv: DatasetVersion) -> str:
    return f"{stage}-{dv.name}-{new_version_id()}"


def open_training(
    settings: Settings,
    stage: str,
    name: str,
    dv: DatasetVersion,
    tags: dict[str, str],
    params: dict,
    experiment: str | None = None,
) -> TrainingRun:
    """The MLflow run of training ``name``: the existing one (resume) or a new one created here."""
    from vlforge.tracking import TAG_TRAIN_NAME, configure, log_to_run, safe_params, start_stage_run

    client = configure(settings)
    root = storage.join(results_root(settings), name)
    run_file = storage.join(root, RUN_FILE)
    if storage.exists(run_file):
        info = storage.read_json(run_file)
        run = client.get_run(info["run_id"])
        changed = sorted(
            k for k, v in safe_params(params).items() if k in run.data.params and run.data.params[k] != v
        )
        if changed and run.info.status != "FINISHED":
            from vlforge.errors import VlforgeError

            raise VlforgeError(
                f"training {name!r} exists with other settings ({', '.join(changed)}); resume it with the "
                "same settings, or choose a new --name"
            )
        return TrainingRun(name, root, info["run_id"], True, run.info.status, info)
    run_id = start_stage_run(
        settings, stage, name=name, dataset=dv, tags={TAG_TRAIN_NAME: name, **tags}, experiment=experiment
    )
    log_to_run(settings, run_id, params=params)
    info = {"run_id": run_id, "stage": stage, "dataset": dv.ref, "initialised": False}
    storage.write_json_atomic(run_file, info)
    return TrainingRun(name, root, run_id, False, "RUNNING", info)


def mark_initialised(tr: TrainingRun) -> None:
    tr.info["initialised"] = True
    storage.write_json_atomic(storage.join(tr.root, RUN_FILE), tr.info)


def save_init_model(bundle, tr: TrainingRun) -> None:
    """Save the initial model (with its tokenizer) where every worker and Ray Data task can read it."""
    if storage.is_remote(tr.init_uri):
        with tempfile.TemporaryDirectory() as tmp:
            bundle.save(tmp)
            storage.put_dir(tmp, tr.init_uri)
    else:
        bundle.save(storage.filesystem(tr.init_uri)[1])
    mark_initialised(tr)


def ray_storage(settings: Settings) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: the storage root's ray_results folder."""
    uri = results_root(settings)
    if not storage.is_remote(uri):
        return storage.filesystem(uri)[1], None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(uri)
    return path, PyFileSystem(FSSpecHandler(fs))


def fit(
    settings: Settings,
    tr: TrainingRun,
    loop_config: LoopConfig,
    dataset,
    *,
    num_workers: int,
    use_gpu: bool,
    max_failures: int,
):
    """Run the TorchTrainer; returns Ray's Result (with the last checkpoint). ``num_workers=0`` is Ray Train's
    local mode: the loop runs in this process (see :func:`trains_in_driver`)."""
    from vlforge.raycluster import use_train_v2

    use_train_v2()
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.train.loop import train_loop_per_worker

    if num_workers == 0:
        # LoggingConfig reaches worker actors only; in this process Ray Train's INFO lines (local mode's notice, a
        # "Reported metrics" per checkpoint) would reach the console.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    storage_path, storage_fs = ray_storage(settings)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # As bytes: Ray Train's controller actor receives this config and would otherwise unpickle it, importing
        # torch and the recipe's hooks in a process that never trains (seconds on the way to the first step).
        train_loop_config={"loop": pickle.dumps(loop_config)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu and num_workers > 0),
        run_config=RunConfig(
            name=tr.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (a "Checkpoint successfully created at ..." per report) stay in its
            # session log files; the console shows steps and loss from the MLflow run instead.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
        # One worker has nothing to split: it iterates the dataset itself. A split would add a coordinator
        # actor that hands the blocks over, polling on a core the training could use.
        dataset_config=DataConfig(
            datasets_to_split="all" if num_workers > 1 else [], execution_options=_ingest_options()
        ),
    )
    # fit() installs a SIGINT handler that holds the controller actor's handle and is never removed: after
    # training it kept the controller, its dataset manager and split coordinator alive (their memory and polling)
    # until the next training, and sent Ctrl-C during evaluation to the finished run's controller instead of
    # interrupting. Put the previous handler back, which releases the handle and with it those actors.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        with (
            console.progress(
                loop_config.total_steps, "steps", "training", poll=_loss_poll(settings, tr.run_id), every=2.0
            ),
            _torch_state_kept() if num_workers == 0 else contextlib.nullcontext(),
        ):
            return trainer.fit()
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _torch_state_kept():
    """A loop in this process sets torch's threads and deterministic algorithms for itself (as a worker process
    does); the rest of the command (evaluation, the next training of a flow) gets the caller's back."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def trains_in_driver(settings: Settings, num_workers: int) -> bool:
    """Whether a training runs in this process (Ray Train's local mode, no worker actor, no Ray when its data is
    small: seconds to the first step) rather than on Ray Train workers: one worker, no Ray cluster configured (a
    cluster is where the user wants compute to run), and ``settings.local_training`` (the default)."""
    return num_workers == 1 and settings.local_training and not settings.ray_address


def _ingest_options():
    """Ray Train's default ingest options with the blocks kept in order: Train replaces the dataset's own execution
    options with these (``DataConfig.configure``), and an order that follows task completion would make every run
    draw other batches from the same seed (``tasks.train.data.tensor_dataset``)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _loss_poll(settings: Settings, run_id: str):
    """The last logged step and loss of the run (rank 0 logs them to MLflow every ``log_every`` steps)."""
    from vlforge.tracking import configure

    client = configure(settings)

    def poll():
        history = client.get_metric_history(run_id, "loss")
        if not history:
            return None
        last = max(history, key=lambda m: m.step)
        return last.step, f"loss {last.value:.4f}"

    return poll


def checkpoint_dir(result, tr: TrainingRun) -> str:
    """A local folder holding the final checkpoint's files: Ray Train's, or for a training in the driver (whose
    checkpoints the loop persists itself) the newest in the run folder."""
    ckpt = result.checkpoint
    if ckpt is None:
        saved = checkpoints.latest(tr.root)
        if saved is None:
            raise RuntimeError(f"training {tr.name!r} finished without a checkpoint")
        from tasks.train.data import local_dir

        return local_dir(saved.uri)
    if not storage.is_remote(tr.root) and os.path.isdir(ckpt.path):
        return ckpt.path
    return ckpt.to_directory(tempfile.mkdtemp(prefix="vlforge-ckpt-"))


def output_dir(settings: Settings, tr: TrainingRun) -> str:
    """Where the final model folder is written (local; a temp folder when storage is remote)."""
    if storage.is_remote(settings.storage_uri):
        return tempfile.mkdtemp(prefix=f"vlforge-{tr.name}-")
    path = os.path.join(storage.filesystem(tr.root)[1], "final")
    os.makedirs(path, exist_ok=True)
    return path


def steps_plan(
    n_train: int, batch_size: int, num_workers: int, grad_accum: int, epochs: int
) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); every worker gets an equal shard and drops the last batch."""
    from vlforge.errors import VlforgeError

    per_worker = n_train // max(1, num_workers)
    steps_per_epoch = (per_worker // batch_size) // max(1, grad_accum)
    if steps_per_epoch < 1:
        raise VlforgeError(
            f"{n_train} training rows are too few for batch size {batch_size} x {num_workers} workers x "
            f"{grad_accum} accumulation steps; lower --batch-size or use a larger dataset"
        )
    return steps_per_epoch, steps_per_epoch * max(1, epochs)


def torch_threads(num_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


def resolve_use_gpu(use_gpu: bool | None, in_driver: bool = False) -> bool:
    """``use_gpu``, or when unset whether the trainer has GPUs: this machine's for a training in the driver, the
    Ray cluster's otherwise."""
    if not in_driver:
        if use_gpu is not None:
            return use_gpu
        from vlforge.raycluster import cluster_gpus

        return cluster_gpus() > 0
    import torch

    if use_gpu and not torch.cuda.is_available():
        from vlforge.errors import VlforgeError

        raise VlforgeError(
            "--use-gpu, but this machine has no GPU that torch can use; train without it, or on a Ray cluster "
            "with GPUs (VLFORGE_RAY_ADDRESS)"
        )
    return torch.cuda.is_available() if use_gpu is None else use_gpu


def finish_run(settings: Settings, run_id: str, metrics: dict[str, float], status: str = "FINISHED") -> None:
    from vlforge.tracking import end_run

    end_run(settings, run_id, status, metrics={k: float(v) for k, v in metrics.items()})


def finished_result(settings: Settings, tr: TrainingRun, model_name: str) -> TrainResult:
    """The result of a training that already finished (running it again by name is a no-op)."""
    from vlforge.tracking import configure

    client = configure(settings)
    run = client.get_run(tr.run_id)
    versions = client.search_model_versions(f"name='{model_name}' and run_id='{tr.run_id}'")
    uri = f"models:/{model_name}/{versions[0].version}" if versions else ""
    model_dir = os.path.join(storage.filesystem(tr.root)[1], "final")
    return TrainResult(tr.run_id, uri, None, dict(run.data.metrics), model_dir, resumed=True)


def evaluate_and_register(
    settings: Settings,
    tr: TrainingRun,
    recipe: Recipe,
    bundle,
    model_dir: str,
    *,
    eval_refs: list[str],
    heldout: str,
    adapter_dir: str | None = None,
) -> tuple[dict[str, float], Any]:
    """Evaluate on each eval set (the held-out split, then ``--eval-dataset``), log the metrics with their 95%
    intervals, register; the last set decides promotion (tasks.promotion: against the champion on the same
    pairs, and a fine-tune against its base on the domain and the general set)."""
    args = recipe.args
    evaluations, logged = recipe.evaluate(bundle, eval_refs, settings)
    registered = None
    if args.register_model:
        from tasks.register import register_model

        if not evaluations:
            from vlforge.errors import VlforgeError

            raise VlforgeError(
                "no evaluation data to decide promotion: the held-out split is empty; raise eval_fraction "
                "or pass eval_dataset"
            )
        registered = register_model(
            model_dir,
            name=recipe.model_name,
            run_id=tr.run_id,
            evaluation=evaluations[-1],
            settings=settings,
            base_model=recipe.base_model,
            adapter_dir=adapter_dir,
            heldout_data=heldout,
            bundle=bundle,
            **recipe.promotion(),
            **recipe.registration(settings),
        )
    finish_run(settings, tr.run_id, logged)
    return logged, registered


class Recipe:
    """What one kind of training adds to the driver. Subclasses set the class attributes and the hooks."""

    stage: str = ""  # MLflow experiment and default name prefix: "pretrain", "finetune"
    model_name: str = ""  # registered model name
    base_model: str | None = None  # the model it starts from (pinned), recorded as TAG_BASE_MODEL

    def __init__(self, args: TrainArgs):
        self.args = args

    def check(self, settings: Settings) -> None:
        """Resolve the recipe's own inputs (model URIs) before Ray starts: a wrong one fails in a second."""

    def check_dataset(self, dv: DatasetVersion) -> None:
        """Check the dataset has what the recipe reads (columns beyond key, image, caption) before Ray starts."""

    def params(self) -> dict[str, Any]:
        """Recipe settings beyond ``args`` that a resume must not change (e.g. the pinned base version)."""
        return {}

    def tags(self) -> dict[str, str]:
        return {}

    def initial_model(self, dv: DatasetVersion, settings: Settings, heldout: float):
        """The bundle training starts from (saved once to the run folder, read by every worker); ``heldout``
        is the split threshold of the held-out pairs (``tasks.train.data.dataset_split``)."""
        raise NotImplementedError

    def worker_hooks(self):
        """The worker side (:class:`tasks.train.loop.ClipModelHooks` or alike), pickled into the loop config."""
        raise NotImplementedError

    def train_dataset(self, dv: DatasetVersion, init_uri: str, heldout: float):
        """The training split as a Ray Dataset of model-ready batches (CLIP: pixels and caption tokens)."""
        from tasks.train.data import train_dataset

        return train_dataset(dv, init_uri, eval_fraction=heldout, augment=True, seed=self.args.seed)

    def promotion(self) -> dict[str, Any]:
        """Keyword arguments of the promotion rule beyond the defaults (a fine-tune's general set and margin)."""
        return {}

    def registration(self, settings: Settings) -> dict[str, Any]:
        """More keyword arguments of ``tasks.register.register_model`` (a VLM's pyfunc, evaluator and tags)."""
        return {}

    def evaluate(self, bundle, eval_refs: list[str], settings: Settings) -> tuple[list, dict[str, float]]:
        """The final model on each eval set: ``(evaluations, metrics named for MLflow)``; the last evaluation
        decides promotion. CLIP: retrieval recall and zero-shot accuracy (``tasks.evaluate.evaluate_sets``)."""
        from tasks.evaluate import evaluate_sets

        return evaluate_sets(bundle, eval_refs, settings, self.args.class_prompts)

    def final_model(self, ckpt_dir: str, tr: TrainingRun, model_dir: str) -> tuple[Any, str | None]:
        """Write the model to register into ``model_dir`` from the last checkpoint; ``(bundle, adapter_dir)``."""
        raise NotImplementedError


def train_data(settings: Settings, pipeline, in_driver: bool):
    """The recipe's training tensors (a ``tasks.train.data.TensorPipeline``) where the loop reads them: decoded in
    this process for a training in the driver when they fit ``IN_PROCESS_BYTES`` (no Ray at all), else a Ray
    Dataset (Ray started or reused; a small version decoded here, ``Settings.driver_decode_rows``)."""
    if in_driver and pipeline.fits_in_process():
        return pipeline.in_process()
    from vlforge.raycluster import init_ray

    init_ray(settings)
    return pipeline.ray_dataset(driver_rows=settings.driver_decode_rows)


def run_training(
    recipe: Recipe,
    dataset: str,
    settings: Settings,
    *,
    experiment: str | None = None,
    run_tags: dict[str, str] | None = None,
    fail_once: dict | None = None,
) -> TrainResult:
    """Train ``recipe`` on ``dataset`` (``name[@version]``): the same name again resumes, a finished one is a
    no-op. The run goes to the stage's MLflow experiment, or to ``experiment`` with ``run_tags`` (a curation
    experiment's child runs). ``fail_once`` is a test hook (``{"rank", "step", "marker"}``: that rank exits hard
    once at that step)."""
    from tasks.train.data import LOCAL_FILES, SPLIT_RULE, dataset_split, heldout_ref
    from vlforge.datasets import resolve_dataset
    from vlforge.raycluster import init_ray
    from vlforge.tracking import TAG_BASE_MODEL

    args = recipe.args
    phases = {"start": time.time()}
    # Every address resolved before Ray starts: a wrong one fails in a second, not after Ray's start-up.
    dv = resolve_dataset(settings, dataset)
    eval_dv = resolve_dataset(settings, args.eval_dataset) if args.eval_dataset else None
    recipe.check_dataset(dv)
    recipe.check(settings)
    args = (
        recipe.args
    )  # check may settle what the recipe's defaults mean (a VLM recipe's stage learning rate)
    phases["resolved"] = time.time()
    in_driver = trains_in_driver(settings, args.num_workers)
    if not in_driver or len(dv.part_files("data")) > LOCAL_FILES:  # the split of many files runs on Ray
        init_ray(settings)
    phases["ray"] = time.time()
    name = args.name or default_name(recipe.stage, dv)
    gpu = resolve_use_gpu(args.use_gpu, in_driver)
    heldout, n_train = dataset_split(dv, args.eval_fraction, args.min_eval_pairs, args.max_eval_pairs)
    steps_per_epoch, total = steps_plan(
        n_train, args.batch_size, args.num_workers, args.grad_accum, args.epochs
    )
    params = {
        "dataset": dv.ref,
        **args.tracked(),
        **recipe.params(),
        "eval_dataset": eval_dv.ref if eval_dv else None,
        "use_gpu": gpu,
        "heldout_fraction": heldout,
        "split_rule": SPLIT_RULE,  # how the held-out rows were chosen (by image content)
        "train_rows": n_train,
        "total_steps": total,
    }
    tags = {
        **recipe.tags(),
        **({TAG_BASE_MODEL: recipe.base_model} if recipe.base_model else {}),
        **(run_tags or {}),
    }
    tr = open_training(settings, recipe.stage, name, dv, tags, params, experiment)
    phases["opened"] = time.time()
    if tr.status == "FINISHED":
        return finished_result(settings, tr, recipe.model_name)
    try:
        if not tr.info.get("initialised"):
            save_init_model(recipe.initial_model(dv, settings, heldout), tr)
        phases["initial_model"] = time.time()
        start = checkpoints.latest(tr.root)
        cfg = LoopConfig(
            run_id=tr.run_id, tracking_uri=settings.tracking_uri, init_uri=tr.init_uri,
            model=recipe.worker_hooks(), total_steps=total, steps_per_epoch=steps_per_epoch,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
            grad_accum=args.grad_accum, grad_checkpointing=args.grad_checkpointing,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
            torch_threads=torch_threads(args.num_workers), params=params, dataset=dv, fail_once=fail_once,
            resume_from=start.uri if start else None, resume_step=start.step if start else 0,
            checkpoint_root=tr.root if in_driver else None, device=("cuda" if gpu else "cpu") if in_driver else None,
        )  # fmt: skip
        ds = train_data(settings, recipe.train_dataset(dv, tr.init_uri, heldout), in_driver)
        phases["data"] = time.time()
        result = fit(
            settings, tr, cfg, ds, num_workers=0 if in_driver else args.num_workers, use_gpu=gpu,
            max_failures=args.max_failures,
        )  # fmt: skip
        phases["trained"] = time.time()
        model_dir = output_dir(settings, tr)
        bundle, adapter_dir = recipe.final_model(checkpoint_dir(result, tr), tr, model_dir)
        held = heldout_ref(dv, heldout)
        metrics, registered = evaluate_and_register(
            settings, tr, recipe, bundle, model_dir, adapter_dir=adapter_dir, heldout=held,
            eval_refs=[held] + ([eval_dv.ref] if eval_dv else []),
        )  # fmt: skip
    except BaseException as exc:
        finish_run(settings, tr.run_id, {}, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    uri = registered.uri if registered else ""
    phases["end"] = time.time()
    return TrainResult(tr.run_id, uri, registered, metrics, model_dir, resumed=tr.resumed, phases=phases)
