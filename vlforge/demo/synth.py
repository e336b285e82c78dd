"""Synthetic image-caption pairs with a known truth: coloured shapes on backgrounds. The one generator the demo,
the tests and the benchmarks share.

A :class:`ShapeTask` says what is drawn (palette, shapes, backgrounds, sizes, how large and whether rotated, pixel
noise, caption templates, and how a wrong caption is wrong); :func:`generate` draws ``n`` pairs of a task from a
seed, and the same seed always gives the same pixels and captions. Two tasks ship:

- :data:`DEMO` (and :data:`DEMO_NOISY`, its fine-tuning domain): red/green/blue/yellow/purple/orange circles,
  squares, triangles and crosses on white/grey/black, 64 px (:func:`make_pairs`). A wrong caption changes the
  colour *and* the shape, so a CLIP filter has something real to remove and the demo can measure how well it did.
- :data:`SHAPES30`: 30 classes none of them the demo's, pink/cyan/brown/lime/teal/navy stars, diamonds, rings,
  hexagons and crescents on beige/slate/sky with pixel noise, 72-112 px, smaller, rotated
  (:func:`make_shape_pairs`). A shape is a few pixels of outline at 32 px, so a model that sees only colour gets
  ~1/5 of the zero-shot classes right at best; a wrong caption changes the colour only, the shape only or both (a
  third each), so a scorer that knows colours but not shapes keeps many wrong pairs.

:func:`photo_like` draws natural-ish images (1/f noise, gradients, blobs) for what drawings cannot test (copy
detection on textures).

Tuning and reporting stay apart: the benchmarks chose the default recipe, its rate and the LoRA defaults on
``SHAPES30``'s palette and the tuning seeds (``TUNING_*``); the CI tests assert on ``HELDOUT_COLOURS`` drawn from
``HELDOUT_SEEDS``, which no benchmark chose anything on.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

Palette = dict[str, tuple[int, int, int]]

COLOURS: Palette = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS: Palette = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (15, 15, 15),
}
# A domain the plain pairs never show: the same classes on dark, tinted backgrounds with sensor-like noise (the
# demo's fine-tuning domain).
NOISY_BACKGROUNDS: Palette = {
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
class ShapeTask:
    """What a generator draws. A class is a (colour, shape); its label is its index in :meth:`classes`."""

    colours: Palette
    shapes: tuple[str, ...]
    backgrounds: Palette
    templates: tuple[str, ...]
    sizes: tuple[int, ...] = (64,)  # image side in px, drawn per pair when there are several
    radius: tuple[float, float] = (0.225, 0.4)  # the shape's outer radius, as a share of the side
    margin: float = 0.0  # px kept free between the shape and the border
    rotated: bool = False
    noise: float | None = None  # std of the Gaussian pixel noise (None: clean drawings)
    balanced: bool = False  # every class equally often (else each pair's class drawn at random)
    wrong: str = "both"  # what a wrong caption changes: "both" (colour and shape) or "any" (a third each)
    format: str = "JPEG"

    def classes(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colours for s in self.shapes]

    def class_prompts(self) -> list[str]:
        """Zero-shot prompts, one per class, in label order."""
        return [f"a photo of a {c} {s}" for c, s in self.classes()]


DEMO = ShapeTask(COLOURS, SHAPES, BACKGROUNDS, TEMPLATES)
DEMO_NOISY = dataclasses.replace(DEMO, backgrounds=NOISY_BACKGROUNDS, noise=NOISE_SIGMA)

SHAPES30_COLOURS: Palette = {
    "pink": (245, 120, 190),
    "cyan": (40, 210, 230),
    "brown": (130, 80, 30),
    "lime": (170, 240, 60),
    "teal": (0, 120, 120),
    "navy": (25, 30, 130),
}
SHAPES30 = ShapeTask(
    colours=SHAPES30_COLOURS,
    shapes=("star", "diamond", "ring", "hexagon", "crescent"),
    backgrounds={"beige": (232, 222, 196), "slate": (70, 78, 90), "sky": (190, 210, 235)},
    templates=(
        "a {colour} {shape}",
        "a photo of a {colour} {shape}",
        "a {shape} in {colour}",
        "a {colour} {shape} on {background}",
        "an image of one {colour} {shape}",
    ),
    sizes=(72, 80, 96, 112),
    radius=(0.17, 0.36),  # the shape spans 34-72 % of the image
    margin=1.0,
    rotated=True,
    noise=12.0,
    balanced=True,
    wrong="any",
    format="PNG",
)
# The benchmarks that chose a recipe, a rate or a LoRA setting (bench/recipe.py, bench/recipe_optim.py,
# bench/lora.py) tuned on SHAPES30 and these seeds: training pairs from seeds 0-3, test images from
# TUNING_TEST_SEED, the scorer's pool from TUNING_POOL_SEED. The CI accuracy tests assert on what no benchmark
# touched: another palette (HELDOUT_COLOURS, the same shapes and backgrounds) drawn from HELDOUT_SEEDS.
TUNING_TEST_SEED = 1000
TUNING_POOL_SEED = 2000
HELDOUT_COLOURS: Palette = {
    "orange": (250, 140, 20),
    "violet": (140, 80, 220),
    "olive": (110, 120, 20),
    "red": (215, 35, 35),
    "gold": (240, 200, 30),
    "blue": (30, 80, 220),
}
HELDOUT_SEEDS = {"train": (7001, 7002, 7003), "test": 7000, "pool": 7100}


@dataclass(frozen=True)
class SynthPair:
    key: str
    image: bytes  # encoded JPEG or PNG
    caption: str
    colour: str
    shape: str
    matched: bool  # False when the caption deliberately describes another class
    label: int = -1  # index of (colour, shape) in its task's classes()

    @property
    def description(self) -> str:
        """What the image shows in the fewest words ("a red circle"): the answer to :data:`DESCRIBE`."""
        return f"a {self.colour} {self.shape}"


def _polygon(cx: float, cy: float, radii: list[float], turn: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(turn + 2 * math.pi * i / n), cy + r * math.sin(turn + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def _draw_outline(d: ImageDraw.ImageDraw, shape: str, cx, cy, r, turn, fill, background) -> None:
    """One shape of outer radius ``r`` centred at (cx, cy); ``turn`` rotates the polygons (radians)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    elif shape == "cross":
        w = 2 * r / 3
        d.rectangle((cx - w / 2, box[1], cx + w / 2, box[3]), fill=fill)
        d.rectangle((box[0], cy - w / 2, box[2], cy + w / 2), fill=fill)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, turn), fill=fill)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, [r, 0.6 * r, r, 0.6 * r], turn), fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(2, round(0.3 * r)))
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, [r] * 6, turn), fill=fill)
    elif shape == "crescent":  # a disc with an offset disc of the background cut out of it
        d.ellipse(box, fill=fill)
        ox, oy = cx + 0.5 * r * math.cos(turn), cy + 0.5 * r * math.sin(turn)
        d.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=background)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw(task: ShapeTask, colour: str, shape: str, background: str, size: int, rng: random.Random):
    """One image of ``colour`` ``shape`` on ``background``: position, size, turn and noise drawn from ``rng``."""
    back = task.backgrounds[background]
    img = Image.new("RGB", (size, size), back)
    r = rng.uniform(*task.radius) * size
    cx = rng.uniform(r + task.margin, size - r - task.margin)
    cy = rng.uniform(r + task.margin, size - r - task.margin)
    turn = rng.uniform(0, 2 * math.pi) if task.rotated else 0.0
    _draw_outline(ImageDraw.Draw(img), shape, cx, cy, r, turn, task.colours[colour], back)
    if task.noise is None:
        return img
    import numpy as np

    pixels = np.asarray(img, dtype=np.float64)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, task.noise, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _wrong_class(task: ShapeTask, colour: str, shape: str, rng: random.Random) -> tuple[str, str]:
    """Another class: both changed ("both"), or the colour only, the shape only or both, a third each ("any")."""
    kind = 2 if task.wrong == "both" else rng.randrange(3)
    new_colour = colour if kind == 1 else rng.choice([c for c in task.colours if c != colour])
    new_shape = shape if kind == 0 else rng.choice([s for s in task.shapes if s != shape])
    return new_colour, new_shape


