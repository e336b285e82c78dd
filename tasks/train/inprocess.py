"""A CLIP trained and measured in this process, without Ray: the benchmarks that choose a recipe, a rate or a
LoRA setting (bench/recipe.py, bench/recipe_optim.py, bench/lora.py) and the tests that check those choices on
held-out data use it, so that what they vary is the only difference from a real training (``tasks.train.loop``).

Also the two measures of the default-recipe target (issue #14) on ``vlforge.demo.synth.SHAPES30`` pairs:
zero-shot accuracy over a palette's 30 class prompts, and the precision/recall of a top-60 % cut of a pool whose
wrong captions change the colour only, the shape only or both.
"""

from __future__ import annotations

import math

import numpy as np

from vlforge.demo.synth import SHAPES30_COLOURS, Palette, SynthPair, shapes30_task


def zeroshot_hits(bundle, pairs: list[SynthPair], colours: Palette = SHAPES30_COLOURS) -> np.ndarray:
    """Per-image zero-shot hits (1.0 / 0.0) over the 30 class prompts of the palette the pairs were drawn in."""
    from tasks.evaluate import embed_images, embed_texts
    from tasks.evaluate import zeroshot_hits as hits

    images = embed_images(bundle, [p.image for p in pairs])
    prompts = embed_texts(bundle, shapes30_task(colours).class_prompts())
    return hits(images, prompts, [p.label for p in pairs])


def zeroshot(bundle, pairs: list[SynthPair], colours: Palette = SHAPES30_COLOURS) -> float:
    """Zero-shot accuracy over the 30 class prompts."""
    return float(np.mean(zeroshot_hits(bundle, pairs, colours)))


def top_cut(bundle, pool: list[SynthPair], keep: float = 0.6) -> tuple[float, float]:
    """(precision, recall) of keeping the ``keep`` share of ``pool`` that the model scores highest."""
    scores = bundle.score([p.image for p in pool], [p.caption for p in pool])
    kept = np.argsort(-scores, kind="stable")[: round(len(pool) * keep)]
    good_kept = sum(pool[i].matched for i in kept)
    return good_kept / len(kept), good_kept / max(1, sum(p.matched for p in pool))


def train_in_process(
    recipe,
    pairs: list[SynthPair],
    *,
    epochs: int,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup_steps: int | None = None,
    seed: int = 0,
    on_epoch=None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decays=None,
    logit_scale: float | None = None,
    loss_fn=None,
    bundle=None,
    adapt=None,
):
    """A CLIP of ``recipe`` trained on ``pairs`` with what ``tasks.train.loop`` does on one worker: the same
    model (``build_clip``), loss (``global_clip_loss``), AdamW, cosine-with-warmup schedule, temperature clamp,
    per-epoch shuffle and random flips (``augment_batch``), without Ray; ``on_epoch(epoch, last loss)`` after
    each epoch. Returns the bundle. ``batch_size``, ``lr``, ``weight_decay`` and ``warmup_steps`` default to
    pretraining's (``tasks.train.args.PretrainArgs``).

    What ``bench/recipe_optim.py`` varies, the loop's own by default: AdamW's ``betas`` and ``eps``;
    ``decays(name, parameter)`` saying which parameters get weight decay (None: all); the temperature at the start
    (``logit_scale``, e.g. 50 for 1/50); ``loss_fn(outputs, model, batch)`` instead of ``global_clip_loss``.

    What ``bench/lora.py`` needs to fine-tune: an existing ``bundle`` to train instead of a new one (its tokenizer
    kept), and ``adapt(model)`` returning the module to train (e.g. ``apply_lora``), which then becomes
    ``bundle.model``; only parameters that require a gradient are optimised."""
    import torch

    from models.clip import build_clip, global_clip_loss
    from tasks.train.args import PretrainArgs
    from tasks.train.data import augment_batch
    from tasks.train.loop import cosine_with_warmup

    defaults = PretrainArgs()
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    weight_decay = defaults.weight_decay if weight_decay is None else weight_decay
    warmup_steps = defaults.warmup_steps if warmup_steps is None else warmup_steps
    if bundle is None:
        bundle = build_clip(recipe, [p.caption for p in pairs], seed=seed)
    data = {
        "pixel_values": bundle.preprocess_images([p.image for p in pairs]).numpy(),
        **{k: v.numpy() for k, v in bundle.tokenize([p.caption for p in pairs], fixed_length=True).items()},
    }
    model = bundle.model.train()
    # The adapters' initial weights (adapt) are drawn from the seed, as on a training worker.
    torch.manual_seed(seed)
    if adapt is not None:
        model = bundle.model = adapt(model)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    if decays is not None:
        groups = [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    steps_per_epoch = len(pairs) // batch_size
    scheduler = cosine_with_warmup(optimizer, warmup_steps, steps_per_epoch * epochs)
    for epoch in range(epochs):
        batch = augment_batch({k: v.copy() for k, v in data.items()}, seed=seed, epoch=epoch)
        for i in range(steps_per_epoch):
            part = {k: torch.from_numpy(v[i * batch_size : (i + 1) * batch_size]) for k, v in batch.items()}
            out = model(**part)
            if loss_fn is None:
                loss = global_clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
            else:
                loss = loss_fn(out, model, part)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
        if on_epoch is not None:
            on_epoch(epoch, float(loss.detach()))
    model.eval()
    return bundle
