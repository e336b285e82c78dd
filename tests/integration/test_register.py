"""Registration into MLflow (SQLite registry under tmp_path), the promotion rule, and the pyfunc contract in a
fresh process through ``models:/vlforge-clip@champion``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tasks.register import CHALLENGER, CHAMPION, decide, register_model
from vlforge.demo.synth import class_prompts, make_pairs
from vlforge.tracking import (
    LORA_MODEL,
    PRETRAINED_MODEL,
    TAG_DATASET,
    TAG_DATASET_VERSION,
    configure,
    ensure_experiment,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-weight CLIP saved with save_pretrained (the contract does not need a trained one)."""
    from models.clip import build_clip

    captions = [p.caption for p in make_pairs(16, seed=5)] + class_prompts()
    return build_clip("clip-tiny", captions, seed=0).save(str(tmp_path_factory.mktemp("clip") / "final"))


@pytest.fixture(scope="module")
def shared_settings(tmp_path_factory):
    """One storage root + MLflow database for the promotion tests (each test registers its own model name):
    creating a fresh MLflow database costs seconds."""
    from vlforge.settings import Settings

    return Settings(storage=str(tmp_path_factory.mktemp("registry") / "store"))


@pytest.fixture
def model_name(request) -> str:
    return "vlforge-clip-" + request.node.name.removeprefix("test_")[:40].replace("_", "-")


def new_run(settings, **tags) -> str:
    """A training run as the pretrain driver creates it (RUNNING, dataset tags)."""
    client = configure(settings)
    exp = ensure_experiment(settings, "pretrain")
    tags = {TAG_DATASET: "synth", TAG_DATASET_VERSION: "20250101T000000-abc", **tags}
    return client.create_run(exp, tags=tags).info.run_id


def register(settings, model_dir, recall, eval_data="synth@holdout", name=PRETRAINED_MODEL, **kwargs):
    return register_model(
        model_dir,
        name=name,
        run_id=new_run(settings),
        eval_metrics={"mean_recall": recall, "i2t_recall@1": recall / 2},
        eval_data=eval_data,
        settings=settings,
        **kwargs,
    )


def alias_of(settings, name: str, alias: str) -> str:
    return str(configure(settings).get_model_version_by_alias(name, alias).version)


def test_decide_is_strict_and_needs_a_comparable_champion():
    assert decide(0.1, None, has_champion=False).alias == CHAMPION
    assert decide(0.6, 0.5).alias == CHAMPION
    assert decide(0.5, 0.5).alias == CHALLENGER
    assert decide(0.4, 0.5).alias == CHALLENGER
    assert decide(0.9, None).alias == CHALLENGER


def test_first_version_becomes_champion_with_tags_and_run_left_running(
    shared_settings, model_dir, model_name
):
    settings = shared_settings
    client = configure(settings)
    run_id = new_run(settings)
    reg = register_model(
        model_dir,
        name=model_name,
        run_id=run_id,
        eval_metrics={"mean_recall": 0.3, "i2t_recall@1": 0.2},
        eval_data="synth@holdout",
        settings=settings,
        base_model="clip-tiny",
    )
    assert (reg.version, reg.alias, reg.promoted) == ("1", CHAMPION, True)
    assert reg.uri == f"models:/{model_name}/1"
    assert alias_of(settings, model_name, CHAMPION) == "1"
    mv = client.get_model_version(model_name, "1")
    assert mv.run_id == run_id
    assert mv.tags["vlforge.eval.mean_recall"] == "0.3"
    assert mv.tags["vlforge.eval.i2t_recall_at_1"] == "0.2"
    assert mv.tags["vlforge.eval_data"] == "synth@holdout"
    assert mv.tags["vlforge.base_model"] == "clip-tiny"
    assert mv.tags[TAG_DATASET] == "synth"
    assert mv.tags[TAG_DATASET_VERSION] == "20250101T000000-abc"
    assert client.get_run(run_id).info.status == "RUNNING"  # the driver, not registration, ends its run


def test_worse_version_becomes_challenger(shared_settings, model_dir, model_name):
    register(shared_settings, model_dir, 0.5, name=model_name)
    reg = register(shared_settings, model_dir, 0.4, name=model_name)
    assert (reg.alias, reg.promoted) == (CHALLENGER, False)
    assert alias_of(shared_settings, model_name, CHAMPION) == "1"
    assert alias_of(shared_settings, model_name, CHALLENGER) == "2"


def test_better_version_takes_champion_from_the_old_one(shared_settings, model_dir, model_name):
    register(shared_settings, model_dir, 0.5, name=model_name)
    reg = register(shared_settings, model_dir, 0.7, name=model_name)
    assert (reg.version, reg.alias, reg.promoted) == ("2", CHAMPION, True)
    assert alias_of(shared_settings, model_name, CHAMPION) == "2"
    old = configure(shared_settings).get_model_version(model_name, "1")
    assert CHAMPION not in old.aliases


