"""Registered pyfuncs load in their consumers' apps: the shipped code lives under a package name no app uses, so a
process whose own ``models``, ``tasks``, ``flows`` and ``vlforge`` modules were imported first loads the CLIP, the
LoRA-merged CLIP and the VLM, predicts what the models predict in-process, and keeps its modules as they were."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from models.pyfunc_code import PACKAGE_PREFIX, import_closure, rewrite_imports
from tasks.register import save_pyfunc
from vlforge.demo.synth import make_pairs

PAIRS = make_pairs(4, seed=11, size=32)
CAPTIONS = [p.caption for p in PAIRS]
PROMPTS = ["What colour is the shape?", "Describe the image."]

CONSUMER = {  # an app with modules of the names our repository uses, one a package
    "models.py": "KIND = 'consumer models'\n",
    "tasks.py": "KIND = 'consumer tasks'\n",
    "flows/__init__.py": "KIND = 'consumer flows'\n",
    "vlforge.py": "KIND = 'consumer vlforge'\n",
}

CONSUMER_MAIN = """
import json, sys
import models, tasks, flows, vlforge
mine = {n: sys.modules[n] for n in ("models", "tasks", "flows", "vlforge")}
path_before = list(sys.path)
import mlflow.pyfunc, pandas as pd
args = json.load(open(sys.argv[1]))
images = args["images"]
out = {}
clip = mlflow.pyfunc.load_model(args["clip"]).predict(pd.DataFrame({"image": images, "text": args["texts"]}))
out["clip"] = clip["score"].tolist()
lora = mlflow.pyfunc.load_model(args["lora"]).predict(pd.DataFrame({"image": images}))
out["lora"] = lora["image_embedding"].tolist()
vlm = mlflow.pyfunc.load_model(args["vlm"]).predict(
    pd.DataFrame({"image": images[:2], "prompt": args["prompts"]}), params={"max_new_tokens": 3}
)
out["vlm"] = vlm["text"].tolist()
out["same_modules"] = all(sys.modules[n] is m for n, m in mine.items())
out["kinds"] = [m.KIND for m in mine.values()]
out["shadowing"] = [
    p for p in sys.path if p not in path_before
    for name in ("models", "tasks", "flows", "vlforge")
    if __import__("os").path.exists(__import__("os").path.join(p, name))
]
out["shipped"] = sorted({m.split(".")[0] for m in sys.modules if m.startswith("vlforge_pyfunc_")})
print(json.dumps(out))
"""


def test_rewrite_imports_moves_only_absolute_imports_of_our_packages():
    source = textwrap.dedent(
        '''
        """from models.clip import x stays in a docstring."""
        from models.clip import (
            load_clip,
        )
        from vlforge.errors import VlforgeError
        from mlflow.models import Model
        from .sibling import y  # relative: unchanged


        def f():
            from models import convstem
            return convstem
        '''
    )
    out = rewrite_imports(source, "pkg")
    assert "from pkg.models.clip import (" in out
    assert "from pkg.vlforge.errors import VlforgeError" in out
    assert "    from pkg.models import convstem" in out
    assert "from mlflow.models import Model" in out and "from .sibling import y" in out
    assert '"""from models.clip import x stays in a docstring."""' in out


def test_closure_holds_what_the_wrappers_reach_and_no_pipeline_code():
    clip = set(import_closure("models.pyfunc"))
    vlm = set(import_closure("models.vlm_pyfunc"))
    assert {"models.clip", "models.convstem", "vlforge.errors"} <= clip  # lazy imports in function bodies too
    assert {"models.vlm", "models.resampler", "models.vlm_eval", "models.pyfunc"} <= vlm
    assert not any(m.split(".")[0] in ("tasks", "flows") for m in clip | vlm)


def test_saving_leaves_this_process_as_it_was(tmp_path):
    from models.clip import build_clip

    bundle = build_clip("clip-tiny", CAPTIONS, seed=1)
    path_before = list(sys.path)
    modules_before = set(sys.modules)  # an earlier test in this process may have loaded a model already
    save_pyfunc(str(tmp_path / "pyfunc"), bundle.save(str(tmp_path / "model")))
    assert sys.path == path_before
    assert not [m for m in set(sys.modules) - modules_before if m.startswith(PACKAGE_PREFIX)]
    shipped = os.listdir(tmp_path / "pyfunc" / "code")
    assert len(shipped) == 1 and shipped[0].startswith(PACKAGE_PREFIX)


def _lora_merged(tmp_path, captions):
    """A CLIP fine-tuned with LoRA (adapter weights perturbed so the merge changes the model): merged folder
    and adapter folder, as a fine-tune registers them."""
    import torch

    from models.clip import build_clip
    from models.lora import LoraArgs, apply_lora, merge_lora

    bundle = build_clip("clip-tiny", captions, seed=3)
    peft_model = apply_lora(bundle.model, LoraArgs())
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter_dir = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter_dir)
    bundle.model = merge_lora(peft_model)
    return bundle, bundle.save(str(tmp_path / "lora-merged")), adapter_dir


@pytest.mark.slow
def test_pyfuncs_load_and_predict_in_an_app_with_its_own_models_tasks_flows_vlforge(tmp_path):
    import torch

    from models.clip import build_clip
    from models.vlm import build_vlm, save_vlm
    from models.vlm_eval import generate

    clip = build_clip(
        "clip-conv-tiny", CAPTIONS, seed=2
    )  # a conv-stem tower: transformers alone cannot load it
    lora, lora_dir, adapter_dir = _lora_merged(tmp_path, CAPTIONS)
    vlm = build_vlm("vlm-tiny", build_clip("clip-tiny", CAPTIONS, seed=1), CAPTIONS + PROMPTS)
    paths = {
        "clip": save_pyfunc(str(tmp_path / "clip"), clip.save(str(tmp_path / "clip-model"))),
        "lora": save_pyfunc(str(tmp_path / "lora"), lora_dir, adapter_dir=adapter_dir),
        "vlm": save_pyfunc(str(tmp_path / "vlm"), save_vlm(vlm, str(tmp_path / "vlm-model")), pyfunc="vlm"),
    }
    images = [p.image for p in PAIRS]
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps(
            {
                **paths,
                "images": [base64.b64encode(i).decode() for i in images],
                "texts": CAPTIONS,
                "prompts": PROMPTS,
            }
        )
    )
    app = tmp_path / "app"
    for rel, text in {**CONSUMER, "main.py": CONSUMER_MAIN}.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH"
    }  # nothing of ours on the path but the model
    proc = subprocess.run(
        [sys.executable, str(app / "main.py"), str(args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "HF_HUB_OFFLINE": "1"},
        cwd=app,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["same_modules"] and out["kinds"] == [
        "consumer models",
        "consumer tasks",
        "consumer flows",
        "consumer vlforge",
    ]
    assert out["shadowing"] == []
    assert len(out["shipped"]) == 2  # the CLIP's code and the VLM's (a larger closure: another hash)
    with torch.no_grad():
        np.testing.assert_allclose(out["clip"], clip.score(images, CAPTIONS), atol=1e-4)
        expected_lora = lora.embed_images(lora.preprocess_images(images)).float().numpy()
    np.testing.assert_allclose(np.array(out["lora"]), expected_lora, atol=1e-5)
    assert out["vlm"] == generate(vlm, images[:2], PROMPTS, 3)
