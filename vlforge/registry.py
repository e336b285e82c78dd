"""Model addresses: an MLflow URI (``models:/name@alias``, ``models:/name/3``, ``runs:/id/path``), a local
``save_pretrained`` folder, or a Hugging Face id. :func:`resolve_model_dir` turns any of them into something
``transformers.from_pretrained`` accepts (a local folder, or the hub id unchanged).

Registered vlforge models keep their ``save_pretrained`` folder at ``artifacts/model`` inside the MLflow model
(the pyfunc wrapper's artifact), so both pyfunc and transformers read the same files.
"""

from __future__ import annotations

import hashlib
import os

from vlforge import storage
from vlforge.errors import ModelNotFoundError
from vlforge.settings import Settings

MODEL_ARTIFACT = "model"  # the pyfunc artifact key holding the save_pretrained folder


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _find_pretrained_dir(root: str) -> str | None:
    """The folder under ``root`` that holds a transformers ``config.json`` (prefer artifacts/model)."""
    preferred = os.path.join(root, "artifacts", MODEL_ARTIFACT)
    if os.path.isfile(os.path.join(preferred, "config.json")):
        return preferred
    for dirpath, _dirs, files in os.walk(root):
        if "config.json" in files and any(f.endswith(".safetensors") for f in files):
            return dirpath
    return None


def registered_version(uri: str, settings: Settings):
    """The ``ModelVersion`` a ``models:/`` URI points at (alias or number), or ``None`` for other URIs."""
    if not uri.startswith("models:/"):
        return None
    from vlforge.tracking import configure

    name, version, alias = parse_models_uri(uri)
    client = configure(settings)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version is not None:
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ModelNotFoundError(f"registered model {name!r} has no versions")
        return max(versions, key=lambda v: int(v.version))
    except ModelNotFoundError:
        raise
    except Exception as exc:
        from vlforge.tracking import redact  # the URI, and MLflow's message, may carry the server's password

        raise ModelNotFoundError(
            redact(
                f"cannot resolve {uri!r} in the MLflow registry at {settings.tracking_uri}: {str(exc)[:300]}. "
                "Check the model name and alias (e.g. models:/vlforge-clip@champion) or train one first "
                "with `vlforge pretrain`"
            )
        ) from None


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS``, ``models:/NAME/N`` or ``models:/NAME`` (its newest version) as
    ``(name, version, alias)``; anything else is a :class:`ModelNotFoundError` saying what is wrong."""
    spec = uri[len("models:/") :]
    name, at, alias = spec.partition("@")
    name, slash, version = name.partition("/")
    form = "use models:/NAME@ALIAS, models:/NAME/N or models:/NAME"
    if not name:
        raise ModelNotFoundError(f"{uri!r} names no registered model: {form}")
    if at:
        if slash or not alias or "/" in alias:
            raise ModelNotFoundError(f"{uri!r}: give a version or an alias, not both: {form}")
        return name, None, alias
    if slash and not version.isdigit():
        raise ModelNotFoundError(f"{uri!r}: the version must be a number (e.g. models:/{name}/3): {form}")
    return name, version or None, None


def check_model_uri(uri: str, settings: Settings) -> None:
    """Raise :class:`ModelNotFoundError` now when ``uri`` names no model: a ``models:/`` URI is looked up in the
    registry, a folder checked for a transformers model, a Hugging Face id accepted as it is. Cheap (no download,
    no Ray), so commands call it before starting anything."""
    if uri.startswith("models:/"):
        registered_version(uri, settings)
    elif not is_mlflow_uri(uri):
        resolve_model_dir(uri, settings)


def pin_model_uri(uri: str, settings: Settings) -> str:
    """``uri`` checked now (:func:`check_model_uri`), an alias pinned to the version it names now, so a training
    records (and keeps using) the version it started from."""
    mv = registered_version(uri, settings)
    if mv is None:
        check_model_uri(uri, settings)
        return uri
    return f"models:/{mv.name}/{mv.version}"


def local_model_type(uri: str, settings: Settings) -> str | None:
    """The ``model_type`` in a local model folder's config (None for registry URIs and hub ids)."""
    import json

    if is_mlflow_uri(uri) or not os.path.isdir(uri):
        return None
    with open(os.path.join(resolve_model_dir(uri, settings), "config.json")) as fh:
        return json.load(fh).get("model_type")


def resolve_model_dir(uri: str, settings: Settings) -> str:
    """A local ``save_pretrained`` folder for ``uri``, downloading MLflow artifacts into a local cache."""
    if is_mlflow_uri(uri):
        import mlflow

        from vlforge.tracking import configure

        configure(settings)
        mv = registered_version(uri, settings)
        key = f"{mv.name}-v{mv.version}" if mv is not None else hashlib.sha1(uri.encode()).hexdigest()[:16]
        cache = os.path.join(_local_cache_root(settings), "models", key)
        found = _find_pretrained_dir(cache) if os.path.isdir(cache) else None
        if found:
            return found
        source = f"models:/{mv.name}/{mv.version}" if mv is not None else uri
        tmp = cache + f".tmp-{os.getpid()}"
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
        except Exception as exc:
            raise ModelNotFoundError(
                f"cannot download model artifacts for {uri!r}: {str(exc)[:300]}"
            ) from exc
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process filled the cache first
            storage.remove(tmp)
        found = _find_pretrained_dir(cache)
        if not found:
            raise ModelNotFoundError(
                f"{uri!r} holds no transformers model folder (config.json + safetensors)"
            )
        return found
    if os.path.isdir(uri):
        if not os.path.isfile(os.path.join(uri, "config.json")):
            found = _find_pretrained_dir(uri)
            if found:
                return found
            raise ModelNotFoundError(f"folder {uri!r} holds no transformers model (config.json missing)")
        return uri
    if uri.startswith(("/", ".", "~")) or os.sep in uri.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(
            f"model {uri!r} not found: not an MLflow URI (models:/NAME@ALIAS), an existing folder, "
            "or a Hugging Face id (OWNER/NAME)"
        )
    return uri  # a Hugging Face id: transformers resolves it (hub cache first when offline)


def _local_cache_root(settings: Settings) -> str:
    if settings.storage_is_remote:
        return os.path.abspath(os.path.join(".vlforge-cache"))
    return os.path.join(settings.storage_uri, "cache")
