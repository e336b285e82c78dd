"""How many distinct plain drawings no copy detector can tell from a cropped copy of an eval image.

A plain drawing (``vlforge.demo.synth.DEMO``: one flat shape of a radius and centre drawn at random, on a flat
background, no noise) holds nothing but its class and its geometry. A border crop of it, squashed back to a
square as copy detection compares images, is the same shape moved and enlarged: with the four sides cut by
``l, t, r, b``, the shape's centre goes to ``((cx - l) / w, (cy - t) / h)`` and its radius to ``radius / w``
across and ``radius / h`` down (``w = 1 - l - r``, ``h = 1 - t - b``; shares of the side). Another drawing of the
same class whose radius and centre equal those of some crop of an eval image, to within the precision an image
of its size allows, *is* that crop, pixel for pixel: any detector that finds every such crop also removes it.

This computes, from the generator's own parameters (no images, no detector), the share of distinct drawings
that some eval image's crop family explains to within ``delta`` px, for eval sets of several sizes and for two
crop families: the detector's (``copydetect.MAX_CROP`` of each side at most) and the copies ``bench/decontam.py``
makes (2-10 % of each side). It is the least false-removal rate of a detector with full recall of such crops.

    .venv/bin/python bench/decontam_bound.py [--seed 0] [--eval 200,2000] [--distinct 20000]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import numpy as np
import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def draws(task, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` drawings' class group (colour, shape, background) and geometry, as shares of the side, drawn as
    ``vlforge.demo.synth.draw`` draws them (one size: ``task.sizes[0]``)."""
    size = task.sizes[0]
    groups = len(task.colours) * len(task.shapes) * len(task.backgrounds)
    r = rng.uniform(*task.radius, n)
    m = task.margin / size
    return {
        "group": rng.integers(0, groups, n),
        "r": r,
        "cx": rng.uniform(r + m, 1 - r - m),
        "cy": rng.uniform(r + m, 1 - r - m),
    }


def explained(ev: dict, ds: dict, lo: float, hi: float, delta: float, steps: int = 161) -> np.ndarray:
    """int per distinct drawing: an eval drawing of its group (-1: none) that, cropped by ``lo``-``hi`` of each
    side and squashed back to a square, has its radius and centre to within ``delta`` (a share of the side).
    The shapes are drawn with one radius both ways, so only a crop with ``w == h`` keeps a distinct drawing's
    proportions; ``w`` is scanned over its range."""
    hit = np.full(len(ds["r"]), -1)
    widths = np.linspace(1 - 2 * hi, 1 - 2 * lo, steps)
    for j in range(len(ev["r"])):
        idx = np.flatnonzero(ds["group"] == ev["group"][j])
        if not len(idx):
            continue
        r, cx, cy = ds["r"][idx], ds["cx"][idx], ds["cy"][idx]
        ok = np.zeros(len(idx), bool)
        for w in widths:
            first, last = max(lo, 1 - hi - w), min(hi, 1 - lo - w)  # the left (top) cut, given w
            if first > last:
                continue
            slack = delta * w  # a centre within delta of the crop's is a cut within delta * w
            left, top = ev["cx"][j] - cx * w, ev["cy"][j] - cy * w
            ok |= (
                (np.abs(ev["r"][j] / w - r) <= delta)
                & (left >= first - slack)
                & (left <= last + slack)
                & (top >= first - slack)
                & (top <= last + slack)
            )
        hit[idx[ok]] = j
    return hit


def render(task, d: dict, i: int) -> bytes:
    """Drawing ``i`` of ``d`` as ``vlforge.demo.synth.generate`` encodes it (its group's colour, shape and
    background, its geometry)."""
    from PIL import Image, ImageDraw

    from vlforge.demo.synth import _draw_outline, encode

    size = task.sizes[0]
    g = int(d["group"][i])
    colour, shape, back = _group(task, g)
    img = Image.new("RGB", (size, size), task.backgrounds[back])
    r, cx, cy = d["r"][i] * size, d["cx"][i] * size, d["cy"][i] * size
    _draw_outline(ImageDraw.Draw(img), shape, cx, cy, r, 0.0, task.colours[colour], task.backgrounds[back])
    return encode(img, task.format)


