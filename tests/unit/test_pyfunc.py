"""The pyfunc contract in-process: images only, texts only, both (raw bytes and base64), optional columns."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest

from models.pyfunc import ClipPyfunc, image_bytes, model_signature
from vlforge.demo.synth import make_pairs

PAIRS = make_pairs(4, seed=7)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random CLIP saved as an MLflow pyfunc model on disk, loaded back; plus the bundle itself."""
    import mlflow.pyfunc

    from models.clip import build_clip

    root = tmp_path_factory.mktemp("pyfunc")
    bundle = build_clip("clip-tiny", [p.caption for p in PAIRS], seed=1)
    model_dir = bundle.save(str(root / "model"))
    mlflow.pyfunc.save_model(
        str(root / "pyfunc"),
        python_model=ClipPyfunc(),
        artifacts={"model": model_dir},
        signature=model_signature(),
        pip_requirements=["mlflow"],
    )
    return mlflow.pyfunc.load_model(str(root / "pyfunc")), bundle


def unit_norms(column: pd.Series) -> np.ndarray:
    return np.linalg.norm(np.array(column.tolist()), axis=1)


def test_signature_makes_both_inputs_optional():
    inputs = model_signature().inputs
    assert {c.name: c.required for c in inputs.inputs} == {"image": False, "text": False}


def test_texts_only_give_text_embeddings(saved):
    model, bundle = saved
    out = model.predict(pd.DataFrame({"text": [p.caption for p in PAIRS]}))
    assert list(out.columns) == ["text_embedding"]
    np.testing.assert_allclose(unit_norms(out["text_embedding"]), 1.0, atol=1e-5)
    direct = bundle.embed_texts(**bundle.tokenize([PAIRS[0].caption])).detach().numpy()[0]
    np.testing.assert_allclose(out["text_embedding"][0], direct, atol=1e-5)


def test_images_only_give_image_embeddings(saved):
    model, _ = saved
    out = model.predict(pd.DataFrame({"image": [p.image for p in PAIRS]}))
    assert list(out.columns) == ["image_embedding"]
    assert len(out) == len(PAIRS)
    np.testing.assert_allclose(unit_norms(out["image_embedding"]), 1.0, atol=1e-5)


def test_both_give_cosine_scores_equal_for_raw_and_base64_images(saved):
    model, bundle = saved
    texts = [p.caption for p in PAIRS]
    raw = model.predict(pd.DataFrame({"image": [p.image for p in PAIRS], "text": texts}))
    b64 = model.predict(
        pd.DataFrame({"image": [base64.b64encode(p.image).decode() for p in PAIRS], "text": texts})
    )
    assert set(raw.columns) == {"image_embedding", "text_embedding", "score"}
    np.testing.assert_allclose(raw["score"], b64["score"], atol=1e-6)
    cosine = [float(np.dot(a, b)) for a, b in zip(raw["image_embedding"], raw["text_embedding"], strict=True)]
    np.testing.assert_allclose(raw["score"], cosine, atol=1e-6)
    np.testing.assert_allclose(raw["score"], bundle.score([p.image for p in PAIRS], texts), atol=1e-4)


def test_input_without_known_columns_is_rejected(saved):
    model, _ = saved
    with pytest.raises(Exception, match="image"):
        model.predict(pd.DataFrame({"caption": ["a red circle"]}))


def test_image_bytes_accepts_raw_base64_data_uri_and_published_rows():
    raw = PAIRS[0].image
    b64 = base64.b64encode(raw)
    assert image_bytes(raw) == raw
    assert (
        image_bytes({"bytes": raw, "path": None}) == raw
    )  # a row of a published version, as pandas gives it
    assert image_bytes(bytearray(raw)) == raw
    assert image_bytes(b64.decode()) == raw
    assert image_bytes(b64) == raw
    assert image_bytes("data:image/jpeg;base64," + b64.decode()) == raw
    with pytest.raises(ValueError, match="bytes or base64"):
        image_bytes(12)


def test_saved_with_an_input_example_that_serves_and_without_mlflow_warnings(saved, tmp_path):
    import warnings

    import mlflow.pyfunc
    from mlflow.models import Model

    from models.pyfunc import input_example

    _, bundle = saved
    model_dir = bundle.save(str(tmp_path / "model"))
    path = str(tmp_path / "pyfunc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.pyfunc.save_model(
            path,
            python_model=ClipPyfunc(),
            artifacts={"model": model_dir},
            signature=model_signature(),
            input_example=input_example(),
            pip_requirements=["mlflow"],
        )
    from_mlflow = [str(w.message) for w in caught if "mlflow" in (w.filename or "")]
    assert not from_mlflow, from_mlflow
    example = Model.load(path).load_input_example(path)
    served = mlflow.pyfunc.load_model(path).predict(example)
    assert set(served.columns) == {"image_embedding", "text_embedding", "score"} and len(served) == 1


@pytest.mark.slow
def test_conv_stem_pyfunc_loads_in_a_fresh_process(tmp_path):
    """The conv-stem recipe's model type is not transformers' own: a process that never imported vlforge's model code
    loads the registered pyfunc (through ``load_clip``) and, after ``register_auto_classes``, the plain folder with
    ``AutoModel``, and both embed as the model that was saved."""
    import json
    import os
    import subprocess
    import sys

    import mlflow.pyfunc

    from models.clip import build_clip

    bundle = build_clip("clip-conv-tiny", [p.caption for p in PAIRS], seed=2)
    model_dir = bundle.save(str(tmp_path / "model"))
    pyfunc_dir = str(tmp_path / "pyfunc")
    mlflow.pyfunc.save_model(
        pyfunc_dir,
        python_model=ClipPyfunc(),
        artifacts={"model": model_dir},
        signature=model_signature(),
        pip_requirements=["mlflow"],
    )
    images_file = tmp_path / "images.json"
    images_file.write_text(json.dumps([base64.b64encode(p.image).decode() for p in PAIRS]))
    code = f"""
import json, sys
import mlflow.pyfunc, pandas as pd, torch
assert "models.convstem" not in sys.modules
images = json.load(open({str(images_file)!r}))
out = mlflow.pyfunc.load_model({pyfunc_dir!r}).predict(pd.DataFrame({{"image": images}}))
from transformers import AutoModel
from models.convstem import register_auto_classes
register_auto_classes()
auto = AutoModel.from_pretrained({model_dir!r})
print(json.dumps({{"pyfunc": out["image_embedding"].tolist(), "auto": type(auto).__name__}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["auto"] == "VlforgeClipModel"
    expected = bundle.embed_images(bundle.preprocess_images([p.image for p in PAIRS])).detach().numpy()
    np.testing.assert_allclose(np.array(result["pyfunc"]), expected, atol=1e-5)
