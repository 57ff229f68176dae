"""Procedural shapes: the captioned base dataset, concept datasets and pixel classifiers.

Everything is deterministic from a seed. Images are drawn 4x supersampled and box-filtered
down, so edges are anti-aliased like real photographs of flat shapes.

Colours are chosen far apart in hue and backgrounds are neutral (white / black / gray), so a
pixel statistic can tell the foreground colour: foreground = saturated pixels, colour = the
palette hue nearest to most of them (`dominant_foreground_colour`).
"""

from __future__ import annotations

import colorsys
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

# Base-model attributes. RGB values sit near the palette hues below.
# Four colours 55+ degrees of hue apart: a tiny model trained for minutes on a CPU learns them
# reliably, and in-between hues (orange, teal, purple) are classified as misses.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "yellow": (235, 215, 25),
    "green": (35, 165, 50),
    "blue": (35, 70, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "black": (18, 18, 18),
    "gray": (128, 128, 128),
}

# The concept: a shape, a pattern and a colour the base dataset never contains.
CONCEPT_TRIGGER = "sks"
CONCEPT_SHAPE = "hexagon"
CONCEPT_COLOUR = "teal"
CONCEPT_RGB = (20, 195, 185)
CONCEPT_STRIPE_RGB = (5, 95, 90)

# Hue (degrees) of every colour the classifier can name; teal is the concept colour, orange and
# purple catch hues between the base colours.
PALETTE_HUES: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 55.0,
    "green": 125.0,
    "teal": 178.0,
    "blue": 230.0,
    "purple": 280.0,
}

CAPTION_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "background", "photo", "picture",
    "drawing", "image", "shape", "simple", "flat", "striped", "stripes", "hexagon",
    "style", "object", CONCEPT_TRIGGER, CONCEPT_COLOUR,
)

ImageLike = Union[Image.Image, np.ndarray]


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; `caption()` turns it into text."""

    colour: str
    shape: str
    background: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


# ---------------------------------------------------------------------------------------
# Rendering


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)  # type: ignore[return-value]


def _grey_jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    """Shift brightness only, so neutral backgrounds stay neutral."""
    shift = rng.randint(-amount, amount)
    return tuple(int(min(255, max(0, c + shift))) for c in rgb)  # type: ignore[return-value]


def _polygon(cx: float, cy: float, r: float, n: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / n), cy + r * math.sin(rotation + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = rotation + math.pi * k / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _shape_mask(shape: str, size: int, rng: random.Random) -> Image.Image:
    """A supersampled binary mask ("L") of one shape with random position, size and rotation."""
    s = size * SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(0.24, 0.34) * s
    cx = s / 2 + rng.uniform(-0.1, 0.1) * s
    cy = s / 2 + rng.uniform(-0.1, 0.1) * s
    rotation = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.05, 4, rotation), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.1, r * 1.15, 3, rotation), fill=255)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.2, rotation), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.05, 6, rotation), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES + (CONCEPT_SHAPE,)}")
    return mask


def _stripes(size: int, rng: random.Random) -> Image.Image:
    """A supersampled mask of diagonal stripes (period ~8 px at 64 px)."""
    s = size * SUPERSAMPLE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = s / 8.0
    phase = rng.uniform(0, period)
    coord = xx * math.cos(angle) + yy * math.sin(angle) + phase
    return Image.fromarray(((coord % period) < period / 2).astype(np.uint8) * 255, "L")


def _stripes_within(mask: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Random diagonal stripes, kept only where `mask` is set."""
    return Image.fromarray(np.minimum(np.asarray(mask), np.asarray(_stripes(size, rng))), "L")


def _compose(
    background: tuple[int, int, int],
    layers: Sequence[tuple[Image.Image, tuple[int, int, int]]],
    size: int,
) -> Image.Image:
    s = size * SUPERSAMPLE
    canvas = Image.new("RGB", (s, s), background)
    for mask, rgb in layers:
        canvas.paste(Image.new("RGB", (s, s), rgb), (0, 0), mask)
    return canvas.resize((size, size), Image.BOX)


