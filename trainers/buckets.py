"""Aspect-ratio buckets (sd-scripts' scheme) and resizing an image to its bucket."""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketSettings:
    resolution: Size
    enabled: bool = False
    min_size: int = 256
    max_size: int = 1024
    step: int = 64
    no_upscale: bool = False

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


def make_buckets(settings: BucketSettings) -> list[Size]:
    """All (w, h) with sides in [min, max], multiples of step and area <= the resolution's area."""
    step, area = settings.step, settings.max_area
    buckets: set[Size] = set()
    width = max(settings.min_size, step) // step * step
    while width <= settings.max_size:
        height = min(settings.max_size, area // width // step * step)
        if height >= settings.min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    if not buckets:
        buckets.add(settings.resolution)
    return sorted(buckets)


def bucket_for(size: Size, settings: BucketSettings, buckets: list[Size]) -> Size:
    """The bucket an image of `size` goes to."""
    if not settings.enabled:
        return settings.resolution
    width, height = size
    if settings.no_upscale:
        scale = min(1.0, math.sqrt(settings.max_area / (width * height)))
        step = settings.step
        return (max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: Size, *, rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `image` to cover `bucket` (keeping its aspect) and crop: center, or random when `rng`.
    Returns the image and the crop's (top, left) in resized pixels (SDXL's crop conditioning)."""
    width, height = image.size
    scale = max(bucket[0] / width, bucket[1] / height)
    resized_size = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    if resized_size != image.size:
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize(resized_size, resample)
    spare_x, spare_y = resized_size[0] - bucket[0], resized_size[1] - bucket[1]
    if rng is not None:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return image.crop((left, top, left + bucket[0], top + bucket[1])), (top, left)


def summary(assigned: list[Size], repeats: list[int]) -> list[str]:
    """Lines `bucket WxH: N images (M with repeats)` sorted by size."""
    images = Counter(assigned)
    uses: Counter = Counter()
    for bucket, count in zip(assigned, repeats):
        uses[bucket] += count
    return [f"bucket {w}x{h}: {images[(w, h)]} images ({uses[(w, h)]} with repeats)" for (w, h) in sorted(images)]
