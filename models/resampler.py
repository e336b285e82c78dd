"""The resampler adapter: a fixed number of learned queries cross-attending to the vision tower's patch features.

The Flamingo / Qwen-VL idea (Perceiver resampler, BLIP-2's Q-Former without its text branch): however many
patches the vision tower gives, the language model sees ``num_queries`` visual tokens. It replaces LLaVA's
2-layer MLP projector inside transformers' ``LlavaForConditionalGeneration``
(:class:`LlavaResamplerForConditionalGeneration`), so the rest of LLaVA (placeholder tokens, generation, peft)
works unchanged.

It is not a native transformers class: its settings travel in ``config.json`` under ``vlforge_resampler``
and the folder names ``LlavaResamplerForConditionalGeneration`` as its architecture, so
``models.vlm.load_vlm`` loads it, and other engines (vLLM, plain ``LlavaForConditionalGeneration``) refuse it
rather than load it with a missing projector. Only the ``mlp`` adapter is loadable by other engines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

CONFIG_KEY = "vlforge_resampler"


@dataclass(frozen=True)
class ResamplerConfig:
    num_queries: int = 8
    num_heads: int = 4

    @classmethod
    def from_dict(cls, d: dict | None) -> ResamplerConfig:
        d = d or {}
        return cls(num_queries=int(d.get("num_queries", 8)), num_heads=int(d.get("num_heads", 4)))

    def to_dict(self) -> dict:
        return asdict(self)


class Resampler(nn.Module):
    """Patch features [B, N, Dv] -> visual tokens [B, Q, Dt] by one cross-attention from learned queries."""

    def __init__(self, vision_hidden: int, text_hidden: int, num_patches: int, cfg: ResamplerConfig):
        super().__init__()
        if text_hidden % cfg.num_heads:
            raise ValueError(
                f"resampler num_heads {cfg.num_heads} must divide the language model's hidden size {text_hidden}"
            )
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, text_hidden) * 0.02)  # [Q, Dt]
        self.key_positions = nn.Parameter(torch.zeros(num_patches, text_hidden))  # [N, Dt]
        self.kv_proj = nn.Linear(vision_hidden, text_hidden)
        self.ln_q = nn.LayerNorm(text_hidden)
        self.ln_kv = nn.LayerNorm(text_hidden)
        self.attn = nn.MultiheadAttention(text_hidden, cfg.num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(text_hidden)
        self.proj = nn.Linear(text_hidden, text_hidden)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(image_features))  # [B, N, Dt]
        q = self.ln_q(self.queries).unsqueeze(0).expand(kv.shape[0], -1, -1)  # [B, Q, Dt]
        out, _ = self.attn(q, kv + self.key_positions[: kv.shape[1]], kv, need_weights=False)
        return self.proj(self.ln_post(out))  # [B, Q, Dt]


def num_patch_features(config) -> int:
    """How many patch features reach the projector: the patch grid, plus CLS with the ``full`` strategy."""
    vc = config.vision_config
    grid = (vc.image_size // vc.patch_size) ** 2
    return grid + (1 if config.vision_feature_select_strategy == "full" else 0)


class LlavaResamplerForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with :class:`Resampler` in place of the MLP projector; ``config.vlforge_resampler`` sets it up."""

    def __init__(self, config):
        super().__init__(config)
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("the resampler adapter takes one vision feature layer (an int)")
        cfg = ResamplerConfig.from_dict(getattr(config, CONFIG_KEY, None))
        self.model.multi_modal_projector = Resampler(
            config.vision_config.hidden_size, config.text_config.hidden_size, num_patch_features(config), cfg
        )


class ResamplerProcessor(LlavaProcessor):
    """``LlavaProcessor`` that expands ``<image>`` into the resampler's fixed ``num_image_tokens``."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 8, **kwargs):
        self.num_image_tokens = int(num_image_tokens)
        super().__init__(image_processor, tokenizer, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens
