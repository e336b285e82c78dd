"""What limits the VLM recipe: stage-1 caption accuracy and stage-2 instruction accuracy of one configuration.

In process, no Ray: the same pieces the training driver runs (``models.clip`` / ``models.vlm`` models,
``models.vlm_train`` batches and stage preparation, AdamW with ``tasks.train.loop.cosine_with_warmup``,
``models.vlm_eval`` greedy evaluation), the way the issue measured it: a CLIP of the default recipe pretrained on
clean pairs (its vision tower, cached under ``--cache``), stage 1 on the same pairs' captions, stage 2 on questions
about the colour and the shape of other images (plus caption conversations for ``--caption-share`` of them), judged
on held-out images of another seed: stage-1 captions that name both the colour and the shape, and exact-match
answers of stage 1 and stage 2 to the two questions. Diagnostics beside them: the same captions on a blank image
(does the language model use the image?), colour-only and shape-only naming, and a linear probe of the tower's
features (can the features tell the shape at all?).

Tuning and reporting use different generator seeds (``--seeds``); the task is ``vlforge.demo.synth``'s
(``--domain plain|noisy``). Every ``--set KEY=VALUE`` overrides one setting of :data:`BASE`. One line of JSON per
run goes to ``--out``.

    python bench/vlm_recipe.py [--seeds 101,102,103] [--set stage1_epochs=20 --set feature_layer=-1 ...]
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import typer  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vlm_recipe.jsonl")
# The setting the issue measured (vlm-tiny at its defaults, `vlforge pretrain` defaults, 900 pairs) unless the
# recipe file says otherwise: every value not given by --set comes from models/configs/vlm/vlm-tiny.json.
BASE: dict[str, Any] = {
    "clip_recipe": "clip-conv-64",
    "clip_epochs": 15,
    "pairs": 900,  # stage-1 (and tower) training pairs
    "instruct_images": 450,  # stage 2: both questions on each, 900 instructions
    "test_images": 200,
    "vlm_recipe": "vlm-tiny",  # stage-1 epochs: the recipe's (stage1.epochs) unless --set stage1_epochs=N
    "stage2_epochs": 5,
}
COLOUR_Q, SHAPE_Q = "What colour is the shape?", "What shape is it?"


@dataclass(frozen=True)
class Item:
    image: bytes
    caption: str
    colour: str
    shape: str


# The 30-class task (``SHAPES30``): its tuning palette, chosen on, and the held-out palette, reported on.
DOMAINS = ("plain", "noisy", "shapes30tune", "shapes30heldout")
DEFAULT_SEEDS = {"shapes30tune": "0,1,1000", "shapes30heldout": "7001,7002,7000"}


def make_items(n: int, seed: int, domain: str, prefix: str) -> list[Item]:
    from vlforge.demo.synth import HELDOUT_COLOURS, make_pairs, make_shape_pairs

    if domain.startswith("shapes30"):
        colours = HELDOUT_COLOURS if domain == "shapes30heldout" else None
        pairs = make_shape_pairs(n, seed, prefix=prefix, colours=colours)
    else:
        pairs = make_pairs(n, 0.0, seed, 64, prefix, domain)
    return [Item(p.image, p.caption, p.colour, p.shape) for p in pairs]


def train_tower(cfg: dict, items: list[Item], seed: int, cache: str):
    """The default CLIP recipe trained as ``vlforge pretrain`` trains it (its default batch, rate, warmup,
    weight decay, flips), cached by task and size."""
    import math

    import torch

    from models.clip import build_clip, global_clip_loss, load_clip
    from tasks.train.args import PretrainArgs
    from tasks.train.data import augment_batch
    from tasks.train.loop import cosine_with_warmup

    # Settings of the tower's training beyond the defaults (clip_lr, clip_batch) name their own cache entry.
    extra = "".join(f"-{k}{cfg[k]}" for k in ("clip_lr", "clip_batch") if k in cfg)
    path = os.path.join(
        cache, f"tower-{cfg['clip_recipe']}-{cfg['domain']}-{seed}-{len(items)}-{cfg['clip_epochs']}{extra}"
    )
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_clip(path)
    args = PretrainArgs()
    args = args.model_copy(
        update={"lr": cfg.get("clip_lr", args.lr), "batch_size": cfg.get("clip_batch", args.batch_size)}
    )
    bundle = build_clip(cfg["clip_recipe"], [i.caption for i in items], seed=seed)
    data = {
        "pixel_values": bundle.preprocess_images([i.image for i in items]).numpy(),
        **{k: v.numpy() for k, v in bundle.tokenize([i.caption for i in items], fixed_length=True).items()},
    }
    model = bundle.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = len(items) // args.batch_size
    scheduler = cosine_with_warmup(optimizer, args.warmup_steps, per_epoch * cfg["clip_epochs"])
    for epoch in range(cfg["clip_epochs"]):
        batch = augment_batch({k: v.copy() for k, v in data.items()}, seed=seed, epoch=epoch)
        for i in range(per_epoch):
            part = {
                k: torch.from_numpy(v[i * args.batch_size : (i + 1) * args.batch_size])
                for k, v in batch.items()
            }
            out = model(**part)
            global_clip_loss(out.image_embeds, out.text_embeds, model.logit_scale).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
    model.eval()
    bundle.save(path)
    return bundle


def probe(bundle, train: list[Item], test: list[Item], layer: int) -> dict[str, float]:
    """Linear-probe accuracy of colour and shape from the tower's patch features at ``layer`` (what the VLM reads,
    concatenated) and from its pooled CLS (what the contrastive loss trained): whether the features hold the shape."""
    import torch

    def feats(items):
        with torch.no_grad():
            out = bundle.model.vision_model(
                pixel_values=bundle.preprocess_images([i.image for i in items]), output_hidden_states=True
            )
        return {"": out.hidden_states[layer][:, 1:].flatten(1), "cls_": out.pooler_output}

    ftr, fte = feats(train), feats(test)
    result = {}
    for (kind, xtr), attr in itertools.product(ftr.items(), ("colour", "shape")):
        xte = fte[kind]
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        names = sorted({getattr(i, attr) for i in train})
        ytr = torch.tensor([names.index(getattr(i, attr)) for i in train])
        yte = torch.tensor([names.index(getattr(i, attr)) for i in test])
        torch.manual_seed(0)
        lin = torch.nn.Linear(xtr.shape[1], len(names))
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(lin(xtr), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
        result[f"probe_{kind}{attr}"] = round(float((lin(xte).argmax(1) == yte).float().mean()), 3)
    return result


def train_stage(model, batches_for_epoch, epochs: int, lr: float, warmup: int, weight_decay: float) -> float:
    """AdamW with the driver's cosine-with-warmup schedule over ``epochs`` reshuffled epochs; the last loss."""
    import torch

    from tasks.train.loop import cosine_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    first = batches_for_epoch(0)
    scheduler = cosine_with_warmup(optimizer, warmup, len(first) * epochs)
    model.train()
    loss = float("nan")
    for epoch in range(epochs):
        for batch in first if epoch == 0 else batches_for_epoch(epoch):
            out = model(**batch).loss
            out.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(out.detach())
    model.eval()
    return loss