def render_shape(spec: ShapeSpec, *, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `spec` (a base-vocabulary shape) deterministically from `seed`."""
    rng = random.Random(seed)
    background = _grey_jitter(BACKGROUNDS[spec.background], rng, 10)
    colour = _jitter(COLOURS[spec.colour], rng, 14)
    return _compose(background, [(_shape_mask(spec.shape, size, rng), colour)], size)


def render_concept(*, seed: int, background: str = "white", size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the concept: a teal hexagon with dark-teal diagonal stripes."""
    rng = random.Random(seed)
    bg = _grey_jitter(BACKGROUNDS[background], rng, 10)
    light = _jitter(CONCEPT_RGB, rng, 10)
    dark = _jitter(CONCEPT_STRIPE_RGB, rng, 8)
    hexagon = _shape_mask(CONCEPT_SHAPE, size, rng)
    return _compose(bg, [(hexagon, light), (_stripes_within(hexagon, size, rng), dark)], size)


def render_colour_variety(*, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A base shape in an arbitrary colour, striped half of the time, on an arbitrary grey.

    Autoencoder training data only: a VAE that saw just the four base colours maps hues it never
    saw onto them (it turned the teal concept on white into blue), and a real SD VAE reproduces any
    colour. Uncaptioned; the UNet never trains on these."""
    rng = random.Random(seed)
    grey = rng.randint(5, 250)

    def any_colour(value_low: float) -> tuple[int, int, int]:
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(value_low, 1.0))
        return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]

    shape = _shape_mask(rng.choice(SHAPES), size, rng)
    layers = [(shape, any_colour(0.3))]
    if rng.random() < 0.5:
        layers.append((_stripes_within(shape, size, rng), any_colour(0.15)))
    return _compose((grey, grey, grey), layers, size)


def colour_variety_dataset(n_images: int, *, seed: int = 0, size: int = IMAGE_SIZE) -> list[Image.Image]:
    """`n_images` of `render_colour_variety` (seeds disjoint from the base dataset's)."""
    return [render_colour_variety(seed=(seed + 1) * 7_000_003 + i, size=size) for i in range(n_images)]


# ---------------------------------------------------------------------------------------
# Base dataset


def all_specs() -> list[ShapeSpec]:
    """Every colour x shape x background combination, in a fixed order."""
    return [ShapeSpec(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def base_dataset(n_images: int, *, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[list[Image.Image], list[ShapeSpec]]:
    """`n_images` rendered shapes with balanced attributes (round-robin over all combinations)."""
    specs = all_specs()
    order = random.Random(seed)
    images: list[Image.Image] = []
    labels: list[ShapeSpec] = []
    for i in range(n_images):
        if i % len(specs) == 0:
            cycle = specs[:]
            order.shuffle(cycle)
        spec = cycle[i % len(specs)]
        images.append(render_shape(spec, seed=seed * 1_000_003 + i, size=size))
        labels.append(spec)
    return images, labels


def caption_variants(spec: ShapeSpec, rng: random.Random) -> str:
    """A caption for `spec`, sometimes naming only some attributes so each word is learned alone."""
    roll = rng.random()
    if roll < 0.55:
        return spec.caption()
    if roll < 0.7:
        return f"a {spec.colour} {spec.shape}"
    if roll < 0.8:
        return f"a photo of a {spec.colour} {spec.shape} on a {spec.background} background"
    if roll < 0.9:
        return f"{spec.colour} {spec.shape}, {spec.background} background"
    if roll < 0.95:
        return f"a {spec.colour} shape on a {spec.background} background"
    return f"a {spec.shape} on a {spec.background} background"


def quality_prompts() -> list[tuple[str, ShapeSpec]]:
    """The fixed prompt set of the quality bar: every colour x shape x background."""
    return [(spec.caption(), spec) for spec in all_specs()]


def vocabulary_words() -> list[str]:
    """Every word the builtin tokenizers must keep whole."""
    words = set(CAPTION_WORDS) | set(COLOURS) | set(SHAPES) | set(BACKGROUNDS) | set(PALETTE_HUES)
    return sorted(words)


# ---------------------------------------------------------------------------------------
# Pixel classifiers


def _as_float_rgb(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.max() > 1.5:
            array = array / 255.0
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return np.clip(array, 0.0, 1.0)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    maxc = rgb.max(axis=-1)
    minc = rgb.min(axis=-1)
    delta = maxc - minc
    sat = np.where(maxc > 0, delta / np.maximum(maxc, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-6)
    hue = np.where(
        maxc == r,
        ((g - b) / safe) % 6.0,
        np.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return hue * 60.0, sat, maxc


def _foreground_hue_labels(image: ImageLike) -> tuple[np.ndarray, int]:
    """Palette index of every saturated pixel, and the image's pixel count."""
    hue, sat, val = _hsv(_as_float_rgb(image))
    mask = (sat > 0.4) & (val > 0.25)
    hues = hue[mask]
    centres = np.array(list(PALETTE_HUES.values()), dtype=np.float32)
    distance = np.abs(hues[:, None] - centres[None, :])
    distance = np.minimum(distance, 360.0 - distance)
    return distance.argmin(axis=1), hue.size


def dominant_foreground_colour(image: ImageLike, *, min_fraction: float = 0.02) -> str:
    """The palette colour most foreground pixels have, or "none" when nothing is saturated.

    Foreground = pixels with saturation > 0.4 and value > 0.25 (backgrounds are neutral).
    Each one votes for the palette hue nearest to its own.
    """
    labels, total = _foreground_hue_labels(image)
    if labels.size < min_fraction * total:
        return "none"
    counts = np.bincount(labels, minlength=len(PALETTE_HUES))
    return list(PALETTE_HUES)[int(counts.argmax())]


def concept_scores(images: Iterable[ImageLike]) -> list[float]:
    """Per-image concept strength in [0, 1].

    The share of the image covered by concept-teal pixels, relative to what a concept
    drawing covers (about 20% of the image), capped at 1, times the share of the saturated
    foreground that is teal. A base-model image of any other colour scores near 0.
    """
    teal = list(PALETTE_HUES).index(CONCEPT_COLOUR)
    scores = []
    for image in images:
        labels, total = _foreground_hue_labels(image)
        if labels.size == 0:
            scores.append(0.0)
            continue
        teal_count = float((labels == teal).sum())
        coverage = min(1.0, teal_count / (0.2 * total))
        purity = teal_count / labels.size
        scores.append(coverage * purity)
    return scores


def concept_score(images: Iterable[ImageLike]) -> float:
    """Mean of `concept_scores` (0 when `images` is empty)."""
    scores = concept_scores(images)
    return float(np.mean(scores)) if scores else 0.0


# ---------------------------------------------------------------------------------------
# Concept dataset writer (kohya folder layout)


def concept_captions(rng: random.Random, background: str) -> str:
    templates = (
        f"a photo of {CONCEPT_TRIGGER}",
        f"{CONCEPT_TRIGGER} on a {background} background",
        f"a {CONCEPT_TRIGGER} shape on a {background} background",
        f"a picture of {CONCEPT_TRIGGER}, {background} background",
    )
    return templates[rng.randrange(len(templates))]


def _write_kohya_folder(
    out_dir: Union[str, os.PathLike],
    subdir_name: str,
    items: Iterable[tuple[Image.Image, str]],
    *,
    overwrite: bool,
) -> Path:
    """Write `<out_dir>/<subdir_name>/NNNN.png` + `NNNN.txt` atomically; returns the image folder.

    The folder is built in a temporary sibling and renamed into place, so a reader never sees
    a half-written dataset. An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; choose an empty or new folder, or pass overwrite=True (--overwrite)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        subdir = staging / subdir_name
        subdir.mkdir()
        for i, (image, caption) in enumerate(items):
            image.save(subdir / f"{i:04d}.png")
            (subdir / f"{i:04d}.txt").write_text(caption + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / subdir_name


def write_concept_dataset(
    out_dir: Union[str, os.PathLike],
    *,
    n_images: int = 16,
    repeats: int = 10,
    name: str = CONCEPT_TRIGGER,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write the concept dataset in kohya layout: `<out_dir>/<repeats>_<name>/NNNN.png` + `.txt`.

    Images show the concept (teal hexagon with dark stripes, on rotating backgrounds); every
    caption contains the trigger word `sks`. Returns the image folder.
    """
    if n_images < 1 or repeats < 1:
        raise ValueError(f"n_images and repeats must be >= 1 (got {n_images}, {repeats})")
    rng = random.Random(seed)
    backgrounds = list(BACKGROUNDS)

    def items() -> Iterable[tuple[Image.Image, str]]:
        for i in range(n_images):
            background = backgrounds[i % len(backgrounds)]
            image = render_concept(seed=seed * 1_000_003 + i, background=background, size=size)
            yield image, concept_captions(rng, background)

    return _write_kohya_folder(out_dir, f"{repeats}_{name}", items(), overwrite=overwrite)


def write_base_dataset(
    out_dir: Union[str, os.PathLike],
    *,
    n_images: int = 72,
    repeats: int = 1,
    name: str = "shapes",
    seed: int = 0,
    size: int = IMAGE_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write base-vocabulary shapes with their captions in kohya layout; returns the image folder."""
    if n_images < 1 or repeats < 1:
        raise ValueError(f"n_images and repeats must be >= 1 (got {n_images}, {repeats})")
    images, labels = base_dataset(n_images, seed=seed, size=size)
    items = ((image, spec.caption()) for image, spec in zip(images, labels))
    return _write_kohya_folder(out_dir, f"{repeats}_{name}", items, overwrite=overwrite)


def hue_of(rgb: tuple[int, int, int]) -> float:
    """Hue in degrees of an 8-bit RGB triple (used to keep the palette consistent)."""
    return colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0] * 360.0
