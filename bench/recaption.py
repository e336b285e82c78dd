"""Recaption throughput: captions/s through the Ray Data path against a plain single-process ``generate`` loop on
the same model, rows and batch size, in one run (target ratio >= 0.9 on CPU).

Builds a tiny VLM (``vlm-tiny`` on a random tiny CLIP; or ``--model FOLDER``) and a dataset version of ``--rows``
synthetic pairs in ``--parts`` data files, then alternates, ``--repeats`` times: the plain loop
(``tasks.recaption.generate.plain_loop``: read each part, decode, one ``generate`` per batch) and the Ray Data
path (``build_dataset``: read_parquet -> ``map_batches(Captioner)`` on an actor pool, drained on the driver).
Both include loading the model (the plain loop once, each actor once); Ray's own start-up is excluded (it is
started before the first timing). Then the full stage (``recaption``: the same plus writing the parts and
publishing) once. Also reports the driver's peak RSS. On a GPU: ``--device cuda`` for the plain loop; the actors
take the cluster's GPUs. Writes bench/results/recaption.json.

    python bench/recaption.py [--rows 256] [--parts 4] [--batch-size 16] [--max-new-tokens 16] [--repeats 2]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import typer  # noqa: E402
from benchkit import machine, write_result  # noqa: E402

PROMPT = "Describe the image."


def _model(folder: str, size: int) -> str:
    from models.clip import build_clip
    from models.vlm import build_vlm, save_vlm
    from vlforge.demo.synth import make_pairs

    corpus = [p.caption for p in make_pairs(64, seed=1, size=size)]
    return save_vlm(build_vlm("vlm-tiny", build_clip("clip-tiny", corpus), corpus), folder)


def _ray_path(files, model_dir, settings, opts) -> tuple[int, float]:
    from tasks.recaption.generate import build_dataset

    start = time.perf_counter()
    rows = 0
    for batch in build_dataset(files, model_dir, settings, **opts).iter_batches(batch_size=None):
        rows += len(batch["key"])
    return rows, time.perf_counter() - start


def main(
    rows: int = typer.Option(256, help="Synthetic pairs captioned."),
    parts: int = typer.Option(4, help="Data files they are written in."),
    batch_size: int = typer.Option(16, help="Images per generate call."),
    max_new_tokens: int = typer.Option(16, help="Caption length limit, in tokens."),
    image_size: int = typer.Option(64, help="Synthetic image side, in pixels."),
    repeats: int = typer.Option(2, help="Alternated timings of each path; the best of each counts."),
    model: str | None = typer.Option(None, help="A saved VLM folder (default: a new vlm-tiny)."),
) -> None:
    args = SimpleNamespace(**locals())  # the options by name, as the code below reads them

    import torch

    from tasks.recaption.generate import plain_loop
    from tasks.recaption.stage import recaption
    from vlforge.demo.datasets import publish_pairs
    from vlforge.demo.synth import make_pairs
    from vlforge.raycluster import init_ray
    from vlforge.settings import Settings

    work = tempfile.mkdtemp(prefix="vlforge-bench-recaption-")
    settings = Settings(storage=os.path.join(work, "store"))
    model_dir = args.model or _model(os.path.join(work, "vlm"), args.image_size)
    pairs = make_pairs(args.rows, seed=0, size=args.image_size, prefix="bench")
    dv = publish_pairs(settings, "bench", pairs, files=args.parts)
    files = sorted(dv.part_files("data"))
    opts = {"prompt": PROMPT, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    init_ray(settings)
    plain, ray_times = [], []
    for _ in range(args.repeats):  # alternated, best of each: a shared machine's noise hits both alike
        start = time.perf_counter()
        n = plain_loop(files, model_dir, **opts)
        plain.append(time.perf_counter() - start)
        assert n == args.rows, n
        n, seconds = _ray_path(files, model_dir, settings, opts)
        assert n == args.rows, n
        ray_times.append(seconds)
    start = time.perf_counter()
    stage = recaption(dv.ref, settings, model=model_dir, track=False, progress=False, **opts)
    stage_s = time.perf_counter() - start
    assert stage.captioned == args.rows
    plain_rate, ray_rate = args.rows / min(plain), args.rows / min(ray_times)
    result = {
        "rows": args.rows,
        "parts": args.parts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "image_size": args.image_size,
        "plain_captions_per_s": round(plain_rate, 2),
        "ray_data_captions_per_s": round(ray_rate, 2),
        "ratio_ray_to_plain": round(ray_rate / plain_rate, 3),
        "stage_captions_per_s": round(args.rows / stage_s, 2),
        "plain_seconds": [round(s, 2) for s in plain],
        "ray_data_seconds": [round(s, 2) for s in ray_times],
        "torch_threads_plain": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **machine(),
    }
    write_result("recaption.json", result)


if __name__ == "__main__":
    typer.run(main)
