"""peft LoRA on CLIP: adapters on the attention projections, trainable projection heads, merge for serving.

The fine-tuned model is registered merged (a plain ``CLIPModel`` folder transformers loads directly) and
the adapter folder is kept beside it, so either form can be consumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the settings are read where torch is not needed (the CLI's options, the forms)
    import torch

DEFAULT_TARGETS = ("q_proj", "v_proj")
# Small heads that map each tower into the shared space: cheap to train fully and they adapt the geometry.
PROJECTION_MODULES = ("visual_projection", "text_projection")


class LoraArgs(BaseModel):
    """LoRA settings of a fine-tune (peft ``LoraConfig``); the CLI's ``--lora-*`` options and the Prefect form's
    ``lora`` group are derived from these fields."""

    model_config = ConfigDict(frozen=True)

    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling (alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    targets: tuple[str, ...] = Field(
        DEFAULT_TARGETS, description="Modules that get adapters (name suffixes)."
    )
    train_projections: bool = Field(
        True, description="Also train the projection heads in full (peft modules_to_save)."
    )

    @classmethod
    def from_dict(cls, d: dict) -> LoraArgs:
        return cls.model_validate({**d, "targets": tuple(d.get("targets") or DEFAULT_TARGETS)})

    def to_dict(self) -> dict:
        return {**self.model_dump(), "targets": list(self.targets)}


def lora_config(spec: LoraArgs):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        modules_to_save=list(PROJECTION_MODULES) if spec.train_projections else None,
        bias="none",
    )


def apply_lora(model: torch.nn.Module, spec: LoraArgs | None = None):
    """Wrap a ``CLIPModel`` in a trainable ``PeftModel``; the base weights and ``logit_scale`` stay frozen."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec or LoraArgs()))


def load_adapter(model: torch.nn.Module, adapter_dir: str, trainable: bool = True):
    """A ``PeftModel`` with the adapter saved in ``adapter_dir`` (by ``save_pretrained``) on top of ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def merge_lora(peft_model) -> torch.nn.Module:
    """Fold the adapters (and trained projection copies) into the base weights: a plain ``CLIPModel``."""
    return peft_model.merge_and_unload()


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def check_targets(model: torch.nn.Module, targets: Sequence[str]) -> None:
    """Fail clearly when a LoRA target names no module of the model."""
    from vlforge.errors import VlforgeError

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise VlforgeError(
            f"LoRA targets {missing} match no module of the model; CLIP attention projections are "
            "q_proj, k_proj, v_proj, out_proj (MLP: fc1, fc2)"
        )