def named(captions: list[str], items: list[Item], attrs: tuple[str, ...]) -> float:
    hits = [
        all(getattr(i, a) in set(re.findall(r"[a-z]+", c.lower())) for a in attrs)
        for c, i in zip(captions, items, strict=True)
    ]
    return round(sum(hits) / len(hits), 3)


def caption_metrics(vlm, prompt: str, test: list[Item], prefix: str, blank: bool = False) -> dict[str, float]:
    from models.vlm_eval import blank_image, generate

    images = [blank_image()] * len(test) if blank else [i.image for i in test]
    captions = generate(vlm, images, [prompt] * len(test), max_new_tokens=24)
    return {
        f"{prefix}caption_both": named(captions, test, ("colour", "shape")),
        f"{prefix}caption_colour": named(captions, test, ("colour",)),
        f"{prefix}caption_shape": named(captions, test, ("shape",)),
    }


def instruction_rows(items: list[Item], caption_share: float, prompt: str, seed: int):
    """Both questions on every image, plus the caption prompt answered with the caption on ``caption_share``
    of the images (LLaVA's stage-2 mix of conversation kinds)."""
    import random

    from models.vlm_train import Example

    rows = [
        Example(i.image, q, getattr(i, a))
        for i in items
        for q, a in ((COLOUR_Q, "colour"), (SHAPE_Q, "shape"))
    ]
    chosen = random.Random(seed).sample(items, round(len(items) * caption_share))
    return rows + [Example(i.image, prompt, i.caption) for i in chosen]


def answer_accuracy(vlm, test: list[Item]) -> dict[str, float]:
    from models.vlm_eval import instruction_accuracy
    from models.vlm_train import Example

    out = {}
    for name, q, a in (("colour", COLOUR_Q, "colour"), ("shape", SHAPE_Q, "shape")):
        rows = [Example(i.image, q, getattr(i, a)) for i in test]
        out[name] = instruction_accuracy(vlm, rows, max_new_tokens=8)[0]["instruction_accuracy"]
    return {"both": round((out["colour"] + out["shape"]) / 2, 3), **{k: round(v, 3) for k, v in out.items()}}


def recipe_of(cfg: dict):
    """``cfg['vlm_recipe']`` with the swept settings put in (the recipe file's values otherwise)."""
    from dataclasses import replace

    from models.vlm import load_vlm_recipe

    r = load_vlm_recipe(cfg["vlm_recipe"])
    lm = {**r.language_model, **{k[3:]: v for k, v in cfg.items() if k.startswith("lm_")}}
    if "lm_hidden_size" in cfg and "lm_intermediate_size" not in cfg:
        lm["intermediate_size"] = 2 * cfg["lm_hidden_size"]
    s1 = {
        **r.stage1,
        **{k[7:]: v for k, v in cfg.items() if k.startswith("stage1_") and k != "stage1_epochs"},
    }
    s2 = {
        **r.stage2,
        **{k[7:]: v for k, v in cfg.items() if k.startswith("stage2_") and k != "stage2_epochs"},
    }
    return replace(
        r,
        language_model=lm,
        stage1=s1,
        stage2=s2,
        adapter=cfg.get("adapter", r.adapter),
        resampler={**r.resampler, **({"num_queries": cfg["queries"]} if "queries" in cfg else {})},
        vision_feature_layer=cfg.get("feature_layer", r.vision_feature_layer),
        vision_feature_select_strategy=cfg.get("feature_strategy", r.vision_feature_select_strategy),
    )


