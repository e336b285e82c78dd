"""Registration into MLflow (SQLite registry under tmp_path), the promotion rule, and the pyfunc contract in a
fresh process through ``models:/vlforge-clip@champion``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tasks.evaluate import Evaluation, evaluate
from tasks.promotion import TAG_DECISION, TAG_PROMOTED_BY
from tasks.register import CHALLENGER, CHAMPION, register_model
from tasks.train.data import read_eval_data
from tests.helpers import publish_synthetic_dataset
from vlforge.demo.synth import class_prompts, make_pairs
from vlforge.tracking import (
    LORA_MODEL,
    PRETRAINED_MODEL,
    TAG_BASE_MODEL,
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
    creating a fresh MLflow database costs seconds. Holds two eval sets: a domain and a general one."""
    from vlforge.settings import Settings

    settings = Settings(storage=str(tmp_path_factory.mktemp("registry") / "store"))
    publish_synthetic_dataset(settings, "domain", n=24, seed=8)
    publish_synthetic_dataset(settings, "general", n=24, seed=9)
    return settings


@pytest.fixture
def model_name(request) -> str:
    return "vlforge-clip-" + request.node.name.removeprefix("test_")[:40].replace("_", "-")


def new_run(settings, **tags) -> str:
    """A training run as the pretrain driver creates it (RUNNING, dataset tags)."""
    client = configure(settings)
    exp = ensure_experiment(settings, "pretrain")
    tags = {TAG_DATASET: "synth", TAG_DATASET_VERSION: "20250101T000000-abc", **tags}
    return client.create_run(exp, tags=tags).info.run_id


def real_evaluation(settings, model_dir, eval_data="domain"):
    """The model in ``model_dir`` evaluated on ``eval_data`` as the driver does."""
    from models.clip import load_clip

    table = read_eval_data(eval_data, settings)
    return evaluate(load_clip(model_dir), table, eval_data, class_prompts=class_prompts())


def perfect_evaluation(eval_data="domain", n=24):
    """Synthetic scores: right on every pair (what a clearly better model would bring)."""
    ones = np.ones(n)
    return Evaluation.of(eval_data, {"zeroshot_accuracy": ones, "mean_recall": ones}, class_prompts())


def register(settings, model_dir, evaluation, name=PRETRAINED_MODEL, run_tags=None, **kwargs):
    return register_model(
        model_dir,
        name=name,
        run_id=new_run(settings, **(run_tags or {})),
        evaluation=evaluation,
        settings=settings,
        **kwargs,
    )


def alias_of(settings, name: str, alias: str) -> str:
    return str(configure(settings).get_model_version_by_alias(name, alias).version)


