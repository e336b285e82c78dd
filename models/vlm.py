"""The LLaVA recipe on transformers' ``LlavaForConditionalGeneration``: build, save, load.

A VLM is our CLIP's vision tower (weights copied from a CLIP bundle or any HF CLIP; a conv-stem CLIP's tower is
a :class:`models.convstem.VlforgeClipVisionModel`, so loading such a VLM outside vlforge needs
``models.convstem.register_auto_classes()`` first), an adapter (LLaVA-1.5's
2-layer GELU MLP, ``mlp2x_gelu``, or the :mod:`models.resampler`), and a causal language model: a tiny
Llama/Qwen2 built here with a tokenizer trained offline (tests, demo) or a pretrained one from a folder or
HF id. A :class:`VlmBundle` is the model with its ``LlavaProcessor`` (CLIP image processor, tokenizer with
an ``<image>`` token, chat template); it saves with ``save_pretrained`` so an ``mlp`` VLM loads with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``.

Image tokens: with CLIP and ``vision_feature_select_strategy="default"`` the model drops CLS and feeds the
patch grid ((S / P)^2 tokens); the processor counts (S / P)^2 + ``num_additional_image_tokens`` (1: CLS)
- 1, the same number. Recipes are JSON files in ``models/configs/vlm/`` (:func:`load_vlm_recipe`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from models.resampler import CONFIG_KEY, LlavaResamplerForConditionalGeneration, ResamplerConfig
from vlforge import defaults
from vlforge.errors import ModelNotFoundError, VlforgeError

VLM_CONFIG_DIR = Path(__file__).parent / "configs" / "vlm"
IMAGE_TOKEN = "<image>"
ADAPTERS = ("mlp", "resampler")
# LLaVA-1.5's conversation format. The same template is the processor's chat template, so training batches,
# evaluation and any consumer calling ``processor.apply_chat_template`` see identical prompts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'] | upper -}}{{- ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{- c['text'] -}}{%- endfor -%}"
    "{%- endif -%}{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
# Added to a from-scratch tokenizer's corpus so the template's own words are whole tokens.
TEMPLATE_WORDS = "USER: \nASSISTANT:\nUSER: \nASSISTANT: Describe the image."


@dataclass(frozen=True)
class VlmRecipe:
    name: str
    language_model: dict[str, Any]  # {"hub_id": ...} or {"architecture": "llama"|"qwen2", sizes, "tokenizer"}
    vision_model: str = "models:/vlforge-clip@champion"
    adapter: str = "mlp"
    resampler: dict[str, Any] = field(default_factory=dict)
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    max_length: int = 128
    caption_prompt: str = "Describe the image."
    stage1: dict[str, Any] = field(
        default_factory=dict
    )  # learning_rate, batch_size, warmup_steps, train_language_model
    stage2: dict[str, Any] = field(
        default_factory=dict
    )  # learning_rate, lora {r, alpha, dropout, target_regex}
    description: str = ""

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise VlforgeError(
                f"unknown adapter {self.adapter!r} in recipe {self.name!r}; use one of {ADAPTERS}"
            )

    @property
    def train_language_model_in_stage1(self) -> bool:
        """A language model built from scratch has nothing to keep frozen: the tiny recipe trains it in stage 1."""
        return bool(self.stage1.get("train_language_model", False))

    @property
    def train_vision_tower_in_stage1(self) -> bool:
        """Whether stage 1 trains the vision tower too (LLaVA keeps it frozen; on the 30-class task training the
        tiny tower in stage 1 did not lift shape naming: BENCHMARKS.md "VLM recipe")."""
        return bool(self.stage1.get("train_vision_tower", False))


def list_vlm_recipes() -> list[str]:
    return sorted(p.stem for p in VLM_CONFIG_DIR.glob("*.json"))


def load_vlm_recipe(name_or_path: str, **overrides) -> VlmRecipe:
    """A recipe by name (``models/configs/vlm/NAME.json``) or JSON path; ``overrides`` replace top-level keys."""
    path = Path(name_or_path)
    if path.suffix != ".json":  # a name (names may hold dots: vlm-qwen2.5-0.5b)
        path = VLM_CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise ModelNotFoundError(
            f"unknown VLM recipe {name_or_path!r}; known recipes: {', '.join(list_vlm_recipes())}"
        )
    raw = json.loads(path.read_text())
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return VlmRecipe(**raw)


@dataclass
class VlmBundle:
    model: torch.nn.Module  # LlavaForConditionalGeneration (or the resampler subclass)
    processor: Any  # LlavaProcessor (or models.resampler.ResamplerProcessor)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def adapter(self) -> str:
        return "resampler" if getattr(self.model.config, CONFIG_KEY, None) else "mlp"

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_image_tokens(self) -> int:
        return int(self.model.config.image_seq_length)

    def prompt_text(self, prompt: str) -> str:
        """The chat-templated user turn with one image and the assistant's cue (``...\\nASSISTANT:``)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def save(self, path: str) -> str:
        return save_vlm(self, path)


def num_image_tokens(vision_config, strategy: str, resampler: ResamplerConfig | None = None) -> int:
    """Visual tokens per image the language model sees: the patch grid (+ CLS with ``full``), or the queries."""
    if resampler is not None:
        return resampler.num_queries
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    return grid + (1 if strategy == "full" else 0)


