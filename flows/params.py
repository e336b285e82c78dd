"""Flow parameters as pydantic models: the Prefect UI renders each as a validated form with these defaults."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from models.recipes import DEFAULT_RECIPE
from tasks.curate.filters import FilterConfig
from vlforge.netguard import parse_network


class RefreshParams(BaseModel):
    """Ingest the URL lists not ingested yet, curate the source, publish a dataset version."""

    source: str = Field("web", description="Name of the source; raw batches land under raw/<source>/.")
    location: str = Field(
        ...,
        description="Where URL lists land: a file, a folder, a glob, or an s3:// prefix (csv/tsv/json/parquet).",
    )
    dataset: str = Field("web", description="Dataset to publish a new version of.")
    url_col: str = "url"
    caption_col: str = "caption"
    scorer: str | None = Field(
        "models:/vlforge-clip@champion",
        description="CLIP used to score pairs: an MLflow URI, a folder or a Hugging Face id; empty = no CLIP filter.",
    )
    min_score: float | None = Field(
        None, description="Keep pairs whose CLIP score is at least this (LAION: 0.28)."
    )
    top_fraction: float | None = Field(
        0.3, gt=0, le=1, description="Keep this top share of the pool by CLIP score (DataComp's best: 0.3)."
    )
    filters: FilterConfig = Field(
        default_factory=FilterConfig,
        description="Quality filters (size, aspect ratio, captions, dedup, language).",
    )
    shard_size: int = Field(10_000, gt=0, description="Rows per raw shard.")
    allow_private_networks: bool = Field(
        False, description="Allow URLs on private/loopback hosts (demo, tests)."
    )
    allowed_networks: list[str] = Field(
        [],
        description="Networks (CIDR, e.g. 10.1.2.0/24) downloads may reach as if public, such as an internal "
        "mirror; every other private address stays refused, on every redirect and connection.",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks_are_cidrs(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                parse_network(network)
            except Exception as exc:  # VlforgeError: the form shows its message
                raise ValueError(str(exc)) from None
        return networks

    @model_validator(mode="after")
    def _one_score_rule(self):
        if self.min_score is not None and self.top_fraction is not None:
            # An explicit threshold wins over the default top fraction.
            self.top_fraction = None
        return self


class LoraParams(BaseModel):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling (alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(["q_proj", "v_proj"], description="Attention projections that get adapters.")


class TrainParams(BaseModel):
    """Pretrain CLIP contrastively on a dataset version, then fine-tune it with LoRA."""

    dataset: str = Field(..., description="Dataset to train on: NAME (newest version) or NAME@VERSION.")
    epochs: int = Field(10, gt=0, description="Pretraining epochs.")
    recipe: str = Field(
        DEFAULT_RECIPE, description="Model recipe for training from scratch (models/configs/*.json)."
    )
    init: str | None = Field(
        None, description="Start from this model (MLflow URI, folder, HF id) instead of scratch."
    )
    batch_size: int = Field(32, gt=1, description="Per-worker batch size.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (cosine schedule).")
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    use_gpu: bool | None = Field(None, description="Train on GPUs; empty = use them if the cluster has any.")
    finetune: bool = Field(True, description="Fine-tune with LoRA after pretraining.")
    finetune_dataset: str | None = Field(
        None, description="Dataset for the LoRA fine-tune; empty = same dataset."
    )
    finetune_epochs: int = Field(5, gt=0)
    finetune_learning_rate: float = Field(2e-3, gt=0)
    base_model: str | None = Field(
        None,
        description="Model the LoRA fine-tune starts from; empty = the model just pretrained "
        "(or models:/vlforge-clip@champion when pretraining is skipped).",
    )
    pretrain: bool = Field(True, description="Run the pretraining step.")
    lora: LoraParams = Field(default_factory=LoraParams)


class PipelineParams(BaseModel):
    """Refresh a dataset, then train on it."""

    refresh: RefreshParams
    train: TrainParams | None = Field(
        None, description="Training settings; empty = defaults on the refreshed dataset."
    )
