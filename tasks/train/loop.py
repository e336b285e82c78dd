"""The Ray Train loop shared by pretraining and LoRA fine-tuning (runs on every worker).

Contrastive training with the symmetric InfoNCE loss over the global batch (embeddings all-gathered across
workers, as CLIP does) and the learnable temperature, AdamW with a cosine
schedule and linear warmup, gradient accumulation, bf16 autocast on GPU, optional gradient checkpointing.
Rank 0 logs to the MLflow run the driver created (its id is in the config) and writes the checkpoints:
``model/`` (pretrain: the save_pretrained bundle) or ``adapter/`` (LoRA), plus ``train_state.pt``
(optimizer, scheduler, step). A restarted worker group resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import torch

STATE_FILE = "train_state.pt"


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _build_model(config: dict, ckpt_dir: str | None):
    """(bundle, trainable module) from the initial model or the checkpoint."""
    from models.clip import load_clip
    from tasks.train.data import local_dir

    init_dir = local_dir(config["init_uri"])
    if config.get("lora") is None:
        bundle = load_clip(os.path.join(ckpt_dir, "model") if ckpt_dir else init_dir)
        return bundle, bundle.model
    from models.lora import LoraSpec, apply_lora, load_adapter

    bundle = load_clip(init_dir)
    if ckpt_dir:
        module = load_adapter(bundle.model, os.path.join(ckpt_dir, "adapter"), trainable=True)
    else:
        module = apply_lora(bundle.model, LoraSpec.from_dict(config["lora"]))
    return bundle, module


def _clip_model(module):
    """The underlying CLIPModel of a DDP and/or peft wrapper (for logit_scale)."""
    m = getattr(module, "module", module)  # DDP
    return m.get_base_model() if hasattr(m, "get_base_model") else m


class _MlflowLogger:
    """Rank-0 MLflow logging into the driver's run; per-step metrics are buffered and written in batches."""

    def __init__(self, config: dict, rank: int):
        self.enabled = rank == 0 and bool(config.get("run_id"))
        self.buffer: list = []
        if not self.enabled:
            return
        import mlflow

        from vlforge.tracking import keep_credentials_off_stdout

        keep_credentials_off_stdout(config["tracking_uri"])  # this worker's process prints run links too
        mlflow.set_tracking_uri(config["tracking_uri"])
        mlflow.set_registry_uri(config["tracking_uri"])
        self.client = mlflow.MlflowClient(config["tracking_uri"])
        self.run_id = config["run_id"]
        mlflow.start_run(run_id=self.run_id, log_system_metrics=config.get("system_metrics", True))
        from vlforge.tracking import log_dataset_input, safe_params

        mlflow.log_params(safe_params(config.get("params", {})))
        if config.get("dataset") is not None:
            log_dataset_input(config["dataset"], "training")

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
            self.client.log_batch(self.run_id, metrics=self.buffer)
            self.buffer = []

    def close(self) -> None:
        if not self.enabled:
            return
        import mlflow

        self.flush()
        # Leave the run RUNNING: the driver evaluates, registers and ends it.
        mlflow.end_run(status="RUNNING")


def _save_checkpoint(bundle, module, optimizer, scheduler, step: int, config: dict, metrics: dict):
    import ray.train
    from ray.train import Checkpoint

    is_lora = config.get("lora") is not None
    with tempfile.TemporaryDirectory(prefix="vlforge-ckpt-") as tmp:
        if ray.train.get_context().get_world_rank() == 0:
            inner = getattr(module, "module", module)
            if is_lora:
                inner.save_pretrained(os.path.join(tmp, "adapter"))
            else:
                bundle.model = inner
                bundle.save(os.path.join(tmp, "model"))
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                os.path.join(tmp, STATE_FILE),
            )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)


def _maybe_fail(config: dict, rank: int, step: int) -> None:
    """Test-only fault injection: the named rank exits hard once at the named step (a marker file says so)."""
    hook = config.get("fail_once")
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    if not use_gpu and config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))
    torch.manual_seed(int(config.get("seed", 0)) + rank)

    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt else _nullpath() as ckpt_dir:
        bundle, module = _build_model(config, ckpt_dir)
        state = torch.load(os.path.join(ckpt_dir, STATE_FILE)) if ckpt_dir else None
    if config.get("grad_checkpointing"):
        _clip_model(module).gradient_checkpointing_enable()
    module.train()
    module = ray.train.torch.prepare_model(module)  # moves to device; DDP when world size > 1
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    total = int(config["total_steps"])
    scheduler = cosine_with_warmup(optimizer, int(config["warmup_steps"]), total)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])

    logger = _MlflowLogger(config, rank)
    try:
        _run_epochs(config, bundle, module, optimizer, scheduler, step, total, device, use_gpu, logger)
    finally:
        logger.close()


class _nullpath:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _run_epochs(config, bundle, module, optimizer, scheduler, step, total, device, use_gpu, logger):
    import ray.train

    from models.clip import global_clip_loss

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    accum = max(1, int(config["grad_accum"]))
    steps_per_epoch = int(config["steps_per_epoch"])
    every = max(1, int(config["checkpoint_every"]))
    clip = _clip_model(module)
    shard = ray.train.get_dataset_shard("train")
    while step < total:
        start_step = step
        epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * accum  # batches already trained in this epoch (resume mid-epoch)
        batches = shard.iter_torch_batches(
            batch_size=int(config["batch_size"]),
            drop_last=True,
            device=device,
            # Batches ready ahead of the step: the shard's blocks arrive from the dataset's split coordinator,
            # and a step should never wait on that hand-off.
            prefetch_batches=int(config.get("prefetch_batches", 4)),
        )
        t0, seen, micro = time.perf_counter(), 0, 0
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
                out = module(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                )
                loss = global_clip_loss(out.image_embeds.float(), out.text_embeds.float(), clip.logit_scale)
            (loss / accum).backward()
            micro += 1
            seen += batch["input_ids"].shape[0]
            if micro % accum:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100.0))
            step += 1
            elapsed = time.perf_counter() - t0
            metrics = {
                "loss": float(loss.detach()),
                "lr": scheduler.get_last_lr()[0],
                "temperature": float(1.0 / clip.logit_scale.detach().exp()),
                "samples_per_s": seen * world / max(elapsed, 1e-9),
            }
            logger.log(metrics, step, int(config.get("log_every", 10)))
            _maybe_fail(config, rank, step)
            end_of_epoch = step % steps_per_epoch == 0 or step >= total
            if step % every == 0 or end_of_epoch:
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
