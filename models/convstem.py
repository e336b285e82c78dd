"""CLIP with a convolutional stem instead of the ViT's patchify ("Early Convolutions Help Transformers See Better",
Xiao et al. 2021), as transformers-native classes.

A plain ViT cuts the image into P x P patches with one strided convolution (kernel = stride = P), so at 32 px in
8 px patches a star, a diamond and a ring differ by a few pixels inside one patch's linear map. The stem replaces
that map with ``log2(P)`` 3x3 convolutions of stride 2 (widths ``stem_channels``, GELU after each) and a 1x1
convolution to the hidden size: the same (S / P)^2 token grid, so the CLS token, position embeddings, encoder,
LLaVA's use of the hidden states and the resampler are unchanged. No norm layers (GroupNorm and BatchNorm
learned much less on the shapes task). The convolutions get He (Kaiming-normal, fan-in, ReLU gain) weights, which
CLIP's own ``_init_weights`` (normal, std 0.02, for every convolution) would otherwise replace, and zero biases.
Without a norm the init sets the scale of what reaches the transformer: PyTorch's default for ``Conv2d``
(Kaiming-uniform with a = sqrt(5), std 1/sqrt(3 fan_in)) shrinks the signal about three-fold per convolution, and
with the four convolutions of a 16 px stem training more often stayed at colours only (BENCHMARKS.md "The
default: clip-conv-64"); He weights keep the scale through the GELUs. With PyTorch's uniform
biases the stem's output was mostly its biases (one vector for every token) and a VLM adapter read colour from the
tower at chance; zero biases make the image-dependent part dominate, as in the patchify (docs/vlm.md).

The classes save and load with ``save_pretrained`` / ``from_pretrained`` (safetensors). Their model types
(``vlforge_clip``, ``vlforge_clip_vision_model``) are not transformers' own: call :func:`register_auto_classes`
before loading such a folder through ``AutoConfig`` / ``AutoModel`` / ``LlavaForConditionalGeneration``
outside vlforge (vlforge's own load points call it).
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

VISION_MODEL_TYPE = "vlforge_clip_vision_model"
MODEL_TYPE = "vlforge_clip"
CLIP_MODEL_TYPES = ("clip", MODEL_TYPE)  # the ``model_type`` of a saved CLIP folder, either kind
FIRST_STEM_WIDTH = 32  # default widths: 32, 64, 128, ... (one per stride-2 convolution)


def stem_depth(patch_size) -> int:
    """The number of stride-2 convolutions whose total stride is ``patch_size`` (a power of two)."""
    if not isinstance(patch_size, int) or patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"a convolutional stem needs a power-of-two patch_size, got {patch_size!r}")
    return int(math.log2(patch_size))


@strict  # as transformers' configs: runs validate_architecture and checks the field types
class VlforgeClipVisionConfig(CLIPVisionConfig):
    """``CLIPVisionConfig`` plus ``stem_channels``: the width of each stride-2 convolution of the stem, one per
    halving of the image (``log2(patch_size)`` of them); empty means 32, 64, 128, ..."""

    model_type = VISION_MODEL_TYPE
    base_config_key = "vision_config"

    stem_channels: list[int] | None = None

    def __post_init__(self, **kwargs):
        if not self.stem_channels:
            depth = stem_depth(self.patch_size)
            self.stem_channels = [FIRST_STEM_WIDTH * 2**i for i in range(depth)]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        depth = stem_depth(self.patch_size)
        widths = list(self.stem_channels or [])
        if len(widths) != depth or any(int(w) <= 0 for w in widths):
            raise ValueError(
                f"stem_channels {widths} must list {depth} positive widths, one per stride-2 convolution of a "
                f"{self.patch_size}-pixel patch (log2 of patch_size)"
            )


@strict
class VlforgeClipConfig(CLIPConfig):
    """``CLIPConfig`` whose vision tower has a convolutional stem (:class:`VlforgeClipVisionConfig`)."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vision_config": VlforgeClipVisionConfig,
        "text_config": CLIPTextConfig,
    }


class StemConv(nn.Conv2d):
    """A convolution of the stem: its own class so that the models' ``_init_weights`` keeps PyTorch's init."""


