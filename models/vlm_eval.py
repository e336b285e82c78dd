"""Evaluation of a VLM with greedy decoding: caption accuracy, instruction exact match with a percentile
bootstrap 95% interval, and the same model given a blank image (the baseline that shows the image is used).

Self-contained on purpose (numpy + torch); the bootstrap here is the plain percentile bootstrap of a mean.
"""

from __future__ import annotations

import io
import re
import string
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from models.vlm import VlmBundle
from models.vlm_train import Example, encode_prompts

BLANK_COLOUR = (128, 128, 128)


@torch.no_grad()
def generate(
    bundle: VlmBundle,
    images: Sequence,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers, one per (image, prompt), without the prompt and special tokens."""
    model, tok = bundle.model, bundle.tokenizer
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = encode_prompts(
            bundle,
            images[start : start + batch_size],
            prompts[start : start + batch_size],
            padding_side="left",
        ).to(device)
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new = ids[:, enc["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return out


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what exact match compares."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def names_all(caption: str, words: Sequence[str]) -> bool:
    """Whether ``caption`` contains every word of ``words`` as a whole word."""
    present = set(re.findall(r"[a-z]+", caption.lower()))
    return all(w.lower() in present for w in words)


def bootstrap_interval(
    values: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. 0/1 correctness), ``scipy.stats.bootstrap``."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:  # scipy refuses one observation; every resample of it is itself
        return float(x[0]), float(x[0])
    ci = stats.bootstrap(
        (x,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        vectorized=True, rng=np.random.default_rng(seed),
    ).confidence_interval  # fmt: skip
    return float(ci.low), float(ci.high)


def blank_image(size: int = 64, colour: tuple[int, int, int] = BLANK_COLOUR) -> bytes:
    """A uniform PNG with nothing in it."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _summary(correct: Sequence[bool], prefix: str) -> dict[str, float]:
    low, high = bootstrap_interval([float(c) for c in correct])
    return {
        f"{prefix}": float(np.mean(correct)) if len(correct) else float("nan"),
        f"{prefix}_low": low,
        f"{prefix}_high": high,
        f"{prefix}_n": float(len(correct)),
    }


def caption_accuracy(
    bundle: VlmBundle,
    images: Sequence,
    truths: Sequence[Sequence[str]],
    prompt: str,
    max_new_tokens: int = 16,
) -> tuple[dict[str, float], list[str]]:
    """Share of generated captions that name every truth word (demo: the colour and the shape), with its
    interval; and the captions."""
    captions = generate(bundle, images, [prompt] * len(images), max_new_tokens)
    correct = [names_all(c, t) for c, t in zip(captions, truths, strict=True)]
    return _summary(correct, "caption_accuracy"), captions


def instruction_accuracy(
    bundle: VlmBundle, rows: Sequence[Example], max_new_tokens: int = 16, prefix: str = "instruction_accuracy"
) -> tuple[dict[str, float], list[str]]:
    """Exact-match accuracy of the greedy answers against the rows' responses, with its interval."""
    answers = generate(bundle, [r.image for r in rows], [r.prompt for r in rows], max_new_tokens)
    correct = [exact_match(a, r.response) for a, r in zip(answers, rows, strict=True)]
    return _summary(correct, prefix), answers


def evaluate_vlm(
    bundle: VlmBundle,
    instructions: Sequence[Example] = (),
    captions: Sequence[tuple[bytes, Sequence[str]]] = (),
    caption_prompt: str = "Describe the image.",
    max_new_tokens: int = 16,
) -> dict[str, float]:
    """Every metric with its interval, plus the ``blank_`` baselines: the same prompts on a blank image."""
    metrics: dict[str, float] = {}
    blank = blank_image()
    if instructions:
        metrics.update(instruction_accuracy(bundle, instructions, max_new_tokens)[0])
        blanked = [Example(blank, r.prompt, r.response) for r in instructions]
        metrics.update(instruction_accuracy(bundle, blanked, max_new_tokens, "blank_instruction_accuracy")[0])
    if captions:
        images, truths = [c[0] for c in captions], [c[1] for c in captions]
        metrics.update(caption_accuracy(bundle, images, truths, caption_prompt, max_new_tokens)[0])
        blank_metrics = caption_accuracy(
            bundle, [blank] * len(images), truths, caption_prompt, max_new_tokens
        )[0]
        metrics.update({f"blank_{k}": v for k, v in blank_metrics.items()})
    return metrics
