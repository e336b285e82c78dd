"""Training pieces of the LLaVA recipe, free of Ray and MLflow so the training driver (and tests) call them.

- :func:`build_batch`: (image, prompt, response) rows -> ``input_ids``, ``attention_mask``, ``pixel_values``,
  ``labels``; the loss sees only the response tokens (and the EOS closing it), everything else is -100.
  Truncation cuts the response's tail, never an image token or the prompt.
- :func:`with_caption_conversations`: stage-2 rows plus caption conversations for a share of their images.
- :func:`prepare_stage1`: vision tower and language model frozen, the adapter trained (and the language model
  too when the recipe says so: a from-scratch tiny LM has nothing worth freezing).
- :func:`prepare_stage2`: peft LoRA on the language model's q/k/v/o and MLP projections only (a regex on the
  module path: plain suffix lists would also hit the CLIP tower's q/k/v_proj), the adapter trained in full
  (``modules_to_save``), the vision tower frozen.
- :func:`save_stage2`: saves the adapter, then merges it (serving engines reject adapters with
  ``modules_to_save``) and saves the merged model.
- :func:`train_steps` / :func:`training_step`: a plain AdamW loop.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata

import torch
from PIL import Image

from models.vlm import VlmBundle, save_vlm
from vlforge.errors import VlforgeError

IGNORE_INDEX = -100
PROJECTOR = "multi_modal_projector"
# Module paths inside LlavaForConditionalGeneration: model.language_model.layers.N.self_attn.q_proj, ...
# (Llama, Qwen2, Mistral, SmolLM naming). The vision tower's model.vision_tower.encoder.layers.N.self_attn.q_proj
# must not match.
LM_LORA_REGEX = r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


@dataclass(frozen=True)
class Example:
    image: bytes | Image.Image
    prompt: str
    response: str


def caption_examples(images: Sequence, captions: Sequence[str], prompt: str) -> list[Example]:
    """Stage-1 rows: the caption is the response to a fixed captioning prompt."""
    return [Example(i, prompt, c) for i, c in zip(images, captions, strict=True)]


def caption_conversation_drawn(key: str, share: float) -> bool:
    """Whether the row ``key`` also gets a caption conversation: a hash of the key below ``share``, so the choice
    is the same in every epoch, on every worker and however the rows are batched."""
    digest = hashlib.blake2b(f"caption-conversation:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def with_caption_conversations(
    rows: Sequence[Example], keys: Sequence[str], captions: Sequence[str], prompt: str, share: float
) -> tuple[list[Example], list[str]]:
    """Stage-2 rows plus, for ``share`` of them (by key), the same image with the caption prompt answered by its
    caption: LLaVA's instruction data mixes conversation kinds, and a stage 2 on questions alone forgets how to
    describe an image (BENCHMARKS.md "VLM recipe")."""
    out, out_keys = list(rows), list(keys)
    for row, key, caption in zip(rows, keys, captions, strict=True):
        if share > 0 and str(caption or "").strip() and caption_conversation_drawn(key, share):
            out.append(Example(row.image, prompt, str(caption)))
            out_keys.append(f"{key}#caption")
    return out, out_keys


def _pil(image, row: int = 0) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        return Image.open(io.BytesIO(bytes(image))).convert("RGB")
    except Exception as exc:
        raise VlforgeError(
            f"row {row}: the image is not a decodable encoded image ({type(exc).__name__}: {exc})"
        ) from exc


def encode_prompts(bundle: VlmBundle, images: Sequence, prompts: Sequence[str], padding_side: str = "left"):
    """Processor output for chat-templated prompts with one image each, padded to the longest
    (left padding for generation). ``<image>`` is expanded to the model's number of visual tokens."""
    texts = [bundle.prompt_text(p) for p in prompts]
    return bundle.processor(
        text=texts,
        images=[_pil(image, row) for row, image in enumerate(images)],
        padding="longest",
        padding_side=padding_side,
        return_tensors="pt",
    )


def build_batch(bundle: VlmBundle, rows: Sequence[Example], max_length: int | None = None) -> dict:
    """A training batch [B, L] (right padded) and ``pixel_values`` [B, 3, S, S].

    ``labels`` equal ``input_ids`` on the response tokens and the EOS after them, -100 elsewhere (prompt,
    image tokens, padding). Longer than ``max_length``: the response is cut from its end; a prompt that alone
    does not fit (it holds every image token) is an error naming the row, never a silent cut.
    """
    if not rows:
        raise VlforgeError("build_batch needs at least one row")
    tok = bundle.tokenizer
    enc = encode_prompts(bundle, [r.image for r in rows], [r.prompt for r in rows], padding_side="right")
    seqs, labels = [], []
    for i, row in enumerate(rows):
        prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        response_ids = tok(" " + row.response.strip(), add_special_tokens=False)["input_ids"]
        response_ids = [*response_ids, tok.eos_token_id]
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                raise VlforgeError(
                    f"row {i}: the prompt takes {len(prompt_ids)} tokens ({bundle.num_image_tokens} of them "
                    f"image tokens), max_length is {max_length}; shorten the prompt or raise max_length"
                )
            response_ids = response_ids[: max_length - len(prompt_ids)]
        seqs.append(prompt_ids + response_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + response_ids)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": enc["pixel_values"],
        "labels": label_t,
    }


