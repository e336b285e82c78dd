"""The CLIP recipe on transformers' ``CLIPModel`` (or its conv-stem subclass, :mod:`models.convstem`): build,
load, save, preprocess and embed.

A :class:`ClipBundle` is the model with its tokenizer and image processor. It is saved with
``save_pretrained`` (safetensors) so transformers loads the folder directly; nothing is pickled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.imageproc import resize_center_crop
from models.recipes import DEFAULT_RECIPE, ClipRecipe, clip_config, load_recipe
from models.tokenizer import train_tokenizer
from vlforge.errors import ModelNotFoundError


def _image_processor(size: int, mean: Sequence[float], std: Sequence[float]):
    # transformers 5 falls back to the PIL backend without torchvision; import it directly to stay quiet.
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def _crop_size(processor) -> int:
    crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None)
    if isinstance(crop, int):
        return crop
    get = crop.get if hasattr(crop, "get") else lambda k: getattr(crop, k, None)
    return int(get("height") or get("shortest_edge"))


@dataclass
class ClipBundle:
    model: torch.nn.Module  # transformers.CLIPModel or models.convstem.VlforgeClipModel
    tokenizer: object
    image_processor: object

    @property
    def image_size(self) -> int:
        return _crop_size(self.image_processor)

    @property
    def max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] (from :func:`models.imageproc.resize_center_crop`) -> float32 [B, 3, S, S],
        scaled to [0, 1] then (x - mean) / std per channel, computed on the tensor's device."""
        proc = self.image_processor
        mean = torch.tensor(proc.image_mean, dtype=torch.float32, device=pixels.device)
        std = torch.tensor(proc.image_std, dtype=torch.float32, device=pixels.device)
        x = pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)
        return x.permute(0, 3, 1, 2).contiguous()

    def preprocess_images(self, images: Sequence[bytes | Image.Image]) -> torch.Tensor:
        """Resize the shortest edge, centre-crop and normalise: [B, 3, S, S] float32 pixel values."""
        size = self.image_size
        return self.normalize_pixels(
            torch.from_numpy(np.stack([resize_center_crop(i, size) for i in images]))
        )

    def tokenize(self, texts: Sequence[str], fixed_length: bool = False) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of shape [B, L], truncated to the model's context length.

        Padded to the longest text of the batch (the text tower is causal and pools at EOS, so padding
        further changes nothing but the cost), or to the full context length with ``fixed_length`` (fixed
        tensor shapes, as Ray Data training columns need).
        """
        enc = self.tokenizer(
            list(texts),
            padding="max_length" if fixed_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D]."""
        m = self.model
        pooled = m.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(m.visual_projection(pooled), dim=-1)

    def embed_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised text embeddings [B, D]."""
        m = self.model
        pooled = m.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(m.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def score(self, images: Sequence[bytes | Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image with its own caption: float array [B]."""
        self.model.eval()
        img = self.embed_images(self.preprocess_images(images))
        txt = self.embed_texts(**self.tokenize(texts))
        return (img * txt).sum(-1).float().numpy()

    def save(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        return path


QUICK_GELU_SCALE = 1.702


def fold_quick_gelu(model: torch.nn.Module) -> int:
    """Inference-only rewrite of every ``quick_gelu`` MLP (CLIP's activation) into one fused SiLU pass.

    ``fc2(h * sigmoid(1.702 h))`` with ``h = fc1(x)`` equals ``fc2'(silu(fc1'(x)))`` where ``fc1'`` is ``fc1``
    scaled by 1.702 and ``fc2'`` has its weight divided by 1.702: the same function, but one elementwise pass
    over the [tokens, 4 x width] activations instead of three (its worth: BENCHMARKS.md "Curate"). The
    folded model must not be saved: its config still says ``quick_gelu``. Returns the number of MLPs folded;
    a second call folds nothing.
    """
    folded = 0
    for module in model.modules():
        act = getattr(module, "activation_fn", None)
        if type(act).__name__ != "QuickGELUActivation" or not hasattr(module, "fc1"):
            continue
        with torch.no_grad():
            module.fc1.weight.mul_(QUICK_GELU_SCALE)
            if module.fc1.bias is not None:
                module.fc1.bias.mul_(QUICK_GELU_SCALE)
            module.fc2.weight.div_(QUICK_GELU_SCALE)
        module.activation_fn = torch.nn.SiLU(inplace=True)
        folded += 1
    return folded


def build_clip(
    recipe: str | ClipRecipe = DEFAULT_RECIPE, captions: Sequence[str] | None = None, seed: int = 0
):
    """A randomly initialised CLIP from a recipe. A ``train`` tokenizer is fitted on ``captions`` offline."""
    from models.convstem import clip_model_class

    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    tok_cfg = recipe.tokenizer
    if tok_cfg.get("kind") == "train":
        corpus = list(captions) if captions else ["a photo of a thing"]
        tokenizer = train_tokenizer(
            corpus, vocab_size=int(tok_cfg["vocab_size"]), max_length=recipe.max_length
        )
    else:
        tokenizer = _load_tokenizer(tok_cfg["hub_id"])
    vocab_size = max(len(tokenizer), int(tok_cfg.get("min_vocab_size", 0)))
    config = clip_config(
        recipe, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    )
    torch.manual_seed(seed)
    model = clip_model_class(config)(config)
    processor = _image_processor(recipe.image_size, recipe.image_mean, recipe.image_std)
    return ClipBundle(model, tokenizer, processor)


def _load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_id)