class ConvStem(nn.Module):
    """Pixels [B, C, S, S] -> patch embeddings [B, hidden, S / P, S / P]: per width, a 3x3 stride-2 convolution
    and GELU; then a 1x1 convolution to the hidden size."""

    def __init__(self, config: VlforgeClipVisionConfig):
        super().__init__()
        channels = [config.num_channels, *config.stem_channels]
        self.convs = nn.ModuleList(
            StemConv(c_in, c_out, kernel_size=3, stride=2, padding=1)
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        self.proj = StemConv(channels[-1], config.hidden_size, kernel_size=1)
        self.act = nn.GELU()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.proj.weight.dtype)
        for conv in self.convs:
            x = self.act(conv(x))  # [B, w, S / 2^i, S / 2^i]
        return self.proj(x)


class ConvStemEmbeddings(CLIPVisionEmbeddings):
    """CLIP's vision embeddings (CLS token, position embeddings) over the stem's token grid.

    ``patch_embedding`` is the :class:`ConvStem`. It has no ``weight`` attribute on purpose: CLIP's
    ``_init_weights`` re-initialises ``patch_embedding.weight`` (normal, std 0.02) when there is one, and the
    inherited ``forward`` reads ``patch_embedding.weight.dtype``, hence the ``forward`` here."""

    def __init__(self, config: VlforgeClipVisionConfig):
        super().__init__(config)
        self.patch_embedding = ConvStem(config)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding=False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size})."
            )
        patch_embeds = self.patch_embedding(pixel_values)  # [B, D, S / P, S / P]
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # [B, N, D]
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)  # [B, N + 1, D]
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        return embeddings + self.position_embedding(self.position_ids)


class _NativeInit:
    """Initialise like transformers' own models: the stem's convolutions with He weights, the rest as CLIP does.

    transformers treats classes defined outside the library as possible remote code that writes weights without its
    guarded init functions, and skips every module without parameters of its own (CLIP's attention and MLP blocks)
    when initialising them: their projections kept the generic std 0.02 instead of CLIP's ~0.06, and the default
    recipe then learned nothing (zero-shot at chance). This ``_init_weights`` uses only the guarded functions."""

    @classmethod
    def is_custom_code(cls) -> bool:
        return False

    def _init_weights(self, module):
        if isinstance(module, StemConv):
            _init_stem_conv(module)
        else:
            super()._init_weights(module)


def _init_stem_conv(conv: StemConv) -> None:
    """He weights (Kaiming-normal, fan-in, ReLU gain: the signal keeps its scale through the stem) and zero biases,
    through transformers' guarded init functions, which leave weights loaded from a checkpoint alone."""
    init.kaiming_normal_(conv.weight, nonlinearity="relu")
    if conv.bias is not None:
        init.zeros_(conv.bias)


class VlforgeClipVisionModel(_NativeInit, CLIPVisionModel):
    """``CLIPVisionModel`` with :class:`ConvStemEmbeddings`: what LLaVA builds as its vision tower
    (``AutoModel.from_config``) from a :class:`VlforgeClipVisionConfig`."""

    config_class = VlforgeClipVisionConfig  # not an annotation: this module's annotations are strings
    _no_split_modules = ["CLIPEncoderLayer", "ConvStemEmbeddings"]

    def __init__(self, config: VlforgeClipVisionConfig):
        super().__init__(config)
        # CLIP's __init__ is kept whole (whatever transformers adds to it); only the embeddings are swapped,
        # and post_init initialises the new modules (those already initialised are skipped).
        self.embeddings = ConvStemEmbeddings(config)
        self.post_init()


class VlforgeClipModel(_NativeInit, CLIPModel):
    """``CLIPModel`` whose vision tower is a :class:`VlforgeClipVisionModel`; the text tower is CLIP's."""

    config_class = VlforgeClipConfig
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "ConvStemEmbeddings"]

    def __init__(self, config: VlforgeClipConfig):
        super().__init__(config)
        self.vision_model = VlforgeClipVisionModel._from_config(config.vision_config)
        self.post_init()


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` (and so LLaVA's vision tower and ``LlavaConfig``) know the
    conv-stem types. Idempotent; call it before loading a conv-stem folder outside vlforge."""
    from transformers import AutoConfig, AutoModel

    for model_type, config_cls, model_cls in (
        (VISION_MODEL_TYPE, VlforgeClipVisionConfig, VlforgeClipVisionModel),
        (MODEL_TYPE, VlforgeClipConfig, VlforgeClipModel),
    ):
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)


def clip_model_class(config):
    """The model class of a CLIP config: :class:`VlforgeClipModel` for a conv-stem config, else ``CLIPModel``."""
    return VlforgeClipModel if isinstance(config, VlforgeClipConfig) else CLIPModel
