"""Log a trained CLIP as an MLflow pyfunc model into its training run, register it, and apply the promotion rule.

The logged model holds the ``save_pretrained`` folder at ``artifacts/model`` (what
:func:`vlforge.registry.resolve_model_dir` loads), the optional LoRA adapter at ``artifacts/adapter``, the
pyfunc wrapper :class:`models.pyfunc.ClipPyfunc` with its signature, and our ``models`` and ``vlforge``
packages as code, so ``mlflow models serve --env-manager local`` and ``mlflow.pyfunc.load_model`` work from
any process.

Promotion rule: the first version of a model becomes ``champion``. A later version becomes ``champion`` only
if its ``mean_recall`` beats the champion's on the same eval data (the champion is re-evaluated on the new
version's eval data when it was evaluated on other data and an ``evaluate_champion`` callable is given);
otherwise it becomes ``challenger``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.evaluate import mlflow_metric_names
from vlforge import storage
from vlforge.errors import ModelNotFoundError
from vlforge.registry import MODEL_ARTIFACT
from vlforge.settings import Settings
from vlforge.tracking import TAG_BASE_MODEL, TAG_DATASET, TAG_DATASET_VERSION, TAG_FLOW_RUN, configure

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ADAPTER_ARTIFACT = "adapter"
TAG_EVAL_DATA = "vlforge.eval_data"
TAG_EVAL_PREFIX = "vlforge.eval."
TAG_MEAN_RECALL = TAG_EVAL_PREFIX + "mean_recall"
TAG_DECISION = "vlforge.promotion"
PRIMARY_METRIC = "mean_recall"
# What the pyfunc needs at serving time; versions pinned to this environment's.
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pydantic-settings",
    "fsspec",
)


@dataclass
class RegisteredModel:
    name: str
    version: str
    uri: str  # models:/NAME/VERSION
    alias: str  # champion or challenger
    promoted: bool  # True when this version became champion


@dataclass(frozen=True)
class Decision:
    alias: str
    reason: str
    champion_recall: float | None = None


def decide(
    new_recall: float,
    champion_recall: float | None,
    *,
    has_champion: bool = True,
) -> Decision:
    """The promotion rule on numbers alone: beat the champion strictly (on the same eval data) to replace it."""
    if not has_champion:
        return Decision(CHAMPION, "first version: no champion yet")
    if champion_recall is None:
        return Decision(CHALLENGER, "champion has no comparable mean_recall on this eval data")
    if new_recall > champion_recall:
        return Decision(
            CHAMPION, f"mean_recall {new_recall:.4f} beats champion's {champion_recall:.4f}", champion_recall
        )
    return Decision(
        CHALLENGER,
        f"mean_recall {new_recall:.4f} does not beat champion's {champion_recall:.4f}",
        champion_recall,
    )


def promote(
    client,
    name: str,
    version: str,
    *,
    mean_recall: float,
    eval_data: str,
    settings: Settings,
    evaluate_champion: Callable | None = None,
) -> Decision:
    """Apply the promotion rule to ``name``/``version`` in the registry and set its alias.

    The champion's recall comes from its version tags when it was evaluated on ``eval_data``; otherwise the
    champion is loaded and evaluated with ``evaluate_champion(bundle) -> metrics`` (without it, the new version
    cannot be compared fairly and becomes challenger).
    """
    champion = _alias_version(client, name, CHAMPION)
    if champion is None or str(champion.version) == str(version):
        decision = decide(mean_recall, None, has_champion=False)
    else:
        champion_recall = _champion_recall(
            client, champion, eval_data=eval_data, settings=settings, evaluate_champion=evaluate_champion
        )
        decision = decide(mean_recall, champion_recall)
    client.set_registered_model_alias(name, decision.alias, str(version))
    client.set_model_version_tag(name, str(version), TAG_DECISION, decision.reason[:500])
    if decision.champion_recall is not None:
        client.set_model_version_tag(
            name, str(version), "vlforge.champion_mean_recall", str(decision.champion_recall)
        )
    log.info("%s version %s -> %s (%s)", name, version, decision.alias, decision.reason)
    return decision


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_recall(client, champion, *, eval_data, settings, evaluate_champion) -> float | None:
    tags = champion.tags or {}
    if tags.get(TAG_EVAL_DATA) == eval_data and TAG_MEAN_RECALL in tags:
        return float(tags[TAG_MEAN_RECALL])
    if evaluate_champion is None:
        return None
    from tasks.common import load_model

    uri = f"models:/{champion.name}/{champion.version}"
    log.info(
        "champion %s was evaluated on %r, not %r: re-evaluating it", uri, tags.get(TAG_EVAL_DATA), eval_data
    )
    recall = float(evaluate_champion(load_model(uri, settings))[PRIMARY_METRIC])
    client.set_model_version_tag(
        champion.name, champion.version, "vlforge.reeval." + _tag_safe(eval_data), str(recall)
    )
    return recall


def _tag_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-/ " else "_" for c in text)[:200]


def pip_requirements() -> list[str]:
    reqs = []
    for dist in _REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _code_paths() -> list[str]:
    import models.clip
    import vlforge.settings

    # models may resolve as a namespace package (no __file__) through the editable install: use a module's path.
    return [os.path.dirname(models.clip.__file__), os.path.dirname(vlforge.settings.__file__)]


def _stage(src: str, parent: str, name: str) -> str:
    """``src`` (local or remote) under ``parent/name`` (hard links when possible), so that MLflow stores it at
    ``artifacts/<name>`` whatever the source folder is called."""
    dst = os.path.join(parent, name)
    if storage.is_remote(src):
        storage.get_dir(src, dst)
        return dst

    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)
    return dst


def _run_tags(client, run_id: str) -> dict[str, str]:
    tags = client.get_run(run_id).data.tags
    return {k: tags[k] for k in (TAG_DATASET, TAG_DATASET_VERSION, TAG_FLOW_RUN) if k in tags}


def register_model(
    model_dir: str,
    *,
    name: str,
    run_id: str,
    eval_metrics: dict[str, float],
    eval_data: str,
    settings: Settings,
    base_model: str | None = None,
    adapter_dir: str | None = None,
    evaluate_champion: Callable | None = None,
) -> RegisteredModel:
    """Log ``model_dir`` (a ``save_pretrained`` folder; merged weights for LoRA) as a pyfunc model into the
    existing run ``run_id``, register it under ``name``, tag the version and apply the promotion rule.

    ``eval_metrics`` must hold ``mean_recall`` measured on ``eval_data`` (a dataset ref or split id);
    ``evaluate_champion(bundle) -> metrics`` re-evaluates the champion when it was measured on other data.
    """
    if PRIMARY_METRIC not in eval_metrics:
        raise ValueError(f"eval_metrics must contain {PRIMARY_METRIC!r}; got {sorted(eval_metrics)}")
    for folder, what in ((model_dir, "model"), (adapter_dir, "adapter")):
        if folder is not None and not (
            os.path.isdir(folder) or (storage.is_remote(folder) and storage.exists(folder))
        ):
            raise ModelNotFoundError(
                f"{what} folder {folder!r} does not exist; save the trained {what} first"
            )
    client = configure(settings)
    with tempfile.TemporaryDirectory(prefix="vlforge-register-") as staging:
        artifacts = {MODEL_ARTIFACT: _stage(model_dir, staging, MODEL_ARTIFACT)}
        if adapter_dir is not None:
            artifacts[ADAPTER_ARTIFACT] = _stage(adapter_dir, staging, ADAPTER_ARTIFACT)
        info = _log_into_run(client, run_id, name=name, artifacts=artifacts)
    version = str(info.registered_model_version)
    tags = {
        TAG_EVAL_DATA: eval_data,
        TAG_BASE_MODEL: base_model or "",
        **_run_tags(client, run_id),
        **{TAG_EVAL_PREFIX + k: str(v) for k, v in mlflow_metric_names(eval_metrics, prefix="").items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    decision = promote(
        client,
        name,
        version,
        mean_recall=float(eval_metrics[PRIMARY_METRIC]),
        eval_data=eval_data,
        settings=settings,
        evaluate_champion=evaluate_champion,
    )
    return RegisteredModel(
        name=name,
        version=version,
        uri=f"models:/{name}/{version}",
        alias=decision.alias,
        promoted=decision.alias == CHAMPION,
    )


def _log_into_run(client, run_id: str, *, name: str, artifacts: dict[str, str]):
    """``mlflow.pyfunc.log_model`` inside run ``run_id``, leaving the run's status as it was."""
    import mlflow

    from models.pyfunc import ClipPyfunc, input_example, model_signature

    def log_model():
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ClipPyfunc(),
            artifacts=artifacts,
            signature=model_signature(),
            input_example=input_example(),
            code_paths=_code_paths(),
            pip_requirements=pip_requirements(),
            registered_model_name=name,
            await_registration_for=60,
        )

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return log_model()
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        info = log_model()
    if status != "FINISHED":  # leaving the context finished the run; its owner finishes it
        client.update_run(run_id, status=status)
    return info


# NO_CACHE: registering twice must create two versions; a callable input cannot be hashed anyway.
register_task = task(name="register", cache_policy=NO_CACHE)(register_model)
