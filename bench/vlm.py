"""VLM stage 1 throughput: training samples/s of the LLaVA recipe (adapter + tiny LM trained, vision frozen).

Builds the recipe's VLM on a random tiny CLIP, preprocesses synthetic caption pairs once, and times
``--steps`` optimiser steps after ``--warmup`` untimed ones (batch building excluded: the driver's data
pipeline prepares batches ahead). ``--dtype bf16`` runs the forward under bf16 autocast (on a GPU: the
figure BENCHMARKS.md asks for). Writes bench/results/vlm.json.

    python bench/vlm.py [--recipe vlm-tiny] [--adapter mlp|resampler] [--batch-size 32] [--steps 30]
                        [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace
from typing import Literal

import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchkit import machine, write_result  # noqa: E402


def main(
    recipe: str = "vlm-tiny",
    adapter: Literal["mlp", "resampler"] = "mlp",
    batch_size: int = 32,
    steps: int = 30,
    warmup: int = 5,
    device: str = "cpu",
    dtype: Literal["fp32", "bf16"] = "fp32",
) -> None:
    args = SimpleNamespace(**locals())  # the options by name, as the code below reads them

    import torch

    from models.clip import build_clip
    from models.vlm import build_vlm, load_vlm_recipe
    from models.vlm_train import (
        build_batches,
        caption_examples,
        make_optimizer,
        prepare_stage1,
        training_step,
    )
    from vlforge.demo.synth import make_pairs

    pairs = make_pairs(args.batch_size * 4, seed=0, size=64)
    recipe = load_vlm_recipe(args.recipe)
    clip = build_clip("clip-tiny", [p.caption for p in pairs])
    vlm = build_vlm(recipe, clip, [p.caption for p in pairs], adapter=args.adapter)
    vlm.model.to(args.device)
    prepare_stage1(vlm, recipe.train_language_model_in_stage1)
    rows = caption_examples([p.image for p in pairs], [p.caption for p in pairs], recipe.caption_prompt)
    batches = [
        {k: v.to(args.device) for k, v in b.items()}
        for b in build_batches(vlm, rows, args.batch_size, recipe.max_length)
    ]
    optimizer = make_optimizer(vlm.model, recipe.stage1["learning_rate"])
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    vlm.model.train()

    def step(i: int) -> float:
        with autocast:
            return training_step(vlm.model, batches[i % len(batches)], optimizer)

    for i in range(args.warmup):
        step(i)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "recipe": args.recipe,
        "adapter": args.adapter,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seq_len": int(batches[0]["input_ids"].shape[1]),
        "samples_per_s": round(args.steps * args.batch_size / seconds, 1),
        "final_loss": round(loss, 3),
        "torch_threads": torch.get_num_threads(),
        **machine(),
    }
    write_result("vlm.json", result)


if __name__ == "__main__":
    typer.run(main)
