"""Curate benchmark: ViT-B/32 (random weights) image-text scoring pairs/s on this CPU through the Ray scorer,
against (a) the compute ceiling = measured fp32 matmul FLOP/s / model FLOPs per pair and (b) a naive
single-process loop over the same batches. Writes bench/results/curate.json.

    .venv/bin/python bench/curate.py [--pairs 8192] [--folded-naive] [--batch-size 32]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Annotated

import typer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchkit import write_result  # noqa: E402


def encoder_flops(tokens: int, width: int, mlp: int, layers: int) -> float:
    """Forward FLOPs (2 x multiply-adds) of a pre-LN transformer encoder over ``tokens`` tokens."""
    per_layer = tokens * (8 * width * width + 4 * tokens * width + 4 * width * mlp)  # qkvo + attn + mlp
    return float(layers * per_layer)


def clip_flops_per_pair(config, text_tokens: float | None = None) -> dict[str, float]:
    """Forward FLOPs per pair; the text tower over ``text_tokens`` (default: the full context length)."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    image = encoder_flops(patches + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers)
    image += 2.0 * patches * 3 * v.patch_size**2 * v.hidden_size  # patch embedding conv
    image += 2.0 * v.hidden_size * config.projection_dim
    tokens = text_tokens or t.max_position_embeddings
    text = encoder_flops(tokens, t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    text += 2.0 * t.hidden_size * config.projection_dim
    return {"image": image, "text": text, "total": image + text}


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def naive_loop(model_dir: str, settings, pairs, batch_size: int, fold: bool = False) -> float:
    """Load the scorer from its folder, then decode + preprocess + score batch after batch in this process
    (the same model loading, preprocessing and tokenisation as the Ray scorer); returns seconds.
    ``fold``: with the scorer's folded activation too, which isolates what Ray itself adds."""
    import torch

    from models.clip import fold_quick_gelu
    from tasks.common import load_model

    t0 = time.perf_counter()
    bundle = load_model(model_dir, settings)
    bundle.model.eval()
    if fold:
        fold_quick_gelu(bundle.model)
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            img = bundle.embed_images(bundle.preprocess_images([p.image for p in chunk]))
            txt = bundle.embed_texts(**bundle.tokenize([p.caption for p in chunk]))
            (img * txt).sum(-1).numpy()
    return time.perf_counter() - t0


def text_tokens_per_pair(bundle, pairs, batch_size: int) -> float:
    """Mean text length the model runs over: each batch is padded to its longest caption."""
    lengths = []
    for i in range(0, len(pairs), batch_size):
        ids = bundle.tokenize([p.caption for p in pairs[i : i + batch_size]])["input_ids"]
        lengths += [ids.shape[1]] * ids.shape[0]
    return sum(lengths) / len(lengths)


def main(
    # Enough pairs that the actors' start-up is paid back as in a real curation (the break-even size is in
    # BENCHMARKS.md "Curate").
    pairs: int = 8192,
    folded_naive: Annotated[
        bool,
        typer.Option(
            help="also time the naive loop with the scorer's folded activation (isolates what Ray adds)"
        ),
    ] = False,
    image_px: Annotated[int, typer.Option(help="side of the synthetic images (img2dataset: 256)")] = 256,
    batch_size: int = 32,
) -> None:
    args = SimpleNamespace(**locals())  # the options by name, as the code below reads them
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from models.clip import build_clip
    from tasks.curate.scoring import list_shards, score_shards, scorer_plan
    from vlforge.demo.synth import make_pairs
    from vlforge.raycluster import init_ray
    from vlforge.settings import get_settings

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = tempfile.mkdtemp(prefix="vlforge-bench-curate-")
    os.environ["VLFORGE_STORAGE"] = os.path.join(work, "store")
    settings = get_settings()
    pairs = make_pairs(args.pairs, 0.0, seed=0, size=args.image_px)
    bundle = build_clip("clip-vit-b-32", [p.caption for p in pairs])
    bundle.model.eval()
    model_dir = bundle.save(os.path.join(work, "vit-b-32"))
    text_tokens = text_tokens_per_pair(bundle, pairs, args.batch_size)
    flops = clip_flops_per_pair(bundle.model.config, text_tokens)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vlforge.demo.datasets import write_raw_batch

    write_raw_batch(settings, "bench", "b1", pairs, shard_size=args.batch_size * 2)
    init_ray(settings)

    naive_loop(model_dir, settings, pairs[: args.batch_size], args.batch_size)  # warm-up (imports)
    peak = matmul_flops_per_s()
    naive_s = naive_loop(model_dir, settings, pairs, args.batch_size)
    folded_s = (
        naive_loop(model_dir, settings, pairs, args.batch_size, fold=True) if args.folded_naive else None
    )
    shards = list_shards(settings, "bench", ["b1"], "vit-b-32")
    plan = scorer_plan()
    t0, timings = time.perf_counter(), {}
    scored = score_shards(
        shards,
        model_dir,
        settings,
        bundle,
        args.batch_size,
        progress=False,
        timings=timings,
    )
    ray_s = time.perf_counter() - t0
    steady_rows = scored - timings["first_batch_rows"]
    steady_s = timings["last_batch_at"] - timings["first_batch_at"]
    peak = max(peak, matmul_flops_per_s())  # measured before and after: the box is shared

    ceiling = peak / flops["total"]
    result = {
        "pairs_per_s": scored / ray_s,
        "ceiling_fraction": (scored / ray_s) / ceiling,
        "speedup_vs_naive": naive_s / ray_s,
        "steady_pairs_per_s": steady_rows / steady_s if steady_s > 0 else None,
        "steady_ceiling_fraction": (steady_rows / steady_s) / ceiling if steady_s > 0 else None,
        "ray_startup_s": timings["first_batch_at"] - t0,
        "naive_pairs_per_s": len(pairs) / naive_s,
        "naive_ceiling_fraction": (len(pairs) / naive_s) / ceiling,
        "naive_folded_pairs_per_s": len(pairs) / folded_s if folded_s else None,
        "speedup_vs_naive_folded": folded_s / ray_s if folded_s else None,
        "ceiling_pairs_per_s": ceiling,
        "matmul_gflop_per_s": peak / 1e9,
        "model_gflop_per_pair": {k: v / 1e9 for k, v in flops.items()},
        "pairs": scored,
        "batch_size": args.batch_size,
        "image_px": args.image_px,
        "text_tokens_per_pair": text_tokens,
        "naive_torch_threads": threads,
        "scorer_actors": plan.actors,
        "scorer_threads_per_actor": plan.threads,
        "cpus": os.cpu_count(),
        "note": "pairs_per_s includes Ray actor start-up (process, imports, model load); the naive time includes loading the model from the same folder; steady_* counts from the first result batch to the last; FLOPs are 2 x MACs, text at the padded length of each batch",
    }
    write_result("curate.json", result)


if __name__ == "__main__":
    typer.run(main)
