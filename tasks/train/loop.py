"""The Ray Train loop shared by every recipe (runs on every worker).

The driver hands each worker one typed :class:`LoopConfig`; its ``model`` is the recipe's worker side
(:class:`ClipModelHooks` for CLIP and its LoRA fine-tune, ``tasks.train.vlm_data.VlmModelHooks`` for the VLM stages): how to build the trainable module, the loss of a
batch (CLIP: the symmetric InfoNCE over the global batch, embeddings all-gathered across workers, with the
learnable temperature), what to do after a step, and what a checkpoint holds. The loop itself is recipe-free:
AdamW with a cosine schedule and linear warmup, gradient accumulation, bf16 autocast on GPU, optional gradient
checkpointing. Rank 0 logs to the MLflow run the driver created and writes the checkpoints (the recipe's files
plus ``train_state.pt``: optimizer, scheduler, step). A restarted worker group resumes from
``ray.train.get_checkpoint()``; a training in the driver (Ray Train's local mode) writes its checkpoints to the run
folder itself (``tasks.train.checkpoints``) and starts from the newest one the driver found there.

The schedule is ours, not transformers' ``get_cosine_schedule_with_warmup``: that one trains its first step at
learning rate 0, a wasted step that matters in the few-hundred-step trainings of small data.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from models.lora import LoraArgs

STATE_FILE = "train_state.pt"
PREFETCH_BATCHES = 4  # batches ready ahead of the step on each worker
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results (CUDA docs, "Reproducibility")


def deterministic_torch(seed: int) -> None:
    """Seed every generator a worker draws from (the initial LoRA adapters, dropout) and ask torch for its
    deterministic kernels wherever it has one (``warn_only``: an op without one warns instead of failing).
    On CPU this, with the seeded data order of ``tasks.train.data``, makes a one-worker training bitwise
    reproducible; on GPU cuDNN's autotuner is off and cuBLAS uses a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``,
    set before CUDA starts); docs/training.md "Reproducibility" says what stays nondeterministic there."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every Ray Train worker (pickled once into ``train_loop_config``)."""

    run_id: str
    tracking_uri: str
    init_uri: str  # the initial model's folder (local or remote), written by the driver
    model: ClipModelHooks  # the recipe's worker side: build, loss, after_step, save (or VlmModelHooks)
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_accum: int
    grad_checkpointing: bool
    checkpoint_every: int
    log_every: int
    seed: int
    torch_threads: int
    params: dict[str, Any] = field(default_factory=dict)  # logged to the run by rank 0
    dataset: Any = None  # DatasetVersion: logged as the run's training input
    fail_once: dict | None = None  # test hook: {"rank", "step", "marker"}
    # The newest checkpoint the driver found in the run folder (tasks.train.checkpoints.latest) and its step: where
    # a training starts when Ray Train restores none as new (a training in the driver, or one it wrote before).
    resume_from: str | None = None
    resume_step: int = 0
    # Set for a training in the driver (Ray Train's local mode, which keeps checkpoints in memory only): the run
    # folder the loop writes its checkpoints to (tasks.train.checkpoints.save).
    checkpoint_root: str | None = None
    device: str | None = (
        None  # a training in the driver: "cpu" or "cuda", as resolved (local mode asks torch)
    )


