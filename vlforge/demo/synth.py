"""Synthetic image-caption pairs with a known truth: coloured shapes on plain backgrounds.

A configurable share of pairs gets a deliberately mismatched caption (another colour *and* another shape),
so a CLIP filter has something real to remove and the demo can measure how well it did.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (15, 15, 15),
}
# A domain the plain pairs never show: the same classes on dark, tinted backgrounds with sensor-like noise (the
# demo's fine-tuning domain).
NOISY_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "navy": (20, 25, 60),
    "dark green": (15, 45, 25),
    "maroon": (60, 15, 20),
}
NOISE_SIGMA = 40.0
TEMPLATES = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "picture of a {colour} {shape}",
)


@dataclass(frozen=True)
class SynthPair:
    key: str
    image: bytes  # encoded JPEG or PNG
    caption: str
    colour: str
    shape: str
    matched: bool  # False when the caption deliberately describes another colour and shape

    @property
    def description(self) -> str:
        """What the image shows in the fewest words ("a red circle"): the answer to :data:`DESCRIBE`."""
        return f"a {self.colour} {self.shape}"


def draw_shape(colour: str, shape: str, background: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), {**BACKGROUNDS, **NOISY_BACKGROUNDS}[background])
    draw = ImageDraw.Draw(img)
    extent = rng.uniform(0.45, 0.8) * size
    cx = rng.uniform(extent / 2, size - extent / 2)
    cy = rng.uniform(extent / 2, size - extent / 2)
    x0, y0, x1, y1 = cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        w = extent / 3
        draw.rectangle((cx - w / 2, y0, cx + w / 2, y1), fill=fill)
        draw.rectangle((x0, cy - w / 2, x1, cy + w / 2), fill=fill)
    return img


def _add_noise(img: Image.Image, rng: random.Random) -> Image.Image:
    import numpy as np

    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, NOISE_SIGMA, (img.height, img.width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def caption_for(colour: str, shape: str, background: str, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(colour=colour, shape=shape, background=background)


def make_pairs(
    n: int,
    mismatch_fraction: float = 0.0,
    seed: int = 0,
    size: int = 64,
    prefix: str = "img",
    domain: str = "plain",
) -> list[SynthPair]:
    """``n`` pairs; exactly ``round(n * mismatch_fraction)`` of them get a mismatched caption. ``domain="noisy"``
    draws them on dark tinted backgrounds with pixel noise (a domain the plain pairs never show)."""
    if domain not in ("plain", "noisy"):
        raise ValueError(f"domain must be 'plain' or 'noisy', got {domain!r}")
    backgrounds = list(BACKGROUNDS if domain == "plain" else NOISY_BACKGROUNDS)
    if not 0.0 <= mismatch_fraction <= 1.0:
        raise ValueError(f"mismatch_fraction must be in [0, 1], got {mismatch_fraction}")
    rng = random.Random(seed)
    n_bad = round(n * mismatch_fraction)
    bad = set(rng.sample(range(n), n_bad))
    pairs = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        background = rng.choice(backgrounds)
        img = draw_shape(colour, shape, background, size, rng)
        if domain == "noisy":
            img = _add_noise(img, rng)
        if i in bad:
            cap_colour = rng.choice([c for c in COLOURS if c != colour])
            cap_shape = rng.choice([s for s in SHAPES if s != shape])
            caption = caption_for(cap_colour, cap_shape, background, rng)
        else:
            caption = caption_for(colour, shape, background, rng)
        pairs.append(SynthPair(f"{prefix}{i:06d}", encode(img), caption, colour, shape, i not in bad))
    return pairs


def class_prompts() -> list[str]:
    """Zero-shot prompts, one per (colour, shape) class, in a fixed order."""
    return [f"a photo of a {c} {s}" for c in COLOURS for s in SHAPES]


# Instructions about a pair's image and the answer each has: (question, SynthPair attribute).
INSTRUCTIONS = (("What colour is the shape?", "colour"), ("What shape is it?", "shape"))
# The VLM recipes' caption prompt (``caption_prompt`` in models/configs/vlm) answered with the pair's description:
# caption conversations among the instructions, as LLaVA's stage-2 data has, keep an instruction-tuned model
# describing images (trained on one question only it forgot how: caption accuracy 0.45 -> 0.00, measured).
DESCRIBE = ("Describe the image.", "description")


def make_instructions(
    pairs: list[SynthPair], questions: tuple[tuple[str, str], ...] = INSTRUCTIONS
) -> list[tuple[bytes, str, str]]:
    """(image, prompt, response) rows: every question about every pair, answered from the pair's truth."""
    return [(p.image, q, getattr(p, attr)) for p in pairs for q, attr in questions]