def build_processor(image_processor, tokenizer, vision_config, strategy: str, resampler=None):
    """``LlavaProcessor`` whose ``<image>`` expansion matches what the model feeds the language model."""
    if resampler is not None:
        from models.resampler import ResamplerProcessor

        return ResamplerProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=resampler.num_queries,
            chat_template=CHAT_TEMPLATE,
            image_token=IMAGE_TOKEN,
        )
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        # CLIP puts a CLS token before the patches; "default" drops it again (processor subtracts 1).
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def _tiny_language_model(spec: dict[str, Any], corpus: Sequence[str], max_length: int):
    """A from-scratch Llama/Qwen2 config and a BPE tokenizer trained offline on ``corpus``."""
    from transformers import LlamaConfig, Qwen2Config

    from models.tokenizer import train_tokenizer

    tok_spec = spec.get("tokenizer", {})
    tokenizer = train_tokenizer(
        [*corpus, TEMPLATE_WORDS],
        vocab_size=int(tok_spec.get("vocab_size", 512)),
        max_length=max_length,
        extra_special_tokens=[IMAGE_TOKEN],
        append_eos=False,
    )
    arch = spec.get("architecture", "llama")
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if config_cls is None:
        raise VlforgeError(f"unknown tiny language model architecture {arch!r}; use llama or qwen2")
    sizes = {k: v for k, v in spec.items() if k not in ("architecture", "tokenizer")}
    sizes.setdefault("num_key_value_heads", sizes.get("num_attention_heads"))
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    return config, tokenizer, None


def _pretrained_language_model(path_or_id: str):
    """A causal LM, its config and tokenizer (with ``<image>`` added) from a folder or HF id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        lm = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    except Exception as exc:
        raise ModelNotFoundError(
            f"cannot load a causal language model from {path_or_id!r}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.config, tokenizer, lm


def build_vlm(
    recipe: str | VlmRecipe = defaults.DEFAULT_VLM_RECIPE,
    vision=None,
    corpus: Sequence[str] = (),
    *,
    adapter: str | None = None,
    settings=None,
    seed: int = 0,
) -> VlmBundle:
    """A LLaVA model from a recipe: ``vision`` is a :class:`models.clip.ClipBundle`, a CLIP folder, HF id or
    (with ``settings``) an MLflow model URI (default: the recipe's ``vision_model``); ``corpus`` is the text a
    from-scratch tokenizer is trained on (captions, prompts, responses). ``adapter`` overrides the recipe's."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from models.convstem import register_auto_classes

    register_auto_classes()  # a conv-stem CLIP's vision config and tower (LlavaConfig, AutoModel.from_config)
    recipe = load_vlm_recipe(recipe) if isinstance(recipe, str) else recipe
    if adapter is not None:
        recipe = replace(recipe, adapter=adapter)
    clip = _vision_bundle(vision if vision is not None else recipe.vision_model, settings)
    spec = recipe.language_model
    if "hub_id" in spec:
        text_config, tokenizer, lm = _pretrained_language_model(spec["hub_id"])
    else:
        text_config, tokenizer, lm = _tiny_language_model(spec, corpus, recipe.max_length)
    vision_config = clip.model.config.vision_config
    resampler = ResamplerConfig.from_dict(recipe.resampler) if recipe.adapter == "resampler" else None
    extra = {CONFIG_KEY: resampler.to_dict()} if resampler else {}
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_image_tokens(vision_config, recipe.vision_feature_select_strategy, resampler),
        projector_hidden_act="gelu",  # LLaVA-1.5 mlp2x_gelu
        vision_feature_select_strategy=recipe.vision_feature_select_strategy,
        vision_feature_layer=recipe.vision_feature_layer,
        **extra,
    )
    torch.manual_seed(seed)
    model_cls = LlavaResamplerForConditionalGeneration if resampler else LlavaForConditionalGeneration
    model = model_cls(config)
    model.model.vision_tower.load_state_dict(clip.model.vision_model.state_dict())
    if lm is not None:
        model.model.language_model.load_state_dict(lm.base_model.state_dict())
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        if len(tokenizer) > model.config.text_config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
    processor = build_processor(
        clip.image_processor, tokenizer, vision_config, recipe.vision_feature_select_strategy, resampler
    )
    return VlmBundle(model, processor)


def _vision_bundle(vision, settings):
    from models.clip import ClipBundle, load_clip

    if isinstance(vision, ClipBundle):
        return vision
    from vlforge.registry import is_mlflow_uri, resolve_model_dir

    if is_mlflow_uri(vision):
        if settings is None:
            raise VlforgeError(f"vision model {vision!r} is an MLflow URI: pass settings to resolve it")
        vision = resolve_model_dir(vision, settings)
    return load_clip(vision)


def save_vlm(bundle: VlmBundle, path: str) -> str:
    """``save_pretrained`` of the model (safetensors) and the processor (tokenizer, image processor, template)."""
    os.makedirs(path, exist_ok=True)
    bundle.model.save_pretrained(path, safe_serialization=True)
    bundle.processor.save_pretrained(path)
    return path


def load_vlm(path: str, device: str | torch.device = "cpu") -> VlmBundle:
    """Load a saved VLM folder (either adapter) in eval mode."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from models.convstem import register_auto_classes

    register_auto_classes()  # a conv-stem vision tower
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ModelNotFoundError(f"{path!r} is not a saved VLM folder (no config.json)")
    raw = json.loads(Path(config_path).read_text())
    if raw.get("model_type") != "llava":
        raise ModelNotFoundError(f"{path!r} holds a {raw.get('model_type')!r} model, not a LLaVA VLM")
    if raw.get(CONFIG_KEY):
        from models.resampler import ResamplerProcessor

        model = LlavaResamplerForConditionalGeneration.from_pretrained(path)
        processor = ResamplerProcessor.from_pretrained(path)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path)
        processor = LlavaProcessor.from_pretrained(path)
    model.to(device).eval()
    return VlmBundle(model, processor)