def load_clip(path_or_id: str, device: str | torch.device = "cpu") -> ClipBundle:
    """Load a CLIP from a local ``save_pretrained`` folder or a Hugging Face id (e.g. openai/clip-vit-base-patch32);
    a conv-stem folder (model type ``vlforge_clip``) loads as :class:`models.convstem.VlforgeClipModel`."""
    from models.convstem import clip_model_class

    is_dir = os.path.isdir(path_or_id)
    if not is_dir and (
        os.path.sep in path_or_id.strip("/").split("/", 1)[-1] or path_or_id.startswith((".", "/"))
    ):
        raise ModelNotFoundError(f"model folder {path_or_id!r} does not exist")
    try:
        config = load_clip_config(path_or_id)
        model = clip_model_class(config).from_pretrained(path_or_id, config=config)
        tokenizer = _load_tokenizer(path_or_id)
        processor = _load_processor(path_or_id, model)
    except ModelNotFoundError:
        raise
    except Exception as exc:
        where = "local folder" if is_dir else "Hugging Face id (offline hub cache, then the hub)"
        raise ModelNotFoundError(
            f"cannot load a CLIP model from {path_or_id!r} as a {where}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    model.to(device).eval()
    return ClipBundle(model, tokenizer, processor)


def load_clip_config(path_or_id: str):
    """The config of a saved CLIP: ``CLIPConfig``, or ``VlforgeClipConfig`` for a conv-stem model."""
    from transformers import AutoConfig, CLIPConfig

    from models.convstem import register_auto_classes

    register_auto_classes()
    config = AutoConfig.from_pretrained(path_or_id)
    if not isinstance(config, CLIPConfig):
        raise ModelNotFoundError(
            f"{path_or_id!r} holds a {config.model_type!r} model, not a CLIP (clip or vlforge_clip)"
        )
    return config


def _load_processor(path_or_id: str, model):
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    try:
        return Processor.from_pretrained(path_or_id)
    except OSError:
        size = int(model.config.vision_config.image_size)
        return _image_processor(
            size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        )


def clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of L2-normalised embeddings [B, D]; logit_scale is log(1/temperature)."""
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * image_embeds @ text_embeds.t()  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def gather_embeddings(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of ``x`` [B, D] concatenated in rank order [W x B, D]; gradients flow through this rank's
    own rows only (open_clip's default ``gather_with_grad=False``). Every rank must pass the same B.
    Without an initialised process group (one worker), ``x`` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def global_clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: every worker's embeddings are the negatives of every other's.

    Each rank computes the loss of the whole gathered batch with gradients through its own rows, so the
    gradients DDP averages are those of the global-batch loss (scaled by 1/world size) and the number of
    negatives grows with the number of workers, as in CLIP and open_clip. Equals :func:`clip_loss` on one
    worker.
    """
    return clip_loss(gather_embeddings(image_embeds), gather_embeddings(text_embeds), logit_scale)
