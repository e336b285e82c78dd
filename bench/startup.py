"""Time to the first training step: a one-worker CLIP pretrain on a tiny synthetic set, phase by phase.

Each training runs in a fresh Python process (as ``vlforge pretrain`` does) on a warm machine: the dataset is
published and the MLflow database made once beforehand, so both are in the page cache. The phases come from the
driver's own marks (``TrainResult.phases``) and the first and last optimizer steps from the per-step MLflow
timestamps that rank 0 logs. ``--modes`` runs the paths side by side, alternating: ``local`` (a one-worker
training in the driver process, the default) and ``ray`` (``VLFORGE_LOCAL_TRAINING=false``: Ray Train's
TorchTrainer with one worker actor, the path every training took before). Writes bench/results/startup.json.

    python bench/startup.py [--pairs 96] [--epochs 2] [--batch-size 16] [--modes local,ray] [--rounds 1]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

START = time.time()  # this process's start, before the heavy imports

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import typer  # noqa: E402
from benchkit import machine, write_result  # noqa: E402

# (label, from mark, to mark): the driver's marks plus "process" (process start), "imported" (pretrain is called),
# "first_step", "last_step" and "exited" (Ray shut down, as the process ends).
PHASES = [
    ("imports", "process", "imported"),
    ("recipe setup", "imported", "start"),
    ("resolve inputs", "start", "resolved"),
    ("ray init", "resolved", "ray"),
    ("open run", "ray", "opened"),
    ("initial model", "opened", "initial_model"),
    ("data materialise", "initial_model", "data"),
    ("trainer start + first step", "data", "first_step"),
    ("steps", "first_step", "last_step"),
    ("teardown", "last_step", "trained"),
    ("evaluate", "trained", "end"),
    ("ray shutdown", "end", "exited"),
]


def train_once(name: str, pairs: int, epochs: int, batch_size: int) -> dict:
    """One pretrain in this process; its marks (seconds since the epoch)."""
    from tasks.train.pretrain import pretrain
    from vlforge.settings import get_settings
    from vlforge.tracking import configure

    marks = {"process": START, "imported": time.time()}
    settings = get_settings()
    result = pretrain(
        "startup", settings, name=name, recipe="clip-tiny", epochs=epochs, batch_size=batch_size,
        lr=3e-3, warmup_steps=2, log_every=1, min_eval_pairs=0, register=False,
    )  # fmt: skip
    marks.update(result.phases)
    history = sorted(configure(settings).get_metric_history(result.run_id, "loss"), key=lambda m: m.step)
    marks["first_step"] = history[0].timestamp / 1000.0
    marks["last_step"] = history[-1].timestamp / 1000.0
    step_times = [(b.timestamp - a.timestamp) / 1000.0 for a, b in zip(history, history[1:], strict=False)]
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    marks["exited"] = time.time()
    return {"marks": marks, "steps": len(history), "step_s_median": statistics.median(step_times or [0.0])}


def phases_of(marks: dict) -> dict[str, float]:
    """Seconds per phase; a phase whose marks are missing (a path that skips it) is 0."""
    out = {label: marks[b] - marks[a] if a in marks and b in marks else 0.0 for label, a, b in PHASES}
    out["to first step, from pretrain()"] = marks["first_step"] - marks["imported"]
    out["to first step, from process start"] = marks["first_step"] - marks["process"]
    out["total, from process start"] = marks["exited"] - marks["process"]
    return {k: round(v, 2) for k, v in out.items()}


def run_child(mode: str, name: str, store: str, pairs: int, epochs: int, batch_size: int) -> dict:
    env = dict(os.environ, VLFORGE_STORAGE=store, VLFORGE_LOCAL_TRAINING="false" if mode == "ray" else "true")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--pairs", str(pairs),
           "--epochs", str(epochs), "--batch-size", str(batch_size)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"the {mode} training failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: dict[str, list[dict]]) -> None:
    modes = list(rows)
    print(f"{'phase (s)':38}" + "".join(f"{m:>12}" for m in modes))
    for label in phases_of(rows[modes[0]][0]["marks"]):
        cells = [statistics.median(phases_of(r["marks"])[label] for r in rows[m]) for m in modes]
        print(f"{label:38}" + "".join(f"{c:12.2f}" for c in cells))
    print(f"{'optimizer steps':38}" + "".join(f"{rows[m][0]['steps']:12d}" for m in modes))
    step = [statistics.median(r["step_s_median"] for r in rows[m]) for m in modes]
    print(f"{'median step':38}" + "".join(f"{s:12.3f}" for s in step))


def main(
    pairs: int = typer.Option(96, help="Synthetic pairs in the dataset (10 % held out)."),
    epochs: int = typer.Option(2, help="Epochs of each training."),
    batch_size: int = typer.Option(16, help="Batch size."),
    modes: str = typer.Option("local,ray", help="Paths to run, alternating: local (in-process) and/or ray."),
    rounds: int = typer.Option(1, help="Trainings per path; the table shows the median."),
    child: str = typer.Option("", hidden=True, help="Run one training named so in this process (internal)."),
) -> None:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if child:
        print(json.dumps(train_once(child, pairs, epochs, batch_size)))
        return
    store = os.path.join(tempfile.mkdtemp(prefix="vlforge-bench-startup-"), "store")
    os.environ["VLFORGE_STORAGE"] = store
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from vlforge.demo.datasets import publish_synthetic_dataset
    from vlforge.settings import get_settings
    from vlforge.tracking import configure

    publish_synthetic_dataset(get_settings(), "startup", n=pairs, seed=0)
    # A warm machine has its MLflow database: its schema is made here, not in the first training (seconds).
    configure(get_settings()).search_experiments(max_results=1)
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    rows: dict[str, list[dict]] = {m: [] for m in chosen}
    for r in range(rounds):
        for mode in chosen:
            rows[mode].append(run_child(mode, f"{mode}-{r}", store, pairs, epochs, batch_size))
    print_table(rows)
    out = {
        "modes": {m: [phases_of(r["marks"]) for r in rows[m]] for m in chosen},
        "steps": {m: rows[m][0]["steps"] for m in chosen},
        "pairs": pairs,
        "epochs": epochs,
        "batch_size": batch_size,
        "recipe": "clip-tiny",
        **machine(),
    }
    write_result("startup.json", out)


if __name__ == "__main__":
    typer.run(main)
