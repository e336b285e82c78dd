"""Ray Train (1 worker) vs a plain PyTorch loop: samples/s on the same model, data and batch size.

Both train the same CLIP recipe (a mid-size variant of clip-tiny by default) from the same initial weights
on the same preprocessed synthetic pairs. Ray's figure is taken from the per-step MLflow timestamps of a
real ``pretrain`` run after its warm-up steps, so Ray start-up, data materialisation and evaluation are
excluded; the plain loop's figure is timed over the same steps. Writes bench/results/train.json.

    python bench/train.py [--pairs 512] [--batch-size 32] [--epochs 12] [--width 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train.json")


def mid_recipe(path: str, width: int, layers: int) -> str:
    from models.recipes import CONFIG_DIR

    raw = json.loads((CONFIG_DIR / "clip-tiny.json").read_text())
    block = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
             "num_attention_heads": max(1, width // 32)}  # fmt: skip
    raw.update(name="clip-bench", description="benchmark recipe", projection_dim=width)
    raw["vision"] = dict(block)
    raw["text"] = dict(block, max_position_embeddings=32)
    with open(path, "w") as fh:
        json.dump(raw, fh)
    return path


def ray_samples_per_s(settings, run_id: str, batch_size: int, skip: float) -> tuple[float, int]:
    from vlforge.tracking import configure

    history = sorted(configure(settings).get_metric_history(run_id, "loss"), key=lambda m: m.step)
    start = history[int(len(history) * skip)]
    last = history[-1]
    steps = last.step - start.step
    return steps * batch_size / ((last.timestamp - start.timestamp) / 1000.0), len(history)


def plain_samples_per_s(
    init_dir: str, dv, total_steps: int, batch_size: int, lr: float, skip: float
) -> float:
    import torch

    from models.clip import clip_loss, load_clip
    from tasks.train_data import read_split

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bundle = load_clip(init_dir)
    table = read_split(dv, 0.1, "train")
    pixels = bundle.preprocess_images(table.column("image").to_pylist())
    tokens = bundle.tokenize([str(c) for c in table.column("caption").to_pylist()])
    model = bundle.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    n = pixels.shape[0]
    step, warm = 0, int(total_steps * skip)
    t_start = None
    while step < total_steps:
        perm = torch.randperm(n)
        for i in range(n // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            out = model(input_ids=tokens["input_ids"][idx], attention_mask=tokens["attention_mask"][idx],
                        pixel_values=pixels[idx])  # fmt: skip
            loss = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == warm:
                t_start = time.perf_counter()
            if step >= total_steps:
                break
    return (total_steps - warm) * batch_size / (time.perf_counter() - t_start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--skip", type=float, default=0.2, help="share of steps treated as warm-up")
    args = ap.parse_args()

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="vlforge-bench-train-")
    os.environ["VLFORGE_STORAGE"] = os.path.join(tmp, "store")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from tasks.pretrain import pretrain
    from tests.helpers import publish_synthetic_dataset
    from vlforge.settings import get_settings

    settings = get_settings()
    dv, _ = publish_synthetic_dataset(settings, "bench", n=args.pairs, seed=0)
    recipe = mid_recipe(os.path.join(tmp, "clip-bench.json"), args.width, args.layers)
    lr = 1e-3
    t0 = time.perf_counter()
    result = pretrain("bench", settings, recipe=recipe, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                      register=False, log_every=50, checkpoint_every=10**9, name="bench")  # fmt: skip
    wall = time.perf_counter() - t0
    ray_sps, steps = ray_samples_per_s(settings, result.run_id, args.batch_size, args.skip)
    init_dir = os.path.join(settings.storage_uri, "ray_results", "bench", "init")
    plain_sps = plain_samples_per_s(init_dir, dv, steps, args.batch_size, lr, args.skip)
    out = {
        "samples_per_s": round(ray_sps, 2),
        "plain_samples_per_s": round(plain_sps, 2),
        "ratio": round(ray_sps / plain_sps, 3),
        "steps": steps,
        "batch_size": args.batch_size,
        "recipe": {"width": args.width, "layers": args.layers, "image_size": 32, "patch_size": 8},
        "pretrain_wall_s": round(wall, 1),
        "num_workers": 1,
        "device": "cpu",
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "platform": platform.platform(),
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