def test_first_version_becomes_champion_with_tags_and_run_left_running(
    shared_settings, model_dir, model_name
):
    settings = shared_settings
    client = configure(settings)
    run_id = new_run(settings)
    evaluation = real_evaluation(settings, model_dir)
    reg = register_model(
        model_dir,
        name=model_name,
        run_id=run_id,
        evaluation=evaluation,
        settings=settings,
        base_model="clip-tiny",
        heldout_data="general",
    )
    assert (reg.version, reg.alias, reg.promoted) == ("1", CHAMPION, True)
    assert "first version" in reg.decision.reason and reg.decision.comparisons == ()
    assert reg.uri == f"models:/{model_name}/1"
    assert alias_of(settings, model_name, CHAMPION) == "1"
    mv = client.get_model_version(model_name, "1")
    assert mv.run_id == run_id
    recall = evaluation.intervals["mean_recall"]
    assert float(mv.tags["vlforge.eval.mean_recall"]) == pytest.approx(recall.value, abs=1e-5)
    assert float(mv.tags["vlforge.eval.mean_recall_ci_low"]) == pytest.approx(recall.low, abs=1e-5)
    assert "vlforge.eval.i2t_recall_at_1_ci_high" in mv.tags
    assert "vlforge.eval.zeroshot_accuracy" in mv.tags
    assert mv.tags["vlforge.eval_data"] == "domain"
    assert mv.tags["vlforge.heldout_data"] == "general"
    assert mv.tags["vlforge.base_model"] == "clip-tiny"
    assert mv.tags[TAG_DECISION] == reg.decision.reason
    assert mv.tags[TAG_DATASET] == "synth"
    assert mv.tags[TAG_DATASET_VERSION] == "20250101T000000-abc"
    assert client.get_run(run_id).info.status == "RUNNING"  # the driver, not registration, ends its run
    # MLflow 3's model-centric view: the eval metrics on the logged model, against the eval data set
    [output] = client.get_run(run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    linked = {m.key: m for m in logged.metrics}
    assert linked["eval_mean_recall_ci_high"].value == pytest.approx(recall.high)
    assert linked["eval_mean_recall"].dataset_name == "domain"


def test_a_tie_with_the_champion_becomes_challenger(shared_settings, model_dir, model_name):
    # The same model again: the champion is re-evaluated on the same pairs, and the paired difference is 0.
    register(shared_settings, model_dir, real_evaluation(shared_settings, model_dir), name=model_name)
    reg = register(shared_settings, model_dir, real_evaluation(shared_settings, model_dir), name=model_name)
    assert (reg.alias, reg.promoted) == (CHALLENGER, False)
    assert "does not beat champion" in reg.decision.reason
    vs = reg.decision.comparison("vs_champion")
    assert vs.other == f"models:/{model_name}/1" and vs.difference.value == 0.0
    assert alias_of(shared_settings, model_name, CHAMPION) == "1"
    assert alias_of(shared_settings, model_name, CHALLENGER) == "2"
    mv = configure(shared_settings).get_model_version(model_name, "2")
    assert mv.tags["vlforge.vs_champion_zeroshot_accuracy_diff"] == "0"
    assert mv.tags["vlforge.vs_champion.model"] == f"models:/{model_name}/1"


def test_a_clear_win_takes_champion_from_the_old_one(shared_settings, model_dir, model_name):
    champion = real_evaluation(shared_settings, model_dir)
    register(shared_settings, model_dir, champion, name=model_name)
    reg = register(shared_settings, model_dir, perfect_evaluation(), name=model_name)
    assert (reg.version, reg.alias, reg.promoted) == ("2", CHAMPION, True)
    vs = reg.decision.comparison("vs_champion")
    # the champion was evaluated here, on the same pairs: its figure is its own real evaluation
    assert vs.old.value == pytest.approx(champion.intervals["zeroshot_accuracy"].value)
    assert vs.difference.low > 0
    assert alias_of(shared_settings, model_name, CHAMPION) == "2"
    old = configure(shared_settings).get_model_version(model_name, "1")
    assert CHAMPION not in old.aliases
    run = configure(shared_settings).get_run(
        configure(shared_settings).get_model_version(model_name, "2").run_id
    )
    assert run.data.metrics["vs_champion_zeroshot_accuracy_diff_ci_low"] > 0


def test_champion_that_cannot_be_evaluated_on_the_eval_data_keeps_its_place(
    shared_settings, model_dir, model_name
):
    register(shared_settings, model_dir, real_evaluation(shared_settings, model_dir), name=model_name)
    reg = register(shared_settings, model_dir, perfect_evaluation("nosuchdata"), name=model_name)
    assert reg.alias == CHALLENGER and "nosuchdata" in reg.decision.reason
    assert alias_of(shared_settings, model_name, CHAMPION) == "1"


def register_finetune(settings, model_dir, base_uri, domain_evaluation):
    from models.clip import load_clip

    return register(
        settings,
        model_dir,
        domain_evaluation,
        name=LORA_MODEL,
        run_tags={TAG_BASE_MODEL: base_uri},
        base_model=base_uri,
        bundle=load_clip(model_dir),
        fine_tune=True,
    )


def test_finetune_is_compared_with_its_base_on_the_domain_and_the_base_heldout_data(
    shared_settings, model_dir, model_name
):
    settings = shared_settings
    base = register(
        settings, model_dir, real_evaluation(settings, model_dir), model_name, heldout_data="general"
    )
    # no better than its base on the domain (the same weights): not promoted, though there is no champion yet
    same = register_finetune(settings, model_dir, base.uri, real_evaluation(settings, model_dir))
    assert same.alias == CHALLENGER and "does not beat its base on the domain" in same.decision.reason
    general = same.decision.comparison("vs_base_general")
    assert general.eval_data == "general" and general.other == base.uri  # the base's own held-out data
    assert general.difference.value == 0.0
    # right on every domain pair, general data kept: champion
    better = register_finetune(settings, model_dir, base.uri, perfect_evaluation())
    assert better.alias == CHAMPION and "beats its base" in better.decision.reason
    mv = configure(settings).get_model_version(LORA_MODEL, better.version)
    base_run = configure(settings).get_model_version(model_name, base.version).run_id
    [base_output] = configure(settings).get_run(base_run).outputs.model_outputs
    run_inputs = configure(settings).get_run(mv.run_id).inputs.model_inputs
    assert base_output.model_id in [
        m.model_id for m in run_inputs
    ]  # the base, an input of the fine-tune's run
    assert float(mv.tags["vlforge.vs_base_domain_zeroshot_accuracy_diff_ci_low"]) > 0
    assert mv.tags["vlforge.vs_base_general.eval_data"] == "general"
    assert "vlforge.vs_base_general_zeroshot_accuracy_diff_ci_high" in mv.tags


@pytest.mark.slow
def test_finetune_that_wins_the_domain_but_forgets_general_data_stays_challenger(
    shared_settings, model_dir, model_name, tmp_path
):
    """The gate end to end on real models: a base trained on the general kind of data, and a fine-tune that
    brings a clear domain win but has forgotten everything general (random weights). Its general figure is
    measured here, on the base's held-out data, not given to the rule."""
    from tasks.train.inprocess import train_in_process

    settings = shared_settings
    trained = train_in_process("clip-tiny", make_pairs(256, seed=21, prefix="gen"), epochs=6)
    base_dir = trained.save(str(tmp_path / "base"))
    base = register(
        settings, base_dir, real_evaluation(settings, base_dir), model_name, heldout_data="general"
    )
    forgot = register_finetune(settings, model_dir, base.uri, perfect_evaluation())
    assert forgot.alias == CHALLENGER and "forgets general data" in forgot.decision.reason, forgot.decision
    general = forgot.decision.comparison("vs_base_general")
    assert general.eval_data == "general" and general.other == base.uri

    def general_accuracy(folder: str) -> float:
        return real_evaluation(settings, folder, "general").intervals["zeroshot_accuracy"].value

    lost = general_accuracy(model_dir) - general_accuracy(base_dir)
    assert lost < -0.05  # the two models really differ on the general set by more than the margin
    assert general.difference.value == pytest.approx(lost)  # and the rule measured that very loss
    mv = configure(settings).get_model_version(LORA_MODEL, forgot.version)
    assert "forgets general data" in mv.tags[TAG_DECISION]
    assert float(mv.tags["vlforge.vs_base_general_zeroshot_accuracy_diff"]) == pytest.approx(lost, abs=1e-5)


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
        perfect_evaluation(),
        name=LORA_MODEL + "-artifacts",
        adapter_dir=adapter_dir,
        base_model="models:/vlforge-clip/99",
    )
    # an adapter makes it a fine-tune: its base (not registered) cannot be evaluated, so it is not promoted
    assert reg.alias == CHALLENGER and "not compared with its base" in reg.decision.reason
    folder = resolve_model_dir(reg.uri, shared_settings)
    assert folder.endswith(os.path.join("artifacts", "model"))
    assert os.path.isfile(os.path.join(folder, "config.json"))
    adapter = os.path.join(os.path.dirname(folder), "adapter")
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    mv = configure(shared_settings).get_model_version(reg.name, reg.version)
    assert mv.tags["vlforge.base_model"] == "models:/vlforge-clip/99"