def generate(
    task: ShapeTask, n: int, seed: int = 0, mismatch_fraction: float = 0.0, prefix: str = "img"
) -> list[SynthPair]:
    """``n`` pairs of ``task``; exactly ``round(n * mismatch_fraction)`` of them get a wrong caption."""
    if not 0.0 <= mismatch_fraction <= 1.0:
        raise ValueError(f"mismatch_fraction must be in [0, 1], got {mismatch_fraction}")
    classes = task.classes()
    rng = random.Random(seed)
    wrong = set(rng.sample(range(n), round(n * mismatch_fraction)))
    labels = None
    if task.balanced:
        labels = [i % len(classes) for i in range(n)]
        rng.shuffle(labels)
    pairs = []
    for i in range(n):
        if labels is None:
            colour, shape = rng.choice(list(task.colours)), rng.choice(task.shapes)
        else:
            colour, shape = classes[labels[i]]
        background = rng.choice(list(task.backgrounds))
        size = task.sizes[0] if len(task.sizes) == 1 else rng.choice(task.sizes)
        img = draw(task, colour, shape, background, size, rng)
        said = _wrong_class(task, colour, shape, rng) if i in wrong else (colour, shape)
        caption = rng.choice(task.templates).format(colour=said[0], shape=said[1], background=background)
        label = classes.index((colour, shape))
        image = encode(img, task.format)
        pairs.append(SynthPair(f"{prefix}{i:06d}", image, caption, colour, shape, i not in wrong, label))
    return pairs


