"""Flow parameters as pydantic models: the Prefect UI renders each as a validated form with these defaults."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.curate.filters import FilterConfig, check_score_rule
from tasks.train.args import FinetuneArgs, PretrainArgs
from vlforge import defaults
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
        defaults.DEFAULT_MODEL_URI,
        description="CLIP used to score pairs: an MLflow URI, a folder or a Hugging Face id; empty = no CLIP filter.",
    )
    min_score: float | None = Field(
        None, description="Keep pairs whose CLIP score is at least this (LAION: 0.28)."
    )
    top_fraction: float | None = Field(
        defaults.TOP_FRACTION,
        gt=0,
        le=1,
        description="Keep this top share of the pool by CLIP score (DataComp's best: 0.3).",
    )
    filters: FilterConfig = Field(
        default_factory=FilterConfig,
        description="Quality filters (size, aspect ratio, captions, dedup, language).",
    )
    shard_size: int = Field(defaults.SHARD_SIZE, gt=0, description="Rows per raw shard.")
    allow_private_networks: bool = Field(
        False, description="Allow URLs on private/loopback hosts (demo, tests)."
    )
    allowed_networks: list[str] = Field(
        [],
        description="Networks (CIDR, e.g. 10.1.2.0/24) downloads may reach as if public, such as an internal "
        "mirror; every other private address stays refused, on every redirect and connection.",
    )
    opt_out_lists: list[str] = Field(
        [],
        description="Files (local or s3://) of domains or URL prefixes whose owners opted out, one a line: "
        "never requested.",
    )
    ignore_robots_txt: bool = Field(
        False, description="Do not read or obey robots.txt (recorded in the ingest run and the dataset card)."
    )
    blocklist: str | None = Field(
        None, description="File of PDQ hashes (64 hex a line): matching images are never stored."
    )
    blocklist_distance: int = Field(
        defaults.BLOCKLIST_DISTANCE, ge=0, le=256, description="PDQ Hamming distance that counts as a match."
    )
    max_connections_per_host: int = Field(
        defaults.MAX_CONNECTIONS_PER_HOST,
        gt=0,
        description="Requests in flight to one host, over all workers.",
    )
    max_requests_per_host_per_s: float = Field(
        defaults.MAX_REQUESTS_PER_HOST_PER_S,
        gt=0,
        description="Requests a second to one host, over all workers.",
    )
    recaption_model: str | None = Field(
        None,
        description="After publishing, recaption the new version with this VLM (e.g. models:/vlforge-vlm@champion): "
        "a further version with caption_synthetic (docs/recaption.md); empty = no recaption.",
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
        # Raises when both are set: a threshold needs top_fraction cleared (the form shows the message).
        check_score_rule(self.min_score, self.top_fraction)
        return self


# Flat keys of the first train form, still accepted (saved deployment parameters, API callers):
# key -> (group, field). A key that names both stages sets both.
_FLAT_TRAIN_KEYS = {
    "epochs": (("pretraining", "epochs"),),
    "recipe": (("pretraining", "recipe"),),
    "init": (("pretraining", "init"),),
    "learning_rate": (("pretraining", "lr"),),
    "batch_size": (("pretraining", "batch_size"), ("finetuning", "batch_size")),
    "num_workers": (("pretraining", "num_workers"), ("finetuning", "num_workers")),
    "use_gpu": (("pretraining", "use_gpu"), ("finetuning", "use_gpu")),
    "finetune_epochs": (("finetuning", "epochs"),),
    "finetune_learning_rate": (("finetuning", "lr"),),
    "base_model": (("finetuning", "base"),),
    "lora": (("finetuning", "lora"),),
}


def _vlm_pretraining() -> PretrainArgs:
    return PretrainArgs(recipe="vlm-tiny")


def _vlm_finetuning() -> FinetuneArgs:
    return FinetuneArgs(recipe=defaults.VLM_FINETUNE_RECIPE)


class TrainParams(BaseModel):
    """Pretrain CLIP contrastively on a dataset version, then fine-tune it with LoRA; optionally train a VLM
    on the new CLIP's vision tower (stage 1 on the captions, stage 2 on instructions)."""

    dataset: str = Field(..., description="Dataset to train on: NAME (newest version) or NAME@VERSION.")
    pretrain: bool = Field(True, description="Run the pretraining step.")
    pretraining: PretrainArgs = Field(default_factory=PretrainArgs, description="Pretraining settings.")
    finetune: bool = Field(True, description="Fine-tune with LoRA after pretraining.")
    finetune_dataset: str | None = Field(
        None, description="Dataset for the LoRA fine-tune; empty = same dataset."
    )
    finetuning: FinetuneArgs = Field(default_factory=FinetuneArgs, description="LoRA fine-tuning settings.")
    vlm_pretrain: bool = Field(
        False, description="Then train a VLM's adapter on the captions (stage 1; registers vlforge-vlm)."
    )
    vlm_pretraining: PretrainArgs = Field(
        default_factory=_vlm_pretraining,
        description="VLM stage-1 settings (a VLM recipe, its vision model and adapter).",
    )
    vlm_finetune: bool = Field(
        False,
        description="Then instruction-tune the VLM with LoRA (stage 2; registers vlforge-vlm-lora); the dataset "
        "needs prompt and response columns.",
    )
    vlm_finetune_dataset: str | None = Field(
        None, description="Dataset of instructions for VLM stage 2; empty = same dataset."
    )
    vlm_finetuning: FinetuneArgs = Field(
        default_factory=_vlm_finetuning,
        description="VLM stage-2 settings (recipe vlm, prompt and response columns).",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data):
        if not isinstance(data, dict) or not set(data) & set(_FLAT_TRAIN_KEYS):
            return data
        data = dict(data)
        for key in [k for k in data if k in _FLAT_TRAIN_KEYS]:
            value = data.pop(key)
            if value is None and key == "base_model":
                continue
            for group, name in _FLAT_TRAIN_KEYS[key]:
                target = data.get(group)
                target = target.model_dump() if isinstance(target, BaseModel) else dict(target or {})
                target[name] = value
                data[group] = target
        return data


class PipelineParams(BaseModel):
    """Refresh a dataset, then train on it."""

    refresh: RefreshParams
    train: TrainParams | None = Field(
        None, description="Training settings; empty = defaults on the refreshed dataset."
    )