def run(cfg: dict, seeds: tuple[int, int, int], cache: str) -> dict[str, Any]:
    import torch

    from models.vlm import build_vlm
    from models.vlm_train import build_batches, caption_examples, prepare_stage1, prepare_stage2

    torch.manual_seed(0)
    started = time.perf_counter()
    train = make_items(cfg["pairs"], seeds[0], cfg["domain"], "pair")
    instruct = make_items(cfg["instruct_images"], seeds[1], cfg["domain"], "inst")
    test = make_items(cfg["test_images"], seeds[2], cfg["domain"], "test")
    clip = train_tower(cfg, train, seeds[0], cache)
    recipe = recipe_of(cfg)
    result: dict[str, Any] = {
        "config": cfg,
        "seeds": seeds,
        "tower_s": round(time.perf_counter() - started, 1),
    }
    result |= probe(clip, train, test, recipe.vision_feature_layer)
    if cfg.get("probe_only"):  # a tower setting judged by its features alone, before any VLM is trained
        return result

    corpus = [i.caption for i in train] + [COLOUR_Q, SHAPE_Q, recipe.caption_prompt]
    corpus += sorted({i.colour for i in train} | {i.shape for i in train})
    vlm = build_vlm(recipe, clip, corpus, seed=0)
    prepare_stage1(vlm, recipe.train_language_model_in_stage1, recipe.train_vision_tower_in_stage1)
    rows = caption_examples([i.image for i in train], [i.caption for i in train], recipe.caption_prompt)
    s1 = recipe.stage1
    epochs1 = result["stage1_epochs"] = int(cfg.get("stage1_epochs", s1.get("epochs", 10)))
    t0 = time.perf_counter()
    result["stage1_loss"] = round(
        train_stage(
            vlm.model,
            lambda e: build_batches(vlm, rows, int(s1["batch_size"]), recipe.max_length, seed=e),
            epochs1, float(s1["learning_rate"]), int(s1.get("warmup_steps", 10)), 0.1,
        ),
        3,
    )  # fmt: skip
    result["stage1_s"] = round(time.perf_counter() - t0, 1)
    result |= caption_metrics(vlm, recipe.caption_prompt, test, "s1_")
    result |= caption_metrics(vlm, recipe.caption_prompt, test, "s1_blank_", blank=True)
    result |= {f"s1_answer_{k}": v for k, v in answer_accuracy(vlm, test).items()}

    s2 = recipe.stage2
    rows2 = instruction_rows(instruct, float(s2.get("caption_share", 0.0)), recipe.caption_prompt, seeds[1])
    peft_model = prepare_stage2(vlm, s2.get("lora"))
    t0 = time.perf_counter()
    train_stage(
        peft_model,
        lambda e: build_batches(vlm, rows2, int(s2.get("batch_size", 32)), recipe.max_length, seed=e),
        cfg["stage2_epochs"], float(s2["learning_rate"]), 5, 0.0,
    )  # fmt: skip
    result["stage2_s"] = round(time.perf_counter() - t0, 1)
    merged = type(vlm)(peft_model.merge_and_unload(), vlm.processor)
    result |= {f"s2_answer_{k}": v for k, v in answer_accuracy(merged, test).items()}
    result |= caption_metrics(merged, recipe.caption_prompt, test, "s2_")
    result["gain"] = round(result["s2_answer_both"] - result["s1_answer_both"], 3)
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(
    seeds: str = typer.Option(
        "",
        help="Train, instruction and test generator seeds (default 101,102,103; shapes30: the task's own).",
    ),
    domain: str = typer.Option(
        "plain", help="The task: the demo's (plain or noisy) or SHAPES30's (shapes30tune or shapes30heldout)."
    ),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override one setting of BASE."),
    label: str = typer.Option("", help="A label for this run's line in --out."),
    cache: str = typer.Option("/tmp/vlforge-bench-vlm-recipe", help="Where trained towers are cached."),
    out: str = typer.Option(RESULTS, help="JSON lines file this run's result is appended to."),
) -> None:
    if domain not in DOMAINS:
        raise typer.BadParameter(f"{domain!r}: one of {', '.join(DOMAINS)}", param_hint="--domain")
    seeds = seeds or DEFAULT_SEEDS.get(domain, "101,102,103")
    cfg = {**BASE, "domain": domain}
    for kv in set_:
        key, _, value = kv.partition("=")
        cfg[key] = parse_value(value)
    result = {"label": label, **run(cfg, tuple(int(s) for s in seeds.split(",")), cache)}
    print(json.dumps(result))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    typer.run(main)