def test_vlforge_promote_overrides_the_rule_and_records_who_and_why(shared_settings, model_dir, model_name):
    import getpass

    from typer.testing import CliRunner

    from flows.cli import app

    register(shared_settings, model_dir, real_evaluation(shared_settings, model_dir), name=model_name)
    second = register(
        shared_settings, model_dir, real_evaluation(shared_settings, model_dir), name=model_name
    )
    assert second.alias == CHALLENGER
    env = {"VLFORGE_STORAGE": shared_settings.storage_uri}
    result = CliRunner().invoke(
        app, ["promote", second.uri, "--alias", "champion", "--reason", "serves the new domain"], env=env
    )
    assert result.exit_code == 0, result.output
    assert f"{second.uri} is now champion" in result.output
    assert "serves the new domain" in result.output and "replaces version 1" in result.output
    assert alias_of(shared_settings, model_name, CHAMPION) == "2"
    mv = configure(shared_settings).get_model_version(model_name, "2")
    assert CHALLENGER not in mv.aliases
    assert mv.tags[TAG_PROMOTED_BY] == getpass.getuser()
    assert mv.tags[TAG_DECISION].startswith("set by hand: serves the new domain")
    bad = CliRunner().invoke(app, ["promote", "models:/no-such-model/1"], env=env)
    assert bad.exit_code == 2 and "no-such-model" in bad.output


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
    register(settings, model_dir, perfect_evaluation())
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
