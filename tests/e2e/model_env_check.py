"""A saved vlforge model predicts in a fresh virtualenv built only from its own ``requirements.txt``.

``make model-env-check`` (not part of ``make test``: it installs torch, transformers and mlflow into a new
virtualenv, a few minutes and ~1.5 GB). It saves a tiny conv-stem CLIP and a tiny VLM as registration logs them
(``tasks.register.save_pyfunc``), then, in a virtualenv made with ``python -m venv``:

1. ``pip install -r`` the CLIP's ``requirements.txt``, then loads and predicts with ``python -I`` (no
   PYTHONPATH, no current folder on the path; vlforge must not be importable there) and compares with the
   in-process model;
2. adds the VLM's ``requirements.txt`` (it also needs peft) and does the same for the VLM.

This is what ``mlflow models predict --env-manager virtualenv`` does, without its pyenv/uv prerequisites.
Exit status 0 and a ``PASS`` line when both match; the figures (install and predict seconds) are printed.
Usage: ``python tests/e2e/model_env_check.py [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREDICT = """
import importlib.util, json, sys
assert importlib.util.find_spec("vlforge") is None, "vlforge is importable in the model's environment"
import mlflow.pyfunc, pandas as pd
args = json.load(open(sys.argv[1]))
model = mlflow.pyfunc.load_model(args["model"])
if args["kind"] == "clip":
    out = model.predict(pd.DataFrame({"image": args["images"], "text": args["texts"]}))["score"].tolist()
else:
    frame = pd.DataFrame({"image": args["images"], "prompt": args["texts"]})
    out = model.predict(frame, params={"max_new_tokens": 3})["text"].tolist()
print("RESULT " + json.dumps(out))
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(
            f"FAIL: {' '.join(cmd[:4])} ... exited {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def _save_models(work: Path) -> dict[str, dict]:
    import numpy as np

    from models.clip import build_clip
    from models.vlm import build_vlm, save_vlm
    from models.vlm_eval import generate
    from tasks.register import save_pyfunc
    from vlforge.demo.synth import make_pairs

    pairs = make_pairs(4, seed=5, size=32)
    images = [p.image for p in pairs]
    captions = [p.caption for p in pairs]
    prompts = ["What colour is the shape?", "Describe the image."] * 2
    clip = build_clip("clip-conv-tiny", captions, seed=2)
    vlm = build_vlm("vlm-tiny", build_clip("clip-tiny", captions, seed=1), captions + prompts)
    encoded = [base64.b64encode(i).decode() for i in images]
    return {
        "clip": {
            "model": save_pyfunc(str(work / "clip"), clip.save(str(work / "clip-model"))),
            "images": encoded,
            "texts": captions,
            "expected": np.asarray(clip.score(images, captions)).tolist(),
        },
        "vlm": {
            "model": save_pyfunc(str(work / "vlm"), save_vlm(vlm, str(work / "vlm-model")), pyfunc="vlm"),
            "images": encoded,
            "texts": prompts,
            "expected": generate(vlm, images, prompts, 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="vlforge-model-env-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = _save_models(work)
        venv = work / "venv"
        _run([sys.executable, "-m", "venv", "--clear", str(venv)])
        python = str(venv / "bin" / "python")
        (work / "predict.py").write_text(PREDICT)
        for kind, spec in models.items():
            started = time.monotonic()
            _run([python, "-m", "pip", "install", "-q", "-r", str(Path(spec["model"]) / "requirements.txt")])
            installed = time.monotonic() - started
            (work / f"{kind}.json").write_text(json.dumps({**spec, "kind": kind}))
            done = _run([python, "-I", str(work / "predict.py"), str(work / f"{kind}.json")], cwd=work)
            got = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
            if kind == "clip":
                ok = all(abs(a - b) < 1e-4 for a, b in zip(got, spec["expected"], strict=True))
            else:
                ok = got == spec["expected"]
            if not ok:
                sys.exit(f"FAIL: {kind} predicted {got}, in-process {spec['expected']}")
            predicted = time.monotonic() - started - installed
            print(
                f"{kind}: requirements installed in {installed:.0f} s, loaded and predicted in {predicted:.0f} s"
            )
        print("PASS: both models load and predict from their requirements.txt alone")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