def _group(task, g: int) -> tuple[str, str, str]:
    colours, shapes, backs = list(task.colours), list(task.shapes), list(task.backgrounds)
    return (
        colours[g % len(colours)],
        shapes[g // len(colours) % len(shapes)],
        backs[g // len(colours) // len(shapes)],
    )


def crop_mads(task, ev: dict, ds: dict, hit: np.ndarray, k: int, seed: int) -> dict:
    """The detector's own measure on rendered images: the least mean absolute difference (0-255, at 32 px) over
    crops of the eval image (``copydetect.crop_distance``'s search), for ``k`` distinct drawings the geometry
    explains, and for ``k`` cropped copies of eval drawings (2-10 % of each side, as ``bench/decontam.py``)."""
    import random

    from bench.decontam import near_copy
    from tasks.curate.copydetect import _SEARCH_STEPS, _aligned_mad, _small
    from vlforge.imagehash import fingerprint

    def mad(eval_image: bytes, other: bytes) -> float:
        return _aligned_mad(
            fingerprint(eval_image)[1], _small(fingerprint(other)[1]), np.zeros(4), _SEARCH_STEPS, np.inf
        )[0]

    rng = random.Random(seed)
    which = np.flatnonzero(hit >= 0)[:k]
    lookalike = [mad(render(task, ev, hit[i]), render(task, ds, i)) for i in which]
    out = {"lookalikes": len(lookalike), "lookalike_mad_p10_50_90": q(lookalike)}
    for how in ("crop", "crop+rescale+jpeg"):
        copies = [mad(e := render(task, ev, j), near_copy(e, how, rng)) for j in range(min(k, len(ev["r"])))]
        out[f"{how}_copy_mad_p10_50_90"] = q(copies)
        # the share of lookalikes that a threshold letting 90% of these copies through would accept too
        out[f"lookalikes_under_{how}_p90"] = round(
            float(np.mean(np.array(lookalike) <= np.percentile(copies, 90))), 2
        )
    return out


def q(x) -> list[float]:
    return [round(float(v), 2) for v in np.percentile(x, [10, 50, 90])] if len(x) else []


def main(
    seed: int = 0,
    eval: Annotated[str, typer.Option(help="eval-set sizes")] = "200,2000",
    distinct: int = 20000,
    deltas: Annotated[str, typer.Option(help="precision, canonical px (of 64)")] = "0.25,0.5,1.0",
    images: Annotated[int, typer.Option(help="lookalikes and copies rendered and compared (0: none)")] = 100,
) -> None:
    from tasks.curate.copydetect import MAX_CROP
    from vlforge.demo.synth import DEMO
    from vlforge.imagehash import CANON

    precisions = [float(x) for x in deltas.split(",")]
    rng = np.random.default_rng(seed)
    ds = draws(DEMO, distinct, rng)
    for n_eval in [int(x) for x in eval.split(",")]:
        ev = draws(DEMO, n_eval, rng)
        for family, (lo, hi) in (("detector", (0.0, MAX_CROP)), ("bench copies", (0.02, 0.10))):
            for d in precisions:
                hit = explained(ev, ds, lo, hi, d / CANON)
                out = {"eval": n_eval, "crops": family, "cut_per_side": [lo, hi], "delta_px": d,
                       "distinct_explained": round(float((hit >= 0).mean()), 4)}  # fmt: skip
                if images and family == "detector" and d == min(precisions):
                    out.update(crop_mads(DEMO, ev, ds, hit, images, seed))
                print(json.dumps(out), flush=True)


if __name__ == "__main__":
    typer.run(main)
