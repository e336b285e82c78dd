"""Decontamination benchmark: recall on near copies of eval images and the rate of distinct images removed,
on synthetic shapes (the demo's plain shapes, ``SHAPES30``'s noisy ones, both ``vlforge.demo.synth``) and photo-like images
(generated 1/f textures with gradients and blobs, plus any sample photos shipped inside installed packages);
and how often a copy lands on the same side of the held-out split as its original.

A copy is the eval image re-encoded as JPEG at quality 20-60, rescaled (x0.4-0.8 or x1.25-2), with a border of
2-10% of each side cropped off, or all three. Distinct images are other images of the same generator (the same
classes). Tune on one ``--seed`` and report on another (the thresholds in ``tasks/curate/copydetect.py`` were
tuned on seed 1; BENCHMARKS.md reports seed 2).

    .venv/bin/python bench/decontam.py [--seed 2] [--eval 200] [--distinct 600]
    .venv/bin/python bench/decontam.py --kinds "" --scale 8000,32000   # curate cost per row, driver peak RSS
    (eval-set size against cost per row and the approximate lookup: bench/decontam_lookup.py)
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import time
from typing import Annotated

import numpy as np
import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("jpeg", "rescale", "crop", "crop+rescale+jpeg")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_photos() -> list[bytes]:
    """Photos shipped inside installed packages (matplotlib's sample data), if any."""
    try:
        import matplotlib

        folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
    except ImportError:
        return []
    names = [f for f in sorted(os.listdir(folder)) if f.lower().endswith((".jpg", ".png"))]
    return [open(os.path.join(folder, f), "rb").read() for f in names]


def images(kind: str, n: int, seed: int) -> list[bytes]:
    if kind == "demo":
        from vlforge.demo.synth import make_pairs

        return [p.image for p in make_pairs(n, seed=seed)]
    if kind == "shapes30":
        from vlforge.demo.synth import make_shape_pairs

        return [p.image for p in make_shape_pairs(n, seed=seed)]
    from vlforge.demo.synth import photo_like

    return photo_like(n, seed)


def near_copy(data: bytes, how: str, rng: random.Random) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if "crop" in how:
        w, h = img.size
        left, top, right, bottom = (rng.uniform(0.02, 0.10) for _ in range(4))
        img = img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))
    if "rescale" in how:
        f = rng.choice((rng.uniform(0.4, 0.8), rng.uniform(1.25, 2.0)))
        img = img.resize(
            (max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.BICUBIC
        )
    if "jpeg" in how:
        return _jpeg(img, rng.randint(20, 60))
    return _png(img) if how == "crop" or how == "rescale" else _jpeg(img, 90)


def quality(kind: str, seed: int, n_eval: int, n_distinct: int) -> dict:
    from tasks.curate.copydetect import CopyMatcher, EvalIndex
    from vlforge.imagehash import fingerprint, split_hash

    rng = random.Random(seed)
    evals = images(kind, n_eval, seed)
    if kind == "photo":
        evals += sample_photos()
    distinct = images(kind, n_distinct, seed + 10_000)
    fps = [fingerprint(b) for b in evals]
    index = EvalIndex([f"eval@{kind}"] * len(evals), [str(i) for i in range(len(evals))],
                      np.array([f[0] for f in fps], np.int64), np.stack([f[1] for f in fps]))  # fmt: skip
    matcher = CopyMatcher(index)
    out: dict = {"kind": kind, "seed": seed, "eval": len(evals), "distinct": len(distinct)}
    t0 = time.perf_counter()
    rows = 0
    for how in KINDS:
        copies = [near_copy(b, how, rng) for b in evals]
        cfp = [fingerprint(b) for b in copies]
        found, _ = matcher.match([f[0] for f in cfp], [f[1] for f in cfp])
        rows += len(copies)
        out[f"recall_{how}"] = float(np.mean(found == np.arange(len(evals))))
        same = [split_hash(c[0]) == split_hash(e[0]) for c, e in zip(cfp, fps, strict=True)]
        out[f"same_split_{how}"] = float(np.mean(same))
    dfp = [fingerprint(b) for b in distinct]
    found, _ = matcher.match([f[0] for f in dfp], [f[1] for f in dfp])
    rows += len(distinct)
    out["seconds_per_row"] = (time.perf_counter() - t0) / rows
    out["recall"] = float(np.mean([out[f"recall_{h}"] for h in KINDS]))
    out["false_removal"] = float(np.mean(found >= 0))
    groups = {split_hash(f[0]) for f in dfp}
    out["split_groups_per_100_distinct"] = 100.0 * len(groups) / len(dfp)
    return out


def scale_run(rows: int, n_eval: int, modes: tuple[bool, ...] = (False, True)) -> list[dict]:
    """Curations (no scorer) of one ``rows``-row pool of demo shapes (the worst case: every row has candidates
    to verify) on local Ray, each in a fresh process: seconds per row and the driver's peak RSS, without and
    with decontamination (``modes``) against an ``n_eval``-image eval set (10% of the pool copies its images).
    The pool is generated once, in its own process, in pieces: no process here ever holds it."""
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prepare = f"""
import sys, dataclasses
sys.path.insert(0, {root!r})
from vlforge.settings import get_settings
from vlforge.demo.synth import make_pairs
from vlforge.demo.datasets import write_raw_batch
from tasks.curate import curate
settings = get_settings()
evals = make_pairs({n_eval}, seed=7, prefix="ev")
write_raw_batch(settings, "ev", "b1", evals, shard_size=1000)
curate("ev", "evset", settings, eval_set=True, track=False, progress=False)
for start in range(0, {rows}, 2000):
    pool = make_pairs(min(2000, {rows} - start), seed=8 + start, prefix=f"px{{start}}-")
    for i in range(0, len(pool), 10):
        pool[i] = dataclasses.replace(pool[i], image=evals[(start + i) % {n_eval}].image)
    write_raw_batch(settings, "web", f"b{{start:09d}}", pool, shard_size=2000)
"""
    code = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from vlforge.settings import get_settings
from tasks.curate import curate
from tasks.curate.filters import FilterConfig
settings = get_settings()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
samples = []  # the driver's RSS (MB) every 5 s: flat in the pool's size means flat along the run
def sample():
    while True:
        with open("/proc/self/status") as fh:
            rss = next(int(x.split()[1]) for x in fh if x.startswith("VmRSS:")) / 1024
        samples.append((round(time.perf_counter() - t0), round(rss)))
        time.sleep(5)
import threading
threading.Thread(target=sample, daemon=True).start()
res = curate("web", "pool-{mode}", settings, track=False, progress=False,
             filters=FilterConfig(decontaminate_against=None if {on} else ["none"]))
dt = time.perf_counter() - t0
print("RESULT", json.dumps({{"rows": {rows}, "decontaminate": {on}, "seconds": round(dt, 1),
    "ms_per_row": round(1000 * dt / {rows}, 2), "contaminated": res.counts.get("contaminated", 0),
    "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "driver_rss_before_mb": round(rss0 / 1024), "driver_rss_every_5s": samples,
    "phases_s": res.dataset_version.manifest["compute"]["seconds"]}}))
"""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VLFORGE_STORAGE": tmp}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", prepare], env=env, capture_output=True, text=True, check=True)
        print(json.dumps({"rows": rows, "pool_written_s": round(time.perf_counter() - t0, 1)}), flush=True)
        for on in modes:
            script = code.format(root=root, mode="on" if on else "off", on=on, rows=rows)
            run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr[-3000:])
            line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
            out.append(json.loads(line[len("RESULT ") :]))
            print(json.dumps(out[-1]), flush=True)
    return out


def main(
    seed: int = 2,
    eval: Annotated[int, typer.Option(help="eval images per kind")] = 200,
    distinct: Annotated[int, typer.Option(help="distinct pool images per kind")] = 600,
    kinds: str = "demo,shapes30,photo",
    scale: Annotated[str, typer.Option(help="pool sizes for the curate-pass cost, e.g. 20000,80000")] = "",
    baseline: Annotated[bool, typer.Option(help="also curate each pool without decontamination")] = True,
    decontaminate: Annotated[bool, typer.Option(help="curate each pool with decontamination")] = True,
) -> None:
    results = []
    for kind in [k for k in kinds.split(",") if k]:
        r = quality(kind, seed, eval, distinct)
        results.append(r)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    if scale:
        for rows in [int(x) for x in scale.split(",")]:
            modes = [m for m, wanted in ((False, baseline), (True, decontaminate)) if wanted]
            scale_run(rows, eval, tuple(modes))


if __name__ == "__main__":
    typer.run(main)