def build_batches(
    bundle: VlmBundle, rows: Sequence[Example], batch_size: int, max_length: int | None = None, seed: int = 0
) -> list[dict]:
    """One shuffled epoch of batches (the last one may be smaller)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [
        build_batch(bundle, [rows[j] for j in order[i : i + batch_size]], max_length)
        for i in range(0, len(order), batch_size)
    ]


def projector(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_submodule(f"model.{PROJECTOR}")


def prepare_stage1(
    bundle: VlmBundle, train_language_model: bool, train_vision_tower: bool = False
) -> torch.nn.Module:
    """Freeze everything but the adapter (and the language model with its head, or the vision tower, when asked).
    Returns the model."""
    model = bundle.model
    model.requires_grad_(False)
    projector(model).requires_grad_(True)
    if train_language_model:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if train_vision_tower:
        model.model.vision_tower.requires_grad_(True)
    return model


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_regex: str = LM_LORA_REGEX

    @classmethod
    def from_dict(cls, d: dict | None) -> LoraSettings:
        d = d or {}
        return cls(
            r=int(d.get("r", 8)),
            alpha=int(d.get("alpha", 16)),
            dropout=float(d.get("dropout", 0.0)),
            target_regex=str(d.get("target_regex") or LM_LORA_REGEX),
        )


def prepare_stage2(bundle: VlmBundle, lora: LoraSettings | dict | None = None):
    """Wrap the model in a ``PeftModel``: LoRA on the language model only, the adapter trained in full."""
    from peft import LoraConfig, get_peft_model

    lora = lora if isinstance(lora, LoraSettings) else LoraSettings.from_dict(lora)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_regex,  # a string: peft full-matches it against each module path
        modules_to_save=[PROJECTOR],
        bias="none",
    )
    try:
        return get_peft_model(bundle.model, config)
    except ValueError as exc:
        raise VlforgeError(
            f"LoRA target regex {lora.target_regex!r} matches no module of the language model: {exc}"
        ) from exc


def resume_stage2(bundle: VlmBundle, adapter_dir: str, trainable: bool = True):
    """A ``PeftModel`` with a saved stage-2 adapter (LoRA and projector copy) on top of ``bundle.model``:
    resuming from a checkpoint, or evaluating the adapter without merging."""
    from peft import PeftModel

    return PeftModel.from_pretrained(bundle.model, adapter_dir, is_trainable=trainable)


def lora_module_names(peft_model) -> list[str]:
    """Paths of the modules that carry LoRA weights."""
    return [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]


def library_versions() -> dict[str, str]:
    """What a registered VLM records: the libraries its folders were written with."""
    return {name: metadata.version(name) for name in ("transformers", "peft", "torch")}


VERSIONS_FILE = "vlforge_versions.json"


def save_stage2(peft_model, bundle: VlmBundle, merged_dir: str, adapter_dir: str) -> VlmBundle:
    """Save the LoRA adapter (with the projector copy), then merge it into the base weights and save the merged
    model with the processor: a plain LLaVA folder. Both folders record the transformers, peft and torch
    versions in ``vlforge_versions.json``. Returns the merged bundle (the peft wrapper is spent)."""
    peft_model.save_pretrained(adapter_dir)
    bundle.processor.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    out = VlmBundle(merged, bundle.processor)
    save_vlm(out, merged_dir)
    for folder in (adapter_dir, merged_dir):
        with open(os.path.join(folder, VERSIONS_FILE), "w") as fh:
            json.dump(library_versions(), fh, indent=2)
    return out


def training_step(model: torch.nn.Module, batch: dict, optimizer, max_grad_norm: float = 1.0) -> float:
    """One AdamW step on the masked next-token loss; returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float = 0.0):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise VlforgeError("no trainable parameters: prepare the stage first")
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def train_steps(
    model: torch.nn.Module,
    batches: Iterable[dict],
    steps: int,
    learning_rate: float,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """``steps`` optimiser steps cycling over ``batches``; returns the losses. ``on_step(step, loss)`` logs."""
    optimizer = make_optimizer(model, learning_rate)
    model.train()
    losses = []
    for step, batch in zip(range(steps), itertools.cycle(batches)):
        losses.append(training_step(model, batch, optimizer))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
