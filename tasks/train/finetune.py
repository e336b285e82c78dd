"""peft LoRA fine-tuning of a registered CLIP on Ray Train; registers the merged model as ``vlforge-clip-lora``.

The same loop as pretraining (tasks/train/loop.py) trains LoRA adapters on the attention projections (and the
projection heads); the driver merges them into the base weights so transformers loads the registered folder
directly, and hands the adapter folder to the registry as well.
"""

from __future__ import annotations

import os

from prefect import task

from tasks.train.driver import (
    TrainResult,
    checkpoint_dir,
    default_name,
    eval_sets_for,
    evaluate_and_register,
    finish_run,
    finished_result,
    fit,
    loop_base_config,
    open_training,
    output_dir,
    resolve_use_gpu,
    save_init_model,
    steps_plan,
    torch_threads,
)
from vlforge.settings import Settings

__all__ = ["TrainResult", "finetune", "finetune_task"]


def _merge(init_dir: str, adapter_dir: str, out_dir: str):
    """Load the base, apply the trained adapter, merge, save the plain CLIP bundle to ``out_dir``."""
    from models.clip import load_clip
    from models.lora import load_adapter, merge_lora

    bundle = load_clip(init_dir)
    bundle.model = merge_lora(load_adapter(bundle.model, adapter_dir, trainable=False))
    bundle.save(out_dir)
    return bundle


def finetune(
    dataset: str,
    settings: Settings,
    *,
    base: str = "models:/vlforge-clip@champion",
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 5,
    grad_accum: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_targets: list[str] | None = None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    name: str | None = None,
    checkpoint_every: int = 50,
    eval_fraction: float = 0.1,
    eval_dataset: str | None = None,
    class_prompts: list[str] | None = None,
    register: bool = True,
    max_failures: int = 2,
    seed: int = 0,
    log_every: int = 10,
    fail_once: dict | None = None,
) -> TrainResult:
    """LoRA-fine-tune ``base`` (a model URI) on ``dataset`` and register the merged model as ``vlforge-clip-lora``."""
    from models.lora import LoraSpec, check_targets
    from tasks.common import load_model
    from tasks.train.data import count_train_rows, train_dataset
    from vlforge.datasets import resolve_dataset
    from vlforge.raycluster import init_ray
    from vlforge.registry import check_model_uri, registered_version
    from vlforge.tracking import LORA_MODEL, TAG_BASE_MODEL

    # Every address resolved before Ray starts: a wrong one fails in a second, not after Ray's start-up.
    dv = resolve_dataset(settings, dataset)
    eval_dv = resolve_dataset(settings, eval_dataset) if eval_dataset else None
    mv = registered_version(base, settings)  # pin an alias to the version it names now
    base_pinned = f"models:/{mv.name}/{mv.version}" if mv is not None else base
    if mv is None:
        check_model_uri(base, settings)
    init_ray(settings)
    name = name or default_name("finetune", dv)
    gpu = resolve_use_gpu(use_gpu)
    spec = LoraSpec(
        r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=tuple(lora_targets or ("q_proj", "v_proj"))
    )
    n_train = count_train_rows(dv, eval_fraction)
    steps_per_epoch, total = steps_plan(n_train, batch_size, num_workers, grad_accum, epochs)
    params = dict(
        dataset=dv.ref, base=base, base_version=base_pinned, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=",".join(spec.targets), num_workers=num_workers, use_gpu=gpu, train_rows=n_train,
        total_steps=total, eval_fraction=eval_fraction, seed=seed,
    )  # fmt: skip
    tr = open_training(settings, "finetune", name, dv, {TAG_BASE_MODEL: base_pinned}, params)
    if tr.status == "FINISHED":
        return finished_result(settings, tr, LORA_MODEL)
    try:
        if not tr.info.get("initialised"):
            bundle = load_model(base_pinned, settings)
            check_targets(bundle.model, spec.targets)
            save_init_model(bundle, tr)
        cfg = loop_base_config(
            settings, tr, dv, params=params, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
            total_steps=total, steps_per_epoch=steps_per_epoch, batch_size=batch_size, grad_accum=grad_accum,
            grad_checkpointing=False, checkpoint_every=checkpoint_every, seed=seed,
            torch_threads=torch_threads(num_workers), log_every=log_every, fail_once=fail_once,
            lora=spec.to_dict(),
        )  # fmt: skip
        ds = train_dataset(dv, tr.init_uri, eval_fraction=eval_fraction, augment=True, seed=seed)
        result = fit(settings, tr, cfg, ds, num_workers=num_workers, use_gpu=gpu, max_failures=max_failures)
        from tasks.train.data import local_dir

        adapter_dir = os.path.join(checkpoint_dir(result, tr), "adapter")
        model_dir = output_dir(settings, tr)
        merged = _merge(local_dir(tr.init_uri), adapter_dir, model_dir)
        metrics, registered = evaluate_and_register(
            settings, tr, merged, model_dir,
            eval_sets=eval_sets_for(dv, eval_fraction, eval_dv), class_prompts=class_prompts,
            register=register, model_name=LORA_MODEL, base_model=base_pinned, adapter_dir=adapter_dir,
        )  # fmt: skip
    except BaseException as exc:
        finish_run(settings, tr.run_id, {}, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    uri = registered.uri if registered else ""
    return TrainResult(tr.run_id, uri, registered, metrics, model_dir, resumed=tr.resumed)


finetune_task = task(name="finetune", retries=0)(finetune)
