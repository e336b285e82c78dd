"""One settings object, read from ``VLFORGE_*`` environment variables (and ``MLFLOW_TRACKING_URI``).

Read it inside functions with :func:`get_settings` and pass it down explicitly; never at import time.
"""

from __future__ import annotations

import os

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLFORGE_", extra="ignore")

    storage: str = Field("./.vlforge", description="Storage root: a local folder or s3://bucket/prefix.")
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "VLFORGE_MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI; default sqlite:///<storage>/mlflow.db for a local storage root.",
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("VLFORGE_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray cluster address; unset starts Ray locally.",
    )
    local_training: bool = Field(
        True,
        description="Run a one-worker training in the command's own process (Ray Train's local mode) when no Ray "
        "cluster address is set; false: on a Ray Train worker actor, as a multi-worker training.",
    )
    driver_decode_rows: int = Field(
        4096,
        ge=0,
        description="A dataset version of at most this many rows is decoded by the training's driver and handed "
        "to Ray Train workers from memory; a larger one is read and decoded by Ray Data tasks (0: always).",
    )
    user_agent: str = Field(
        "vlforge/0.1 (+https://github.com/vlforge/vlforge; image-text dataset builder)",
        description="User agent sent with every download.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("VLFORGE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, moto); unset uses AWS.",
    )

    @property
    def storage_uri(self) -> str:
        """The storage root as an absolute local path or a remote URI, without a trailing slash."""
        root = self.storage.rstrip("/")
        if _is_remote(root):
            return root
        if root.startswith("file://"):
            root = root[len("file://") :]
        return os.path.abspath(os.path.expanduser(root))

    @property
    def storage_is_remote(self) -> bool:
        return _is_remote(self.storage_uri)

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if self.storage_is_remote:
            # SQLite cannot live on S3: keep the embedded database beside the working directory.
            return f"sqlite:///{os.path.abspath('.vlforge-mlflow.db')}"
        return f"sqlite:///{self.storage_uri}/mlflow.db"

    @property
    def artifact_root(self) -> str:
        """Where new MLflow experiments keep artifacts (never ./mlruns in the working directory)."""
        return f"{self.storage_uri}/mlflow-artifacts"


def get_settings(**overrides) -> Settings:
    """Read settings from the environment; keyword overrides (CLI flags) win. ``None`` values are ignored."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
