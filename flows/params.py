"""Flow parameters as pydantic models: the Prefect UI renders each as a validated form with these defaults."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.curate.filters import FilterConfig
from tasks.ingest.args import IngestArgs
from tasks.train.args import FinetuneArgs, PretrainArgs, VlmFinetuneArgs, VlmPretrainArgs
from vlforge import defaults


def _refresh_filters() -> FilterConfig:
    # The refresh's score rule by default: DataComp's best top fraction (``vlforge curate`` has none).
    return FilterConfig(top_fraction=defaults.TOP_FRACTION)


# Keys of the first refresh form, still accepted (saved deployment parameters, API callers): the score rule
# moved into ``filters`` and the download settings into ``ingest``.
_RULE_KEYS = ("min_score", "top_fraction")


class RefreshParams(BaseModel):
    """Ingest the URL lists not ingested yet, curate the source, publish a dataset version."""

    source: str = Field("web", description="Name of the source; raw batches land under raw/<source>/.")
    location: str = Field(
        ...,
        description="Where URL lists land: a file, a folder, a glob, or an s3:// prefix (csv/tsv/json/parquet).",
    )
    dataset: str = Field("web", description="Dataset to publish a new version of.")
    scorer: str | None = Field(
        defaults.DEFAULT_MODEL_URI,
        description="CLIP used to score pairs: an MLflow URI, a folder or a Hugging Face id; empty = no CLIP filter.",
    )
    # A default value, not a factory: the Prefect form shows it (the top fraction) as the starting point.
    filters: FilterConfig = Field(
        _refresh_filters(),
        description="Quality filters (size, aspect ratio, captions, dedup, language) and the one CLIP-score rule: "
        f"min_score (LAION: 0.28) or top_fraction (default {defaults.TOP_FRACTION}, DataComp's best); both "
        "empty = no score filter. Without a scorer the score rule is not applied.",
    )
    ingest: IngestArgs = Field(
        default_factory=IngestArgs,
        description="How the URL lists are read and downloaded (columns, shard size, networks, crawl "
        "compliance), as `vlforge ingest`'s options.",
    )
    recaption_model: str | None = Field(
        None,
        description="After publishing, recaption the new version with this VLM (e.g. models:/vlforge-vlm@champion): "
        "a further version with caption_synthetic (docs/recaption.md); empty = no recaption.",
    )

    @model_validator(mode="before")
    @classmethod
    def _earlier_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        moved = {k: data.pop(k) for k in list(data) if k in IngestArgs.model_fields}
        if moved:
            ingest = data.get("ingest")
            ingest = ingest.model_dump() if isinstance(ingest, BaseModel) else dict(ingest or {})
            data["ingest"] = {**ingest, **moved}
        rule = {k: data.pop(k) for k in _RULE_KEYS if k in data}
        if rule:
            data["filters"] = _with_rule(data.get("filters"), rule)
        return data


def _with_rule(filters: Any, rule: dict) -> Any:
    """``filters`` with the score rule of an earlier form's top-level keys, unless ``filters`` sets a rule of its
    own: a rule set in ``filters`` is never replaced."""
    if filters is None:
        data = _refresh_filters().model_dump()
    else:
        data = filters.model_dump() if isinstance(filters, BaseModel) else dict(filters)
        if any(data.get(k) is not None for k in _RULE_KEYS):
            return data
    return {**data, **{k: rule.get(k) for k in _RULE_KEYS}}


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
    vlm_pretraining: VlmPretrainArgs = Field(
        default_factory=VlmPretrainArgs,
        description="VLM stage-1 settings (a VLM recipe, its vision model and adapter); empty settings take the "
        "VLM recipe's values.",
    )
    vlm_finetune: bool = Field(
        False,
        description="Then instruction-tune the VLM with LoRA (stage 2; registers vlforge-vlm-lora); the dataset "
        "needs prompt and response columns.",
    )
    vlm_finetune_dataset: str | None = Field(
        None, description="Dataset of instructions for VLM stage 2; empty = same dataset."
    )
    vlm_finetuning: VlmFinetuneArgs = Field(
        default_factory=VlmFinetuneArgs,
        description="VLM stage-2 settings (recipe vlm, prompt and response columns); empty settings take the VLM "
        "recipe's values.",
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


class DemoParams(BaseModel):
    """The end-to-end demo's sizes and epochs (``vlforge demo``): synthetic pairs served on 127.0.0.1."""

    model_config = ConfigDict(extra="forbid")

    seed_size: int = Field(300, gt=0, description="Clean pairs used to bootstrap the scorer.")
    pool_size: int = Field(600, gt=0, description="Noisy pairs to curate.")
    mismatch_fraction: float = Field(
        0.3, ge=0, le=1, description="Share of deliberately mismatched captions in the pool."
    )
    top_fraction: float = Field(0.6, gt=0, le=1, description="Share of the pool the CLIP filter keeps.")
    eval_size: int = Field(240, gt=0, description="Labelled pairs every CLIP of the line is judged on.")
    domain_size: int = Field(
        400, gt=0, description="Pairs of the fine-tune's new domain (noisy backgrounds)."
    )
    seed_epochs: int = Field(8, gt=0, description="Epochs of the bootstrap scorer on the seed set.")
    # Enough for the curated model to pull ahead of the bootstrap it starts from (BENCHMARKS.md "End to end": 12
    # epochs were +0.067 [+0.008, +0.125] on one build of the dependencies and +0.050 [-0.008, +0.108] on the next).
    epochs: int = Field(20, gt=0, description="Epochs on the curated pool, from the bootstrap model.")
    finetune_epochs: int = Field(3, gt=0, description="Epochs of the LoRA fine-tune on the new domain.")
    vlm: bool = Field(True, description="Then train the VLM on the champion CLIP (stages 1 and 2).")
    instruct_size: int = Field(500, gt=0, description="Instruction pairs of the VLM's stage 2.")
    vlm_epochs: int = Field(10, gt=0, description="Epochs of the VLM's stage 1 (its adapter, on captions).")
    vlm_finetune_epochs: int = Field(
        6, gt=0, description="Epochs of the VLM's stage 2 (LoRA, on instructions)."
    )
