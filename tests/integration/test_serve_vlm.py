"""``mlflow models serve --env-manager local`` on a VLM pyfunc saved as registration logs it answers a REST request (base64 image,
prompt, ``max_new_tokens`` param) with the same greedy text as the model in-process."""

from __future__ import annotations

import base64
import os

import pytest

from tests.integration.servers import mlflow_models_serve, post_json
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_models_serve_answers_with_generated_text(tmp_path):
    from models.clip import build_clip
    from models.vlm import build_vlm, save_vlm
    from models.vlm_eval import generate
    from tasks.register import save_pyfunc

    pairs = make_pairs(4, seed=31, size=32)
    clip = build_clip("clip-tiny", [p.caption for p in pairs])
    vlm = build_vlm("vlm-tiny", clip, [p.caption for p in pairs])
    save_pyfunc(str(tmp_path / "pyfunc"), save_vlm(vlm, str(tmp_path / "vlm")), pyfunc="vlm")
    prompts = ["What colour is the shape?", "Describe the image."]
    expected = generate(vlm, [p.image for p in pairs[:2]], prompts, 3)

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the model's own code_paths must be enough
    with mlflow_models_serve(str(tmp_path / "pyfunc"), tmp_path, env) as base:
        rows = [[base64.b64encode(p.image).decode(), q] for p, q in zip(pairs[:2], prompts, strict=True)]
        answer = post_json(
            base + "/invocations",
            {
                "dataframe_split": {"columns": ["image", "prompt"], "data": rows},
                "params": {"max_new_tokens": 3},
            },
        )["predictions"]
        assert [row["text"] for row in answer] == expected
