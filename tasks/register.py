"""Log a trained model (a CLIP, or a VLM with ``pyfunc="vlm"``) as an MLflow pyfunc model into its training run, register it, and apply the promotion rule.

The logged model holds the ``save_pretrained`` folder at ``artifacts/model`` (what
:func:`vlforge.registry.resolve_model_dir` loads), the optional LoRA adapter at ``artifacts/adapter``, the
pyfunc wrapper (:class:`models.pyfunc.ClipPyfunc`, or :class:`models.vlm_pyfunc.VlmPyfunc` for a VLM) with its
signature, logged as code: the wrapper's modules ship under a package name no app uses
(:mod:`models.pyfunc_code`), so ``mlflow models serve`` and ``mlflow.pyfunc.load_model`` work from any process,
including an app with its own ``models``, ``tasks``, ``flows`` or ``vlforge`` modules, which stay as they were.

The promotion rule (``tasks.promotion``): a new version becomes ``champion`` only when it beats the current
champion on the same eval pairs beyond noise (paired bootstrap), and a fine-tune only when it also beats its base
on its domain without forgetting general data; otherwise ``challenger``. The reason and the figures are tags.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.evaluate import Evaluation, mlflow_metric_names
from tasks.promotion import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_GENERAL_MARGIN,
    TAG_EVAL_DATA,
    TAG_HELDOUT_DATA,
    Decision,
    promote,
)
from vlforge import storage
from vlforge.errors import ModelNotFoundError
from vlforge.registry import MODEL_ARTIFACT
from vlforge.settings import Settings
from vlforge.tracking import (
    TAG_BASE_MODEL,
    TAG_DATASET,
    TAG_DATASET_VERSION,
    TAG_FLOW_RUN,
    configure,
    log_pyfunc_model,
    set_version_tags,
)

ADAPTER_ARTIFACT = "adapter"
TAG_EVAL_PREFIX = "vlforge.eval."
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
# The pyfunc wrappers by kind: (module, class, extra requirements). Each module has model_signature() and
# input_example().
PYFUNCS = {
    "clip": ("models.pyfunc", "ClipPyfunc", ()),
    "vlm": ("models.vlm_pyfunc", "VlmPyfunc", ("peft",)),
}


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "RegisteredModel",
    "pyfunc_model_args",
    "register_model",
    "register_task",
    "save_pyfunc",
]


@dataclass
class RegisteredModel:
    name: str
    version: str
    uri: str  # models:/NAME/VERSION
    alias: str  # champion or challenger
    promoted: bool  # True when this version became champion
    decision: Decision  # why, with the comparisons' figures


def pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    reqs = []
    for dist in (*_REQUIREMENTS, *extra):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


@contextlib.contextmanager
def pyfunc_model_args(pyfunc: str = "clip"):
    """The arguments of ``mlflow.pyfunc.log_model``/``save_model`` that make the pyfunc of kind ``pyfunc``:
    the wrapper as code (its modules staged under a unique package), signature, example and requirements.

    MLflow runs the entry file while saving, so the staged package is importable inside the block; afterwards
    this process's ``sys.path`` and modules are as they were (a later load imports the model's own copy)."""
    from models.pyfunc_code import stage_pyfunc_code

    module_name, class_name, extra = PYFUNCS[pyfunc]
    module = importlib.import_module(module_name)
    with tempfile.TemporaryDirectory(prefix="vlforge-pyfunc-code-") as staging:
        code = stage_pyfunc_code(module_name, class_name, staging)
        code_root = os.path.dirname(code.package_dir)
        sys.path.insert(0, code_root)
        try:
            yield {
                "python_model": code.entry_file,
                "code_paths": [code.package_dir],
                "signature": module.model_signature(),
                "input_example": module.input_example(),
                "pip_requirements": pip_requirements(extra),
            }
        finally:
            if code_root in sys.path:
                sys.path.remove(code_root)
            for name in [m for m in sys.modules if m == code.package or m.startswith(code.package + ".")]:
                del sys.modules[name]


def save_pyfunc(path: str, model_dir: str, *, pyfunc: str = "clip", adapter_dir: str | None = None) -> str:
    """Save ``model_dir`` (a ``save_pretrained`` folder) as the pyfunc model registration logs, at ``path``
    on disk (no tracking server): what a consumer loads, for checks and exports."""
    from vlforge.tracking import save_pyfunc_model

    artifacts = {MODEL_ARTIFACT: model_dir}
    if adapter_dir is not None:
        artifacts[ADAPTER_ARTIFACT] = adapter_dir
    with pyfunc_model_args(pyfunc) as args:
        return save_pyfunc_model(path, artifacts, args)


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
    evaluation: Evaluation,
    settings: Settings,
    base_model: str | None = None,
    adapter_dir: str | None = None,
    heldout_data: str | None = None,
    bundle=None,
    fine_tune: bool | None = None,
    general_eval: str | None = None,
    general_margin: float = DEFAULT_GENERAL_MARGIN,
    pyfunc: str = "clip",
    evaluator=None,
    tags: dict[str, str] | None = None,
) -> RegisteredModel:
    """Log ``model_dir`` (a ``save_pretrained`` folder; merged weights for LoRA) as a pyfunc model into the
    existing run ``run_id``, register it under ``name``, tag the version and apply the promotion rule.

    ``evaluation``: the new model on the eval data that decides (``evaluation.eval_data`` names it, so the
    champion and the base are evaluated on the same pairs). ``heldout_data``: the name of its training data's
    held-out split (a later fine-tune's default general set). ``fine_tune`` (default: an adapter is given)
    compares it with ``base_model`` on the domain and on ``general_eval`` (default: the base's held-out data),
    allowing a loss of ``general_margin``; ``bundle`` is the loaded new model, else it is loaded again.
    ``pyfunc``: the wrapper (:data:`PYFUNCS`); ``evaluator``: how the champion and the base are evaluated
    (``tasks.promotion.promote``; default a CLIP's); ``tags``: more version tags (a VLM's library versions).
    """
    if pyfunc not in PYFUNCS:
        raise ValueError(f"unknown pyfunc kind {pyfunc!r}; use one of {sorted(PYFUNCS)}")
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
        links = _ModelLinks(
            metrics=mlflow_metric_names(evaluation.metrics()),
            eval_dataset=_eval_dataset(evaluation.eval_data, settings),
            base_model_id=_logged_model_id(base_model, settings),
        )
        with pyfunc_model_args(pyfunc) as args:
            info = log_pyfunc_model(
                settings, run_id, registered_name=name, artifacts=artifacts, model_args=args,
                metrics=links.metrics, eval_dataset=links.eval_dataset, base_model_id=links.base_model_id,
            )  # fmt: skip
    version = str(info.registered_model_version)
    metrics = mlflow_metric_names(evaluation.metrics(), prefix="")
    tags = {
        TAG_EVAL_DATA: evaluation.eval_data,
        TAG_HELDOUT_DATA: heldout_data or "",
        TAG_BASE_MODEL: base_model or "",
        **_run_tags(client, run_id),
        **{TAG_EVAL_PREFIX + k: f"{v:.6g}" for k, v in metrics.items()},
        **(tags or {}),
    }
    set_version_tags(settings, name, version, tags)
    decision = promote(
        client,
        name,
        version,
        evaluation,
        settings=settings,
        run_id=run_id,
        bundle=bundle,
        base_model=base_model,
        fine_tune=adapter_dir is not None if fine_tune is None else fine_tune,
        general_eval=general_eval,
        general_margin=general_margin,
        evaluator=evaluator,
    )
    _emit_events(name, version, decision, tags)
    return RegisteredModel(
        name=name,
        version=version,
        uri=f"models:/{name}/{version}",
        alias=decision.alias,
        promoted=decision.alias == CHAMPION,
        decision=decision,
    )


def _emit_events(name: str, version: str, decision: Decision, tags: dict[str, str]) -> None:
    """``vlforge.model.registered`` and, when the version became champion, ``vlforge.model.promoted``."""
    from tasks.events import emit_model_promoted, emit_model_registered

    trained_on = {"dataset": tags.get(TAG_DATASET), "dataset_version": tags.get(TAG_DATASET_VERSION)}
    emit_model_registered(name, version, alias=decision.alias, **trained_on)
    if decision.alias == CHAMPION:
        emit_model_promoted(name, version, reason=decision.reason, **trained_on)


@dataclass(frozen=True)
class _ModelLinks:
    """MLflow 3's model-centric links, so its UI shows the graph: the eval metrics on the logged model, against
    the eval data as an MLflow dataset, and the base model as an input of the training run."""

    metrics: dict[str, float]
    eval_dataset: object | None  # mlflow.data Dataset
    base_model_id: str | None


def _eval_dataset(eval_data: str, settings: Settings):
    """The eval data as a metadata-only MLflow dataset (its source: the dataset version's URI), or None."""
    from tasks.train.data import HELDOUT
    from vlforge.datasets import resolve_dataset
    from vlforge.errors import VlforgeError
    from vlforge.tracking import meta_dataset

    try:
        dv = resolve_dataset(settings, eval_data.partition(HELDOUT)[0])
    except VlforgeError:
        return None
    return meta_dataset(dv.uri, eval_data)


def _logged_model_id(uri: str | None, settings: Settings) -> str | None:
    """The MLflow logged-model id of a registered version (``models:/...``), or None."""
    from vlforge.registry import registered_version

    if not uri:
        return None
    try:
        mv = registered_version(uri, settings)
    except ModelNotFoundError:
        return None
    if mv is None:
        return None
    # MLflow 3 registers a logged model from its source models:/m-<id> (the version's model_id stays unset).
    source = str(mv.source or "")
    return mv.model_id or (source[len("models:/") :] if source.startswith("models:/m-") else None)


# NO_CACHE: registering twice must create two versions (and a model bundle is not worth hashing).
register_task = task(name="register", cache_policy=NO_CACHE)(register_model)