@dataclass(frozen=True)
class ClipModelHooks:
    """The worker side of a CLIP recipe: build the trainable module from the initial model or a checkpoint,
    the contrastive loss of a batch, and what a checkpoint holds (``model/`` in full, or the LoRA ``adapter/``)."""

    lora: LoraArgs | None = None

    def build(self, init_dir: str, ckpt_dir: str | None):
        """(bundle, trainable module)."""
        from models.clip import load_clip

        if self.lora is None:
            bundle = load_clip(os.path.join(ckpt_dir, "model") if ckpt_dir else init_dir)
            return bundle, bundle.model
        from models.lora import apply_lora, load_adapter

        bundle = load_clip(init_dir)
        if ckpt_dir:
            return bundle, load_adapter(bundle.model, os.path.join(ckpt_dir, "adapter"), trainable=True)
        return bundle, apply_lora(bundle.model, self.lora)

    def loss(self, module, batch):
        from models.clip import global_clip_loss

        out = module(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )
        return global_clip_loss(
            out.image_embeds.float(), out.text_embeds.float(), _clip_model(module).logit_scale
        )

    def after_step(self, module) -> dict[str, float]:
        """Clamp the learnable temperature as CLIP does; its value is a metric."""
        clip = _clip_model(module)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100.0))
        return {"temperature": float(1.0 / clip.logit_scale.detach().exp())}

    def save(self, bundle, module, folder: str) -> None:
        save_model_or_adapter(bundle, module, folder, adapter=self.lora is not None)


def save_model_or_adapter(bundle, module, folder: str, adapter: bool) -> None:
    """A checkpoint's recipe files: the peft ``adapter/`` (a LoRA recipe) or the whole bundle's ``model/``."""
    inner = getattr(module, "module", module)  # DDP
    if adapter:
        inner.save_pretrained(os.path.join(folder, "adapter"))
    else:
        bundle.model = inner
        bundle.save(os.path.join(folder, "model"))


def _clip_model(module):
    """The underlying model of a DDP and/or peft wrapper (the CLIPModel, for its logit_scale)."""
    m = getattr(module, "module", module)  # DDP
    return m.get_base_model() if hasattr(m, "get_base_model") else m


class _MlflowLogger:
    """Rank-0 MLflow logging into the driver's run; per-step metrics are buffered and written in batches."""

    def __init__(self, config: LoopConfig, rank: int):
        self.enabled = rank == 0 and bool(config.run_id)
        self.buffer: list = []
        if not self.enabled:
            return
        from vlforge.tracking import continue_run_in_worker

        self.tracking_uri, self.run_id = config.tracking_uri, config.run_id
        continue_run_in_worker(self.tracking_uri, self.run_id, config.params, config.dataset)

    def log(self, metrics: dict[str, float], step: int, flush_every: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= flush_every * len(metrics):
            self.flush()

    def flush(self) -> None:
        if self.enabled and self.buffer:
            from vlforge.tracking import log_metric_batch

            log_metric_batch(self.tracking_uri, self.run_id, self.buffer)
            self.buffer = []

    def close(self) -> None:
        if not self.enabled:
            return
        from vlforge.tracking import leave_worker_run

        self.flush()
        leave_worker_run()  # the run stays RUNNING: the driver evaluates, registers and ends it


def _save_checkpoint(bundle, module, optimizer, scheduler, step: int, config: LoopConfig, metrics: dict):
    import ray.train
    from ray.train import Checkpoint

    def write(folder: str) -> None:
        config.model.save(bundle, module, folder)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
            os.path.join(folder, STATE_FILE),
        )

    if config.checkpoint_root:  # a training in the driver: the checkpoint is persisted here, not by Ray Train
        from tasks.train import checkpoints

        checkpoints.save(config.checkpoint_root, step, write, metrics)
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="vlforge-ckpt-") as tmp:
        if ray.train.get_context().get_world_rank() == 0:
            write(tmp)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)


@contextlib.contextmanager
def _start_checkpoint(config: LoopConfig):
    """The folder of the checkpoint to start from, or None: Ray Train's (a restarted worker group, or a run Ray
    Train restored) unless the driver found a newer one in the run folder (``resume_from``, written by a training
    in the driver), then that one."""
    import ray.train

    from tasks.train.data import local_dir

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            if not config.resume_step or _checkpoint_step(folder) >= config.resume_step:
                yield folder
                return
    yield local_dir(config.resume_from) if config.resume_from else None


def _checkpoint_step(folder: str) -> int:
    return int(torch.load(os.path.join(folder, STATE_FILE))["step"])