def test_champion_is_reevaluated_on_different_eval_data(shared_settings, model_dir, model_name):
    from models.clip import ClipBundle

    settings, name = shared_settings, model_name
    register(settings, model_dir, 0.9, eval_data="synth@old-holdout", name=name)
    seen = []

    def evaluate_champion(bundle):
        seen.append(bundle)
        return {"mean_recall": 0.2}  # on the new eval data the champion scores 0.2

    # 0.5 < 0.9 (the champion's recall on *other* data) but > 0.2 on the same data: promoted.
    reg = register(
        settings,
        model_dir,
        0.5,
        eval_data="synth@new-holdout",
        name=name,
        evaluate_champion=evaluate_champion,
    )
    assert len(seen) == 1 and isinstance(seen[0], ClipBundle)
    assert (reg.alias, reg.promoted) == (CHAMPION, True)
    mv = configure(settings).get_model_version(name, reg.version)
    assert float(mv.tags["vlforge.champion_mean_recall"]) == 0.2
    # without a way to re-evaluate, different eval data is not comparable: challenger
    reg3 = register(settings, model_dir, 0.99, eval_data="synth@third", name=name)
    assert reg3.alias == CHALLENGER


def test_lora_version_keeps_merged_model_and_adapter_artifacts(shared_settings, model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from models.clip import load_clip
    from vlforge.registry import resolve_model_dir

    peft_model = get_peft_model(
        load_clip(model_dir).model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    adapter_dir = str(tmp_path / "checkpoint-adapter")
    peft_model.save_pretrained(adapter_dir)
    reg = register(
        shared_settings,
        model_dir,
        0.4,
        name=LORA_MODEL,
        adapter_dir=adapter_dir,
        base_model="models:/vlforge-clip/1",
    )
    assert reg.alias == CHAMPION
    folder = resolve_model_dir(f"models:/{LORA_MODEL}@champion", shared_settings)
    assert folder.endswith(os.path.join("artifacts", "model"))
    assert os.path.isfile(os.path.join(folder, "config.json"))
    adapter = os.path.join(os.path.dirname(folder), "adapter")
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    mv = configure(shared_settings).get_model_version(LORA_MODEL, reg.version)
    assert mv.tags["vlforge.base_model"] == "models:/vlforge-clip/1"


def test_register_rejects_metrics_without_mean_recall(settings, model_dir):
    with pytest.raises(ValueError, match="mean_recall"):
        register_model(
            model_dir,
            name=PRETRAINED_MODEL,
            run_id="no-run-needed",
            eval_metrics={"i2t_recall@1": 0.1},
            eval_data="x",
            settings=settings,
        )


FRESH_PROCESS = textwrap.dedent(
    """
    import base64, json, sys
    import mlflow, numpy as np, pandas as pd
    from tasks.common import load_model
    from vlforge.demo.synth import make_pairs
    from vlforge.settings import get_settings

    pairs = make_pairs(3, seed=11)
    images = [p.image for p in pairs]
    texts = [p.caption for p in pairs]
    model = mlflow.pyfunc.load_model("models:/vlforge-clip@champion")
    result = {}
    out = model.predict(pd.DataFrame({"image": images}))
    result["images_only"] = sorted(out.columns)
    out = model.predict(pd.DataFrame({"text": texts}))
    result["texts_only"] = sorted(out.columns)
    result["text_norms"] = np.linalg.norm(np.array(out["text_embedding"].tolist()), axis=1).tolist()
    raw = model.predict(pd.DataFrame({"image": images, "text": texts}))
    b64 = model.predict(pd.DataFrame({"image": [base64.b64encode(i).decode() for i in images], "text": texts}))
    result["both"] = sorted(raw.columns)
    result["score_raw"] = raw["score"].tolist()
    result["score_b64"] = b64["score"].tolist()
    # transformers reads the same registered model through vlforge.registry
    bundle = load_model("models:/vlforge-clip@champion", get_settings())
    result["score_bundle"] = bundle.score(images, texts).tolist()
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.slow
def test_champion_pyfunc_contract_in_a_fresh_process(settings, model_dir):
    register(settings, model_dir, 0.3)
    env = {
        **os.environ,
        "VLFORGE_STORAGE": settings.storage_uri,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
    }
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["images_only"] == ["image_embedding"]
    assert result["texts_only"] == ["text_embedding"]
    assert result["both"] == ["image_embedding", "score", "text_embedding"]
    assert result["text_norms"] == pytest.approx([1.0] * 3, abs=1e-5)
    assert result["score_raw"] == pytest.approx(result["score_b64"], abs=1e-6)
    assert result["score_raw"] == pytest.approx(result["score_bundle"], abs=1e-4)
