"""Ingest, export, experiment and demo settings are typed once: the CLI options and the Prefect forms derive from
the same models (defaults, help, ranges), and the Refresh form holds one CLIP-score rule."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from flows.cli import app
from flows.params import DemoParams, RefreshParams
from flows.pipeline import curate_filters, refresh_dataset
from tasks.curate.filters import FilterConfig
from tasks.experiment.curation import CurationExperimentArgs
from tasks.export.args import ExportArgs
from tasks.ingest.args import IngestArgs, IngestArgsError, ingest_args
from vlforge import defaults

COMMANDS = [
    # (command path, model, the command's own parameters that are not settings)
    (("ingest",), IngestArgs, {"url_list", "source", "force", "retry_failed"}),
    (("export",), ExportArgs, {"dataset", "to"}),
    (("demo",), DemoParams, {"as_json"}),
    (("experiment", "curation"), CurationExperimentArgs, set()),
]


def _cli_params(path: tuple[str, ...]) -> dict:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params}


@pytest.mark.parametrize(("path", "model", "own"), COMMANDS, ids=lambda v: v if isinstance(v, str) else None)
def test_cli_options_are_the_models_fields_with_their_defaults_and_help(path, model, own):
    params = _cli_params(path)
    assert set(params) - own == set(model.model_fields)
    for name, info in model.model_fields.items():
        if info.is_required():
            assert params[name].required, name
            continue
        default = info.get_default(call_default_factory=True)
        assert params[name].default == (list(default) if isinstance(default, tuple) else default), name
        assert params[name].help == info.description, name


def test_ingest_keeps_its_flag_names_and_defaults():
    params = _cli_params(("ingest",))
    flags = {opt for p in params.values() for opt in p.opts}
    for flag in ("--url-col", "--caption-col", "--shard-size", "--processes", "--threads", "--distributor",
                 "--allow-private-networks", "--allow-network", "--timeout", "--retries", "--user-agent",
                 "--image-size", "--min-image-size", "--max-image-area", "--force", "--ignore-robots-txt",
                 "--opt-out-list", "--blocklist", "--blocklist-distance", "--max-connections-per-host",
                 "--max-requests-per-host-per-s", "--retry-failed"):  # fmt: skip
        assert flag in flags, flag
    assert params["shard_size"].default == defaults.SHARD_SIZE
    assert params["timeout"].default == defaults.DOWNLOAD_TIMEOUT_S
    assert params["max_connections_per_host"].default == defaults.MAX_CONNECTIONS_PER_HOST


def test_out_of_range_options_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("VLFORGE_STORAGE", str(tmp_path / "store"))
    urls = tmp_path / "list.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    cases = [
        (["ingest", str(urls), "--source", "web", "--timeout", "0"], "--timeout must be > 0 seconds (got 0.0)"),
        (["ingest", str(urls), "--source", "web", "--rate-limit-tries", "0"], "--rate-limit-tries must be at least 1"),
        (["ingest", str(urls), "--source", "web", "--distributor", "dask"], "unknown distributor 'dask'"),
        (["export", "d", "--to", str(tmp_path / "x"), "--shard-size", "0"], "--shard-size must be at least 1 row"),
        (["export", "d", "--to", str(tmp_path / "x"), "--format", "zip"], "unknown export format 'zip'"),
        (["demo", "--top-fraction", "1.5"], "--top-fraction must be in (0, 1] (got 1.5)"),
        (["demo", "--pool-size", "0"], "--pool-size must be > 0 (got 0)"),
    ]  # fmt: skip
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output, result.output
    assert not (tmp_path / "store" / "raw").exists() and not (tmp_path / "x").exists()


def test_python_callers_get_one_clear_error_and_keywords_override_args():
    with pytest.raises(IngestArgsError, match=r"shard_size: .*greater than or equal to 1 \(got 0\)"):
        ingest_args(shard_size=0)
    base = IngestArgs(shard_size=5, allow_private_networks=True)
    assert ingest_args(base, retries=0).model_dump() == {**base.model_dump(), "retries": 0}
    assert ingest_args(allowed_networks=None).allowed_networks == []


def test_refresh_form_derives_its_ingest_group_from_ingest_args():
    schema = refresh_dataset.parameters.model_dump()
    defs = schema["definitions"]
    form = defs["RefreshParams"]["properties"]
    assert form["ingest"]["$ref"].endswith("/IngestArgs")
    assert set(defs["IngestArgs"]["properties"]) == set(IngestArgs.model_fields)
    # One score rule: none at the top level, the refresh's default top fraction shown in the filters' default.
    assert not {"min_score", "top_fraction"} & set(form)
    assert form["filters"]["default"]["top_fraction"] == defaults.TOP_FRACTION
    assert form["filters"]["default"]["min_score"] is None


def test_refresh_keeps_a_score_rule_set_in_filters():
    assert RefreshParams(location="l").filters.top_fraction == defaults.TOP_FRACTION
    for filters in ({"min_score": 0.2}, FilterConfig(min_score=0.2)):
        params = RefreshParams(location="l", filters=filters)
        assert (params.filters.min_score, params.filters.top_fraction) == (0.2, None)
        # An earlier form's top-level rule (its default) does not replace the one set in filters either.
        legacy = RefreshParams(location="l", top_fraction=defaults.TOP_FRACTION, filters=filters)
        assert (legacy.filters.min_score, legacy.filters.top_fraction) == (0.2, None)
    assert RefreshParams(location="l", filters={"top_fraction": 0.5}).filters.top_fraction == 0.5
    with pytest.raises(Exception, match="give either --min-score or --top-fraction"):
        RefreshParams(location="l", filters={"min_score": 0.2, "top_fraction": 0.5})


def test_refresh_accepts_the_first_forms_flat_keys():
    params = RefreshParams(location="l", min_score=0.25, shard_size=7, allow_private_networks=True)
    assert (params.filters.min_score, params.filters.top_fraction) == (0.25, None)
    assert (params.ingest.shard_size, params.ingest.allow_private_networks) == (7, True)
    assert RefreshParams(location="l", top_fraction=None).filters.top_fraction is None


def test_refresh_applies_the_rule_only_with_a_scorer():
    filters = FilterConfig(min_score=0.2, min_caption_chars=3)
    assert curate_filters(filters, "models:/vlforge-clip@champion") == filters
    unscored = curate_filters(filters, None)
    assert (unscored.min_score, unscored.top_fraction, unscored.min_caption_chars) == (None, None, 3)


def test_experiment_and_demo_defaults():
    assert CurationExperimentArgs.model_fields["top_fraction"].default == defaults.TOP_FRACTION
    assert DemoParams().model_dump()["vlm"] is True
    with pytest.raises(Exception, match="extra"):
        DemoParams(pool=3)
