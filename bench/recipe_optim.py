"""Does the optimisation, not the recipe, hold the default CLIP back on the held-out 30-class task?

One candidate per run, trained in-process from scratch on ``vlforge.demo.synth.SHAPES30`` (800 clean pairs) as
``bench/recipe.py --via inprocess`` does, with one optimisation change at a time, then zero-shot accuracy over the
30 class prompts on 600 images of another seed, and on 400 of the training images (train accuracy: equal to
test accuracy means the model underfits, not that it fails to generalise). Prints one line per run; BENCHMARKS.md
"Recipes" has the table.

    python bench/recipe_optim.py '{"epochs": 45}'
    python bench/recipe_optim.py '{"no_decay_gains": true}'      # open_clip's rule: no weight decay on
                                                                    # gains, biases, embeddings, logit_scale
    python bench/recipe_optim.py '{"multi_positive": true}'      # identical captions in a batch are positives
    python bench/recipe_optim.py '{"logit_scale": 50}'           # temperature 1/50 at the start
    python bench/recipe_optim.py '{"vision": {"num_hidden_layers": 4}}'   # a deeper vision tower
    keys: recipe, epochs, bs, lr, wd, warmup, seed, betas, eps, image_size, patch_size, vision, text
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Annotated

import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe_of(opts: dict):
    from models.recipes import CONFIG_DIR, load_recipe

    name = opts.get("recipe", "clip-tiny")
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    changed = False
    for key in ("image_size", "patch_size"):
        if key in opts:
            raw[key], changed = opts[key], True
    for tower in ("vision", "text"):
        if tower in opts:
            raw[tower].update(opts[tower])
            changed = True
    if not changed:
        return load_recipe(name)
    raw["name"] = f"{name}-variant"
    path = os.path.join(tempfile.mkdtemp(), "variant.json")
    with open(path, "w") as fh:
        json.dump(raw, fh)
    return load_recipe(path)


def multi_positive_loss(image, text, logit_scale, input_ids):
    """InfoNCE whose targets spread over every row with the same caption tokens (a duplicate is no negative)."""
    import torch
    import torch.nn.functional as F

    group = torch.unique(input_ids, dim=0, return_inverse=True)[1]
    same = (group[:, None] == group[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    logits = logit_scale.exp().clamp(max=100.0) * image @ text.t()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def main(
    candidate: Annotated[
        str, typer.Argument(help="the candidate's settings, a JSON object (keys above)")
    ] = "{}",
) -> None:
    import torch

    from tasks.train.inprocess import train_in_process, zeroshot
    from vlforge.demo.synth import TUNING_TEST_SEED, make_shape_pairs

    opts = json.loads(candidate)
    torch.set_num_threads(int(opts.get("threads", 1)))
    epochs, seed = opts.get("epochs", 15), opts.get("seed", 0)
    pairs = make_shape_pairs(800, seed=seed)
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    bundle = train_in_process(
        recipe_of(opts), pairs, epochs=epochs, batch_size=opts.get("bs", 32), lr=opts.get("lr", 3e-3),
        weight_decay=opts.get("wd", 0.1), warmup_steps=opts.get("warmup", 10), seed=seed,
        on_epoch=lambda epoch, loss: last.update(loss=loss),
        betas=tuple(opts.get("betas", (0.9, 0.999))), eps=opts.get("eps", 1e-8),
        decays=(lambda n, p: p.ndim >= 2 and "embedding" not in n) if opts.get("no_decay_gains") else None,
        logit_scale=opts.get("logit_scale"),
        loss_fn=(
            (lambda out, model, batch: multi_positive_loss(
                out.image_embeds, out.text_embeds, model.logit_scale, batch["input_ids"]))
            if opts.get("multi_positive") else None
        ),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    test = zeroshot(bundle, make_shape_pairs(600, seed=TUNING_TEST_SEED, prefix="test"))
    train = zeroshot(bundle, pairs[:400])
    print(
        f"{json.dumps(opts)}: zero-shot {test:.3f}, train {train:.3f}, last loss {last['loss']:.3f}, "
        f"logit scale {bundle.model.logit_scale.exp().item():.1f}, {seconds / epochs:.1f} s/epoch",
        flush=True,
    )


if __name__ == "__main__":
    typer.run(main)
