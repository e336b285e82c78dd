"""The training settings are typed once: the CLI options and the Prefect form show their defaults and help."""

from __future__ import annotations

import pytest
import typer.main
from pydantic import BaseModel
from typer.testing import CliRunner

from flows.cli import app
from flows.params import TrainParams
from flows.pipeline import train
from tasks.train.args import (
    OPERATIONAL,
    FinetuneArgs,
    PretrainArgs,
    TrainArgs,
    VlmFinetuneArgs,
    VlmPretrainArgs,
)


def _cli_params(command: str) -> dict:
    click_app = typer.main.get_command(app)
    return {p.name: p for p in click_app.commands[command].params}


def _expected(model) -> dict:
    """{cli param name: (default, help)} for every field of ``model`` (nested models flattened)."""
    out = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            for sub, sub_info in kind.model_fields.items():
                out[f"{name}_{sub}"] = (sub_info.default, sub_info.description)
            continue
        out[name] = (info.get_default(call_default_factory=True), info.description)
    return out


def _shown(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


STAGES = [("pretrain", (PretrainArgs, VlmPretrainArgs)), ("finetune", (FinetuneArgs, VlmFinetuneArgs))]


@pytest.mark.parametrize(("command", "models"), STAGES)
def test_cli_options_show_each_familys_defaults_and_help(command, models):
    params = _cli_params(command)
    clip, vlm = (_expected(m) for m in models)
    assert set(params) - {"dataset"} == set(clip) | set(vlm)
    for name in set(clip) | set(vlm):
        param = params[name]
        if name == "recipe":  # the name picks the family: its help lists every family's recipes
            assert param.default == clip[name][0] and "vlm-tiny" in param.help
            continue
        if name in clip and name in vlm and clip[name][0] == vlm[name][0]:
            default = clip[name][0]
            assert param.default == (list(default) if isinstance(default, tuple) else default), name
            assert param.help == clip[name][1], name
            continue
        # Defaults that differ, or a setting of one family: no CLI default, and the help names each family's.
        assert param.default is None, name
        assert (clip.get(name) or vlm[name])[1].split(";")[0].rstrip(".") in param.help, name
        if name in clip and clip[name][0] is not None:
            assert _shown(clip[name][0]) in param.help, (name, param.help)
        if name in vlm and vlm[name][0] is None and name in models[1].FROM_RECIPE:
            assert "the recipe's (" in param.help and "vlm-tiny " in param.help, (name, param.help)
        elif name in vlm and vlm[name][0] is not None:
            assert _shown(vlm[name][0]) in param.help, (name, param.help)


def test_help_shows_each_familys_own_defaults():
    runner = CliRunner()
    pretrain = " ".join(runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "400"}).output.split())
    # CLIP's own value, and the VLM recipe's stage-1 values (models/configs/vlm/vlm-tiny.json): lr 3e-3, 32, 10,
    # 30 epochs (the LLaVA recipe names none: the CLIP family's 10).
    assert "Default: CLIP: 0.0005; VLM: the recipe's (vlm-qwen2.5-0.5b 0.001, vlm-tiny 0.003)" in pretrain
    assert "Default: CLIP: 10; VLM: the recipe's (vlm-qwen2.5-0.5b 10, vlm-tiny 30)" in pretrain
    assert "Default: CLIP: 8; VLM: the recipe's (vlm-qwen2.5-0.5b 32, vlm-tiny 32)" in pretrain
    assert "Default: CLIP: 80; VLM: the recipe's (vlm-qwen2.5-0.5b 10, vlm-tiny 10)" in pretrain
    finetune = " ".join(runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "Default: CLIP: 5e-05; VLM: the recipe's (vlm-qwen2.5-0.5b 0.0002, vlm-tiny 0.003)" in finetune
    assert "Default: CLIP: models:/vlforge-clip@champion; VLM: models:/vlforge-vlm@champion" in finetune
    assert "LoRA rank. Default: CLIP: 8; VLM: the recipe's (vlm-qwen2.5-0.5b 16, vlm-tiny 8)" in finetune


def _parsed(command: str, argv: list[str]):
    """The settings the command builds from ``argv`` (Click's parse, then the command's own collection)."""
    from flows.train_options import collect_training

    ctx = typer.main.get_command(app).commands[command].make_context(command, ["--dataset", "d", *argv])
    return collect_training(command, {k: v for k, v in ctx.params.items() if k != "dataset"})


def test_an_explicit_cli_value_equal_to_the_clip_default_is_kept_for_a_vlm_recipe():
    clip = PretrainArgs()
    args = _parsed(
        "pretrain", ["--recipe", "vlm-tiny", "--lr", str(clip.lr), "--batch-size", str(clip.batch_size)]
    )
    assert isinstance(args, VlmPretrainArgs) and (args.lr, args.batch_size) == (clip.lr, clip.batch_size)
    stage1 = args.resolved({"learning_rate": 1e-3, "batch_size": 32, "warmup_steps": 10})
    assert (stage1.lr, stage1.batch_size, stage1.warmup_steps) == (clip.lr, clip.batch_size, 10)
    # Epochs: given equal to CLIP's 10, kept; left out, the recipe's stage-1 epochs.
    given = _parsed("pretrain", ["--recipe", "vlm-tiny", "--epochs", str(clip.epochs)])
    assert given.resolved({"epochs": 30}).epochs == clip.epochs
    assert _parsed("pretrain", ["--recipe", "vlm-tiny"]).resolved({"epochs": 30}).epochs == 30
    assert _parsed("pretrain", []).epochs == clip.epochs
    lora = FinetuneArgs()
    args = _parsed("finetune", ["--recipe", "vlm", "--lr", str(lora.lr), "--lora-r", str(lora.lora.r)])
    stage2 = args.resolved({"learning_rate": 3e-3, "lora": {"r": 16}})
    assert (stage2.lr, stage2.lora.r) == (lora.lr, lora.lora.r)
    # Left out: the chosen family's defaults, not the CLIP ones.
    left_out = _parsed("finetune", ["--recipe", "vlm"])
    assert (left_out.lr, left_out.base, left_out.lora.r) == (None, "models:/vlforge-vlm@champion", None)
    assert (
        _parsed("finetune", []).base == "models:/vlforge-clip@champion"
        and _parsed("pretrain", []).lr == clip.lr
    )


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref") or (node.get("allOf") or [{}])[0].get("$ref")
    return schema["definitions"][ref.split("/")[-1]] if ref else node


@pytest.mark.parametrize(
    ("group", "model"),
    [
        ("pretraining", PretrainArgs),
        ("finetuning", FinetuneArgs),
        ("vlm_pretraining", VlmPretrainArgs),
        ("vlm_finetuning", VlmFinetuneArgs),
    ],
)
def test_prefect_form_shows_the_models_defaults_and_help(group, model):
    schema = train.parameters.model_dump()
    form = _resolve(schema, _resolve(schema, schema["properties"]["params"])["properties"][group])
    for name, info in model.model_fields.items():
        field = form["properties"][name]
        if name == "lora":
            lora = _resolve(schema, field)["properties"]
            assert {k: v.get("default") for k, v in lora.items()} == {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in info.default_factory().model_dump().items()
            }
            continue
        assert field.get("default") == info.default, name
        assert field.get("description") == info.description, name


def test_recipes_set_their_own_defaults_for_shared_settings():
    assert (PretrainArgs().epochs, PretrainArgs().lr) == (TrainArgs().epochs, TrainArgs().lr)
    assert (FinetuneArgs().epochs, FinetuneArgs().lr, FinetuneArgs().warmup_steps) == (5, 5e-5, 5)
    # The help text of a shared setting is the same in both recipes.
    assert PretrainArgs.model_fields["lr"].description == FinetuneArgs.model_fields["lr"].description


def test_build_takes_flat_keywords_and_refuses_unknown_ones():
    args = FinetuneArgs.build(epochs=2, lora_r=4, register=False)
    assert (args.epochs, args.lora.r, args.lora.alpha, args.register_model) == (2, 4, 16, False)
    with pytest.raises(Exception, match="epoch"):
        PretrainArgs.build(epoch=3)
    with pytest.raises(TypeError, match="LoRA"):
        PretrainArgs.build(lora_r=4)


def test_tracked_settings_cover_every_setting_but_the_operational_ones():
    tracked = FinetuneArgs().tracked()
    for name in FinetuneArgs.model_fields:
        if name in ("name", "lora", *OPERATIONAL):
            assert name not in tracked
        else:
            assert name in tracked, name
    # What a fine-tune's resume check used to miss.
    assert {"warmup_steps", "grad_accum", "eval_dataset", "lora_r", "lora_targets"} <= set(tracked)


def test_the_first_forms_flat_keys_still_work():
    params = TrainParams(dataset="d", learning_rate=1e-3, finetune_epochs=1, batch_size=8, lora={"r": 4})
    assert (params.pretraining.lr, params.finetuning.epochs) == (1e-3, 1)
    assert params.pretraining.batch_size == params.finetuning.batch_size == 8
    assert params.finetuning.lora.r == 4


@pytest.mark.parametrize(
    ("args", "changed", "field"),
    [
        (FinetuneArgs(), {"warmup_steps": 2}, "warmup_steps"),
        (FinetuneArgs(), {"grad_accum": 2}, "grad_accum"),
        (FinetuneArgs(), {"lora_r": 4}, "lora_r"),
        (PretrainArgs(), {"lr": 1e-3}, "lr"),
    ],
)
def test_resuming_a_training_with_a_changed_setting_is_refused(settings, args, changed, field):
    from tasks.train.driver import open_training
    from tests.helpers import publish_synthetic_dataset
    from vlforge.errors import VlforgeError

    dv, _ = publish_synthetic_dataset(settings, "resume", n=4)
    first = open_training(settings, "finetune", "resume-me", dv, {}, args.tracked())
    # The same settings (and an operational one changed) resume the same run.
    again = open_training(
        settings, "finetune", "resume-me", dv, {}, type(args).build(args, log_every=1).tracked()
    )
    assert again.resumed and again.run_id == first.run_id
    with pytest.raises(VlforgeError, match=field):
        open_training(settings, "finetune", "resume-me", dv, {}, type(args).build(args, **changed).tracked())