def make_pairs(
    n: int,
    mismatch_fraction: float = 0.0,
    seed: int = 0,
    size: int = 64,
    prefix: str = "img",
    domain: str = "plain",
) -> list[SynthPair]:
    """The demo's pairs (:data:`DEMO`); ``domain="noisy"`` draws them on dark tinted backgrounds with pixel noise
    (:data:`DEMO_NOISY`, a domain the plain pairs never show)."""
    if domain not in ("plain", "noisy"):
        raise ValueError(f"domain must be 'plain' or 'noisy', got {domain!r}")
    task = DEMO if domain == "plain" else DEMO_NOISY
    return generate(dataclasses.replace(task, sizes=(size,)), n, seed, mismatch_fraction, prefix)


def make_shape_pairs(
    n: int,
    seed: int,
    wrong_fraction: float = 0.0,
    prefix: str = "shape",
    backgrounds: Palette | None = None,
    noise: float | None = None,
    colours: Palette | None = None,
) -> list[SynthPair]:
    """:data:`SHAPES30`'s pairs, balanced over its 30 classes. ``backgrounds`` and the pixel ``noise`` (std) make
    another domain of the same classes; ``colours`` another palette (another 30 classes: ``HELDOUT_COLOURS``)."""
    task = shapes30_task(colours, backgrounds, noise)
    return generate(task, n, seed, wrong_fraction, prefix)


def shapes30_task(
    colours: Palette | None = None, backgrounds: Palette | None = None, noise: float | None = None
) -> ShapeTask:
    """:data:`SHAPES30` with another palette, backgrounds or noise where given."""
    return dataclasses.replace(
        SHAPES30,
        colours=colours or SHAPES30.colours,
        backgrounds=backgrounds or SHAPES30.backgrounds,
        noise=SHAPES30.noise if noise is None else noise,
    )


def class_prompts() -> list[str]:
    """The demo's zero-shot prompts, one per (colour, shape) class, in a fixed order."""
    return DEMO.class_prompts()


def photo_like(n: int, seed: int, size: int = 128) -> list[bytes]:
    """Natural-ish PNG images without downloads: 1/f colour noise, a linear gradient and a few soft blobs (what a
    copy detector must tell apart when the images are not drawings)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size) ** rng.uniform(1.6, 2.2)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.zeros((size, size, 3))
        for c in range(3):
            spec = falloff * np.exp(2j * np.pi * rng.random((size, size)))
            field = np.real(np.fft.ifft2(spec))
            img[..., c] = (field - field.mean()) / (field.std() + 1e-9)
        angle = rng.uniform(0, 2 * np.pi)
        img += 1.5 * (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-1, 1, 3)
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.random(), rng.random(), rng.uniform(0.05, 0.25)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            img += 2.0 * blob[..., None] * rng.uniform(-1, 1, 3)
        img = (img - img.min()) / (img.max() - img.min() + 1e-9) * 255
        out.append(encode(Image.fromarray(img.astype(np.uint8)), "PNG"))
    return out


# Instructions about a pair's image and the answer each has: (question, SynthPair attribute).
INSTRUCTIONS = (("What colour is the shape?", "colour"), ("What shape is it?", "shape"))
# The VLM recipes' caption prompt (``caption_prompt`` in models/configs/vlm) answered with the pair's description:
# caption conversations among the instructions, as LLaVA's stage-2 data has, keep an instruction-tuned model
# describing images (trained on the questions only, it stops describing: BENCHMARKS.md "End to end").
DESCRIBE = ("Describe the image.", "description")


def make_instructions(
    pairs: list[SynthPair], questions: tuple[tuple[str, str], ...] = INSTRUCTIONS
) -> list[tuple[bytes, str, str]]:
    """(image, prompt, response) rows: every question about every pair, answered from the pair's truth."""
    return [(p.image, q, getattr(p, attr)) for p in pairs for q, attr in questions]


# What the web puts where a caption should be (issue #29's pools): names nothing the image shows.
ALT_TEXTS = ("IMG_{}.jpg", "click to enlarge", "image", "DSC{}", "untitled", "photo {}")


def with_alt_text(pairs: list[SynthPair], fraction: float, seed: int = 0) -> list[SynthPair]:
    """``pairs`` with exactly ``round(n * fraction)`` captions (chosen by ``seed``) replaced by uninformative alt
    text ("IMG_1004.jpg", "click to enlarge"); those pairs are not ``matched``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    bad = set(random.Random(seed).sample(range(len(pairs)), round(len(pairs) * fraction)))
    return [
        dataclasses.replace(p, caption=ALT_TEXTS[i % len(ALT_TEXTS)].format(1000 + i), matched=False)
        if i in bad
        else p
        for i, p in enumerate(pairs)
    ]