def _maybe_fail(config: LoopConfig, rank: int, step: int) -> None:
    """Test-only fault injection: the named rank exits hard once at the named step (a marker file says so)."""
    hook = config.fail_once
    if not hook or hook.get("rank") != rank or hook.get("step") != step:
        return
    marker = hook["marker"]
    if os.path.exists(marker):
        return
    import ray.train

    # Die only once the previous checkpoint is registered (the controller polls every ~2 s); dying
    # between a report and its registration loses that checkpoint, and the restart begins earlier.
    ray.train.get_all_reported_checkpoints(timeout_s=60)
    with open(marker, "w") as fh:
        fh.write(f"rank {rank} exited at step {step}\n")
    os._exit(1)


def _quiet_report_log() -> None:
    """Ray 2.60 Train V2 logs "Reporting training result N: TrainingReport(checkpoint=...)" at INFO on every
    report (each checkpoint) from a logger named by its file path (``logging.getLogger(__file__)`` in
    ray/train/v2/_internal/execution/context.py), which ``LoggingConfig(log_level=...)`` does not reach (it
    filters ``ray.train.*``). Drop that message on that logger; everything else from it still flows."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).addFilter(
        lambda record: not str(record.msg).startswith("Reporting training result")
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from tasks.train.data import local_dir

    config: LoopConfig = pickle.loads(loop_config["loop"])  # bytes (see tasks.train.driver.fit)
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # cuBLAS reads this when CUDA starts, i.e. before the first tensor reaches the GPU (deterministic_torch).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    device = torch.device(config.device) if config.device else ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    if not use_gpu and config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    deterministic_torch(config.seed + rank)

    with _start_checkpoint(config) as ckpt_dir:
        bundle, module = config.model.build(local_dir(config.init_uri), ckpt_dir)
        state = torch.load(os.path.join(ckpt_dir, STATE_FILE)) if ckpt_dir else None
    if config.grad_checkpointing:
        _clip_model(module).gradient_checkpointing_enable()
    module.train()
    module = ray.train.torch.prepare_model(module, move_to_device=device)  # DDP when world size > 1
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, config.total_steps)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])

    logger = _MlflowLogger(config, rank)
    try:
        _run_epochs(config, bundle, module, optimizer, scheduler, step, device, use_gpu, logger)
    finally:
        logger.close()


def _run_epochs(config: LoopConfig, bundle, module, optimizer, scheduler, step, device, use_gpu, logger):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    accum = max(1, config.grad_accum)
    total, steps_per_epoch = config.total_steps, config.steps_per_epoch
    shard = ray.train.get_dataset_shard("train")
    while step < total:
        start_step = step
        epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * accum  # batches already trained in this epoch (resume mid-epoch)
        batches = shard.iter_torch_batches(
            batch_size=config.batch_size,
            drop_last=True,
            device=device,
            # Batches ready ahead of the step: the shard's blocks arrive from the dataset's split coordinator,
            # and a step should never wait on that hand-off.
            prefetch_batches=PREFETCH_BATCHES,
        )
        t0, seen, micro = time.perf_counter(), 0, 0
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
                loss = config.model.loss(module, batch)
            (loss / accum).backward()
            micro += 1
            seen += batch["input_ids"].shape[0]
            if micro % accum:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            metrics = {
                "loss": float(loss.detach()),
                "lr": scheduler.get_last_lr()[0],
                **config.model.after_step(module),
                "samples_per_s": seen * world / max(elapsed, 1e-9),
            }
            logger.log(metrics, step, config.log_every)
            _maybe_fail(config, rank, step)
            end_of_epoch = step % steps_per_epoch == 0 or step >= total
            if step % config.checkpoint_every == 0 or end_of_epoch:
                logger.flush()
                report = dict(metrics, step=step, epoch=epoch + (1 if end_of_epoch else 0))
                _save_checkpoint(bundle, module, optimizer, scheduler, step, config, report)
            if end_of_epoch:
                break
        if step == start_step:
            raise RuntimeError(
                f"rank {rank}: the dataset shard yielded no full batch to train on at step {step}; "
                "lower --batch-size or use more data"
            )
