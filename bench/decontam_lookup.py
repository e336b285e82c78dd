"""Decontamination against large eval sets: the cost of a pool row's lookup and verification, the memory of
the lookup a worker process holds, and the recall of near copies, exact (flat faiss search) against
approximate (``tasks/curate/copyindex.py``: inverted lists of 8-bit codes), at several eval-set sizes.

For each kind (photo-like images, shapes30's noisy drawings) and size E, an eval set of E images is indexed
both ways; the queries are near copies of 100 of its images per copy kind (``bench/decontam.py``'s four:
JPEG, rescaled, cropped, all three) and 200 distinct images of the same generator (another seed), matched in
batches of 100 as a curate task does. Photo-like eval sets above 1,000 images are 1,000 generated images in
flips, 90-degree turns and channel orders (distinct images to a copy detector; generating 20,000 takes 10
minutes here). Tune ``copyindex.PROBE`` on one ``--seed``, report another.

    PYTHONPATH=. .venv/bin/python bench/decontam_lookup.py --seed 3 --sizes 200,2000,20000
    # recall and removals with the lookup curate picks only (BENCHMARKS.md, Noise check; noise_z tuned on seed 1):
    PYTHONPATH=. .venv/bin/python bench/decontam_lookup.py --seed 2 --lookups auto --distinct 600
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import sys
import time
from typing import Annotated

import numpy as np
import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decontam import KINDS, images, near_copy  # noqa: E402  (bench/decontam.py)

QUERIES_PER_KIND = 100
DISTINCT = 200
BATCH = 100


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def eval_images(kind: str, n: int, seed: int) -> list[bytes]:
    if kind != "photo" or n <= 1000:
        return images(kind, n, seed)
    from PIL import Image

    base = [Image.open(io.BytesIO(b)).convert("RGB") for b in images(kind, 1000, seed)]
    turns = [None, *[getattr(Image.Transpose, t) for t in ("FLIP_LEFT_RIGHT", "FLIP_TOP_BOTTOM", "ROTATE_90",
             "ROTATE_180", "ROTATE_270", "TRANSPOSE", "TRANSVERSE")]]  # fmt: skip
    out = []
    for v in range(-(-n // 1000)):
        for img in base:
            t = img if turns[v % 8] is None else img.transpose(turns[v % 8])
            if v >= 8:  # channel order: another colour, another image
                r, g, b = t.split()
                t = Image.merge("RGB", (b, r, g) if v < 16 else (g, b, r))
            out.append(_png(t))
            if len(out) == n:
                return out
    return out


def _index(fps):
    from tasks.curate.copydetect import EvalIndex

    return EvalIndex(["eval@bench"] * len(fps), [str(i) for i in range(len(fps))],
                     np.array([f[0] for f in fps], np.int64), np.stack([f[1] for f in fps]))  # fmt: skip


def _lookup_bytes(prep) -> int:
    import faiss

    return sum(len(faiss.serialize_index(i)) for i in (prep.variants, prep.plain))


def _run(matcher, queries) -> tuple[np.ndarray, float]:
    found, t0 = [], time.perf_counter()
    for i in range(0, len(queries), BATCH):
        part = queries[i : i + BATCH]
        found.append(matcher.match([f[0] for f in part], [f[1] for f in part])[0])
    return np.concatenate(found), (time.perf_counter() - t0) / len(queries)


def measure(kind: str, size: int, seed: int, lookups: str = "both", distinct_n: int = DISTINCT) -> list[dict]:
    from tasks.curate.copydetect import _PREPARED, CopyMatcher
    from vlforge.imagehash import fingerprint

    rng = random.Random(seed)
    t0 = time.perf_counter()
    evals = eval_images(kind, size, seed)
    fps = [fingerprint(b) for b in evals]
    index = _index(fps)
    made = time.perf_counter() - t0
    targets = rng.sample(range(size), min(size, QUERIES_PER_KIND))
    queries, truth, kinds = [], [], []
    for how in KINDS:
        for e in targets:
            queries.append(fingerprint(near_copy(evals[e], how, rng)))
            truth.append(e)
            kinds.append(how)
    distinct = [fingerprint(b) for b in images(kind, distinct_n, seed + 10_000)]
    truth_all = np.array(truth + [-1] * len(distinct))
    kinds_all = np.array(kinds + ["distinct"] * len(distinct))
    del evals
    out, founds = [], {}
    modes = (True, False) if lookups == "both" else (None,)  # None: by the eval set's size, as curate does
    for approximate in modes:  # the smaller first: peak RSS only grows
        _PREPARED.clear()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        matcher = CopyMatcher(index, approximate=approximate)
        built = time.perf_counter() - t0
        found, per_row = _run(matcher, queries + distinct)
        name = {True: "ivf-sq8", False: "flat", None: "auto"}[approximate]
        r = {"kind": kind, "seed": seed, "eval": size, "lookup": name,
             "ms_per_row": round(1000 * per_row, 2), "build_s": round(built, 1),
             "lookup_kb_per_eval": round(_lookup_bytes(matcher.prep) / size / 1024, 1),
             "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024),
             "distinct_removed": round(float((found[truth_all < 0] >= 0).mean()), 4)}  # fmt: skip
        for how in KINDS:
            sel = kinds_all == how
            r[f"recall_{how}"] = round(float((found[sel] == truth_all[sel]).mean()), 3)
        founds[approximate] = found
        r["eval_made_s"] = round(made, 1)
        out.append(r)
        del matcher
    _PREPARED.clear()
    if lookups != "both":
        return out
    flat, approx = founds[False], founds[True]
    out[0]["same_answer_as_flat"] = round(float((approx == flat).mean()), 4)
    out[0]["copies_flat_finds_missed"] = int(((flat == truth_all) & (approx != truth_all)).sum())
    out[0]["copies_only_this_finds"] = int(((flat != truth_all) & (approx == truth_all)).sum())
    return out[::-1]


def main(
    seed: int = 3,
    sizes: Annotated[str, typer.Option(help="eval-set sizes")] = "200,2000,20000",
    kinds: str = "photo,shapes30",
    lookups: Annotated[str, typer.Option(help="both: flat and approximate; auto: as curate picks")] = "both",
    distinct: Annotated[int, typer.Option(help="distinct images per run")] = DISTINCT,
) -> None:
    for kind in [k for k in kinds.split(",") if k]:
        for size in [int(x) for x in sizes.split(",")]:
            for r in measure(kind, size, seed, lookups, distinct):
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    typer.run(main)
