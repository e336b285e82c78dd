"""The training settings are typed once: the CLI options and the Prefect form show their defaults and help."""

from __future__ import annotations

import pytest
import typer.main

from flows.cli import app
from flows.params import TrainParams
from flows.pipeline import train
from models.lora import LoraArgs
from tasks.train.args import OPERATIONAL, FinetuneArgs, PretrainArgs, TrainArgs


def _cli_params(command: str) -> dict:
    click_app = typer.main.get_command(app)
    return {p.name: p for p in click_app.commands[command].params}


def _expected(model) -> dict:
    """{cli param name: (default, help)} for every field of ``model`` (nested models flattened)."""
    out = {}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, LoraArgs):
            for sub, sub_info in LoraArgs.model_fields.items():
                out[f"{name}_{sub}"] = (sub_info.default, sub_info.description)
            continue
        out[name] = (info.get_default(call_default_factory=True), info.description)
    return out


@pytest.mark.parametrize(("command", "model"), [("pretrain", PretrainArgs), ("finetune", FinetuneArgs)])
def test_cli_options_show_the_models_defaults_and_help(command, model):
    params = _cli_params(command)
    expected = _expected(model)
    assert set(expected) <= set(params), sorted(set(expected) - set(params))
    for name, (default, help_text) in expected.items():
        got = params[name].default
        if isinstance(default, tuple):
            default = list(default)
        assert got == default, (name, got, default)
        assert params[name].help == help_text, name
    # The only CLI option that is not a setting is the dataset itself.
    assert set(params) - set(expected) == {"dataset"}


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref") or (node.get("allOf") or [{}])[0].get("$ref")
    return schema["definitions"][ref.split("/")[-1]] if ref else node


@pytest.mark.parametrize(("group", "model"), [("pretraining", PretrainArgs), ("finetuning", FinetuneArgs)])
def test_prefect_form_shows_the_models_defaults_and_help(group, model):
    schema = train.parameters.model_dump()
    form = _resolve(schema, _resolve(schema, schema["properties"]["params"])["properties"][group])
    for name, info in model.model_fields.items():
        field = form["properties"][name]
        if name == "lora":
            lora = _resolve(schema, field)["properties"]
            assert {k: v.get("default") for k, v in lora.items()} == {
                k: list(v) if isinstance(v, tuple) else v for k, v in LoraArgs().model_dump().items()
            }
            continue
        assert field.get("default") == info.default, name
        assert field.get("description") == info.description, name


def test_recipes_set_their_own_defaults_for_shared_settings():
    assert (PretrainArgs().epochs, PretrainArgs().lr) == (TrainArgs().epochs, TrainArgs().lr)
    assert (FinetuneArgs().epochs, FinetuneArgs().lr, FinetuneArgs().warmup_steps) == (5, 5e-4, 5)
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
