"""Does recaptioning pay? The curation experiment with ``--recaption-model`` on a pool whose captions are 60 %
uninformative alt text, with a VLM that captions well (issue #29's test, measured before a CI test asserts it).

Through the product's own stages, in process (one-worker trainings run in the driver): a clean seed set trains the
CLIP (``pretrain``: the scorer and the VLM's vision tower) and then the VLM's stage 1 on the same pairs' captions
(``pretrain --recipe vlm-tiny``, its recipe's 30 epochs at 3e-3 unless ``--vlm-epochs``); its captions of held-out
images are judged (colour and shape both named); then ``run_curation_experiment`` with ``recaption_model`` on the
alt-text pool (it recaptions the pool on Ray Data) trains ``unfiltered``, ``threshold``, ``top_fraction``,
``recaptioned``, ``mixed`` and ``recaption_rejects`` at equal samples seen and evaluates zero-shot accuracy on a labelled eval set of
another seed, each with a bootstrap interval, each arm paired against ``unfiltered``, and the better recaptioned arm
paired against the better filtering arm.

The task is the demo's four shapes at 64 px (``--size``; ``vlforge.demo.synth.DEMO``) with the demo's palette
(``--palette demo``: tuning) or ``HELDOUT_COLOURS`` (``--palette heldout``: reporting); ``--data-seed S`` draws the
seed set (960 pairs: the captioner learns from twice the pool's clean rows, as a flywheel's captioner learns
from the curated data before it; 480 named colour and shape 0.71, 960 0.93, on the tuning palette), the pool and
the eval set from S, S+1, S+2 (and the alt-text rows from S+1). The seed set's CLIP
(``--tower``) is ``clip-conv-64`` at pretraining's defaults, so the captioner sees the shapes (captions naming the
shape ~0.71 against ~0.43 with ``--tower clip-tiny --size 32``, the first measurement); every arm trains
``clip-tiny`` (32 px: it resizes the images) as ``tests/integration/test_experiment.py`` does. Writes
``bench/results/recaption_experiment-<palette>-<S>-<tower>-<size>px-e<clip epochs>.json``.

    python bench/recaption_experiment.py [--palette demo] [--data-seed 101] [--tower clip-conv-64] [--size 64] [--clip-epochs 20] [--pool 480] [--seed-pairs 960] [--eval 1000] [--samples-seen 2400] ...
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from typing import Annotated

import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchkit  # noqa: E402

CLIP_TINY = dict(
    recipe="clip-tiny", batch_size=32, lr=3e-3, warmup_steps=10
)  # as tests/integration/test_experiment


# The captioner's tower (and the pool's scorer): the CLIP the seed set trains, at its settings.
TOWERS = {
    "clip-tiny": CLIP_TINY,
    "clip-conv-64": dict(recipe="clip-conv-64"),  # pretraining's defaults (batch 8, lr 5e-4, warmup 80)
}


def task_pairs(palette: str, n: int, seed: int, prefix: str, size: int = 32):
    from vlforge.demo.synth import DEMO, HELDOUT_COLOURS, generate

    colours = HELDOUT_COLOURS if palette == "heldout" else DEMO.colours
    return generate(dataclasses.replace(DEMO, colours=colours, sizes=(size,)), n, seed, prefix=prefix)


def caption_naming(model_dir: str, pairs, prompt: str) -> dict[str, float]:
    """Shares of ``pairs`` whose greedy caption names both the colour and the shape the image shows, the colour,
    the shape."""
    from models.vlm import load_vlm
    from models.vlm_eval import generate

    captions = generate(load_vlm(model_dir), [p.image for p in pairs], [prompt] * len(pairs), 24)
    words = [set(re.findall(r"[a-z]+", c.lower())) for c in captions]
    hits = {
        "both": [p.colour in w and p.shape in w for p, w in zip(pairs, words, strict=True)],
        "colour": [p.colour in w for p, w in zip(pairs, words, strict=True)],
        "shape": [p.shape in w for p, w in zip(pairs, words, strict=True)],
    }
    return {k: round(sum(v) / len(v), 3) for k, v in hits.items()}


def main(
    palette: Annotated[
        str, typer.Option(help="demo (tuning) or heldout (HELDOUT_COLOURS: reporting)")
    ] = "demo",
    data_seed: Annotated[int, typer.Option(help="seed set, pool, eval from S, S+1, S+2")] = 101,
    seed_pairs: int = 960,
    pool: int = 480,
    alt_fraction: float = 0.6,
    eval: int = 1000,
    clip_epochs: int = 20,
    size: Annotated[int, typer.Option(help="image side in px (every arm's clip-tiny resizes to 32)")] = 64,
    tower: Annotated[
        str,
        typer.Option(help="the seed set's CLIP (the scorer and the VLM's tower): clip-tiny or clip-conv-64"),
    ] = "clip-conv-64",
    vlm_epochs: Annotated[
        int | None, typer.Option(help="stage-1 epochs; empty = vlm-tiny's own (30)")
    ] = None,
    samples_seen: int = 2400,
    seeds: Annotated[int, typer.Option(help="trainings per arm")] = 1,
    top_fraction: float = 0.5,
    storage: Annotated[
        str | None, typer.Option(help="storage root (default: a fresh temporary folder)")
    ] = None,
) -> None:
    if palette not in ("demo", "heldout"):
        raise typer.BadParameter("demo or heldout", param_hint="--palette")
    if tower not in TOWERS:
        raise typer.BadParameter(" or ".join(TOWERS), param_hint="--tower")
    os.environ["VLFORGE_STORAGE"] = storage or tempfile.mkdtemp(prefix="vlforge-recaption-exp-")

    from tasks.experiment.curation import CurationExperimentArgs, run_curation_experiment, table_rows
    from tasks.train.pretrain import pretrain
    from vlforge.demo.datasets import publish_pairs
    from vlforge.demo.synth import with_alt_text
    from vlforge.settings import get_settings

    settings = get_settings()
    t0 = time.perf_counter()
    seed_set = task_pairs(palette, seed_pairs, data_seed, "seed", size)
    publish_pairs(settings, "seed", seed_set)
    alt_pool = with_alt_text(
        task_pairs(palette, pool, data_seed + 1, "pool", size), alt_fraction, seed=data_seed + 1
    )
    publish_pairs(settings, "pool", alt_pool)
    eval_pairs = task_pairs(palette, eval, data_seed + 2, "eval", size)
    publish_pairs(settings, "heldout", eval_pairs, labels=True)
    common = dict(eval_fraction=0.0, min_eval_pairs=0, register_model=False)
    clip = pretrain("seed", settings, epochs=clip_epochs, **TOWERS[tower], **common)
    t_clip = time.perf_counter()
    vlm_opts = {"epochs": vlm_epochs} if vlm_epochs else {}
    vlm = pretrain("seed", settings, recipe="vlm-tiny", vision_model=clip.model_dir, **vlm_opts, **common)
    t_vlm = time.perf_counter()
    naming = caption_naming(vlm.model_dir, eval_pairs, "Describe the image.")

    args = CurationExperimentArgs(
        pool="pool", eval="heldout", scorer=clip.model_dir, recaption_model=vlm.model_dir, seeds=seeds,
        samples_seen=samples_seen, top_fraction=top_fraction, **CLIP_TINY,
    )  # fmt: skip
    out = run_curation_experiment(args, settings)
    t_end = time.perf_counter()
    for row in table_rows(out):
        print(row)
    print(out["verdict"])
    key = "zero_shot_accuracy"
    result = {
        "palette": palette, "data_seed": data_seed, "seed_pairs": seed_pairs, "pool": pool,
        "alt_fraction": alt_fraction, "eval_pairs": eval, "size": size, "tower": tower, "clip_epochs": clip_epochs,
        "vlm_epochs": vlm_epochs or "recipe", "samples_seen": samples_seen, "seeds": seeds,
        "top_fraction": top_fraction,
        "vlm_captions_name": naming,
        "arms": {n: {"rows": a["rows"], "samples_seen": a["samples_seen"], key: round(a[key], 3),
                     "ci": [round(x, 3) for x in a["zero_shot_ci"]]} for n, a in out["arms"].items()},
        "vs_unfiltered": {n: {k: round(v, 3) for k, v in c[key].items()} for n, c in out["comparisons"].items()},
        "recaption_vs_filtering": {
            "arms": [out["recaption_vs_filtering"]["recaptioned_arm"], out["recaption_vs_filtering"]["filtering_arm"]],
            **{k: round(v, 3) for k, v in out["recaption_vs_filtering"][key].items()},
            "each": {n: {k: round(v, 3) for k, v in d.items()}
                     for n, d in out["recaption_vs_filtering"]["each"].items()},
        },
        "recaption_rejects_synthetic_share": out["arms"].get("recaption_rejects", {}).get("synthetic_share"),
        "verdict": out["verdict"],
        "seconds": {"clip": round(t_clip - t0, 1), "vlm": round(t_vlm - t_clip, 1),
                    "experiment": round(t_end - t_vlm, 1), "total": round(t_end - t0, 1)},
        "machine": benchkit.machine(),
    }  # fmt: skip
    benchkit.write_result(
        f"recaption_experiment-{palette}-{data_seed}-{tower}-{size}px-e{clip_epochs}.json", result
    )


if __name__ == "__main__":
    typer.run(main)
