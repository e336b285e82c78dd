"""The whole pipeline, as `vlforge demo` runs it, on a small synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlforge.demo.synth import make_pairs

pytestmark = pytest.mark.slow


def test_demo_filters_mismatches_and_registers_a_lora_champion(settings, ray_local, tmp_path):
    import mlflow

    from flows.demo import demo
    from vlforge import tracking

    summary = demo(seed_size=200, pool_size=200, mismatch_fraction=0.3, top_fraction=0.6)

    # Most deliberately mismatched pairs are removed, most matched pairs kept.
    assert summary["mismatched_removed"] > 0.6, summary
    assert summary["matched_kept"] > 0.6, summary
    assert summary["models"]["fine-tuned champion"] == "models:/vlforge-clip-lora@champion"

    # MLflow shows the curated dataset version as an input of the training runs.
    tracking.configure(settings)
    for stage in ("pretrain", "finetune"):
        run = mlflow.get_run(summary["runs"][stage])
        names = [d.dataset.name for d in run.inputs.dataset_inputs]
        assert summary["dataset_version"] in names, (stage, names)
        assert run.data.tags[tracking.TAG_DATASET_VERSION] == summary["dataset_version"].split("@", 1)[1]

    # Lineage: back from the LoRA champion to the URL list that fed it, forward from the dataset to its models.
    from vlforge.lineage import models_trained_on, walk_back

    back = walk_back("models:/vlforge-clip-lora@champion", settings)
    assert back.dataset == summary["dataset_version"]
    assert any(u.endswith("pool.csv") for u in back.url_lists), back
    assert back.base is not None and back.base.model.startswith("models:/vlforge-clip/")
    forward = models_trained_on(summary["dataset_version"], settings)
    assert back.model in forward and any(u.startswith("models:/vlforge-clip/") for u in forward), forward

    # In a new process, the registered LoRA model loads from the registry and ranks matched above mismatched.
    pairs = make_pairs(24, 0.5, seed=77)
    probe = tmp_path / "probe.json"
    probe.write_text(
        json.dumps([{"image": p.image.hex(), "text": p.caption, "matched": p.matched} for p in pairs])
    )
    code = f"""
import json, mlflow, pandas as pd
rows = json.load(open({str(probe)!r}))
model = mlflow.pyfunc.load_model("models:/vlforge-clip-lora@champion")
out = model.predict(pd.DataFrame({{"image": [bytes.fromhex(r["image"]) for r in rows], "text": [r["text"] for r in rows]}}))
good = [s for s, r in zip(out["score"], rows) if r["matched"]]
bad = [s for s, r in zip(out["score"], rows) if not r["matched"]]
print(json.dumps({{"good": sum(good) / len(good), "bad": sum(bad) / len(bad)}}))
"""
    env = dict(os.environ, MLFLOW_TRACKING_URI=settings.tracking_uri)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["good"] > scores["bad"] + 0.05, scores
