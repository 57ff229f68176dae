"""Training data: subsets of captioned images, buckets, deterministic epochs and batches.

Everything random about a sample (caption shuffle/dropout, flip, crop, VAE sampling, diffusion
noise) is drawn from a generator seeded by (seed, epoch, position in the epoch), never from global
state. So an epoch's batches do not depend on the number of processes, and a resumed run sees
exactly the samples an uninterrupted run would.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .buckets import BucketSettings, Size, bucket_for, fit_to_bucket, make_buckets, summary
from .captions import CaptionOptions, process_caption, read_caption, tag_frequency
from .config import DatasetSection

log = logging.getLogger("lyco.train")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    num_repeats: int
    class_tokens: str | None
    is_reg: bool
    caption_extension: str
    captions: CaptionOptions
    flip_aug: bool
    random_crop: bool


@dataclass
class ImageItem:
    path: Path
    caption: str
    subset: int
    size: Size
    bucket: Size = (0, 0)
    content_hash: str = ""


@dataclass
class Dataset:
    subsets: list[Subset]
    items: list[ImageItem]
    val_items: list[ImageItem]
    settings: BucketSettings
    seed: int
    skipped: list[str] = field(default_factory=list)

    # ----- epochs ----------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, global_batch: int) -> list[list[int]]:
        """Global batches (item indices) of one epoch: every item `num_repeats` times, grouped by
        bucket, shuffled from (seed, epoch), chunked to `global_batch`, batch order shuffled."""
        rng = random.Random(sample_seed("epoch", self.seed, epoch))
        by_bucket: dict[Size, list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([index] * self.subsets[item.subset].num_repeats)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            entries = by_bucket[bucket]
            rng.shuffle(entries)
            batches.extend(entries[i:i + global_batch] for i in range(0, len(entries), global_batch))
        rng.shuffle(batches)
        return batches

    def uses_per_epoch(self) -> int:
        return sum(self.subsets[item.subset].num_repeats for item in self.items)

    # ----- samples ---------------------------------------------------------------------------------
    def caption_for(self, item: ImageItem, rng: random.Random) -> str:
        return process_caption(item.caption, self.subsets[item.subset].captions, rng)

    def load_pixels(self, item: ImageItem, *, flip: bool, rng: random.Random | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(3, H, W) in [-1, 1] at the item's bucket, and the crop's (top, left)."""
        with Image.open(item.path) as image:
            image = image.convert("RGB")
        image, crop = fit_to_bucket(image, item.bucket, rng=rng)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), crop

    def sample_plan(self, item_index: int, epoch: int, position: int) -> dict:
        """The random choices for one use of an item: caption, flip, crop rng, noise seed."""
        item = self.items[item_index]
        subset = self.subsets[item.subset]
        rng = random.Random(sample_seed("sample", self.seed, epoch, position))
        caption = self.caption_for(item, rng)
        flip = subset.flip_aug and rng.random() < 0.5
        crop_seed = rng.getrandbits(62) if subset.random_crop else None
        return {"item": item_index, "caption": caption, "flip": flip, "crop_seed": crop_seed,
                "noise_seed": sample_seed("noise", self.seed, epoch, position), "is_reg": subset.is_reg}

    def summary_lines(self) -> list[str]:
        lines = []
        for i, subset in enumerate(self.subsets):
            count = sum(1 for item in self.items if item.subset == i)
            held = sum(1 for item in self.val_items if item.subset == i)
            kind = "reg " if subset.is_reg else ""
            lines.append(f"{kind}subset {subset.image_dir}: {count} images x {subset.num_repeats} repeats"
                         + (f" (+{held} held out for validation)" if held else ""))
        lines += summary([item.bucket for item in self.items], [self.subsets[item.subset].num_repeats for item in self.items])
        return lines

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for i, subset in enumerate(self.subsets):
            captions = [item.caption for item in self.items if item.subset == i]
            out[f"{subset.num_repeats}_{subset.image_dir.name}" if not _KOHYA_FOLDER.match(subset.image_dir.name) else subset.image_dir.name] = tag_frequency(captions, subset.captions.separator)
        return out


# ----- building --------------------------------------------------------------------------------------
def resolve_subsets(config: DatasetSection) -> list[Subset]:
    """Explicit subsets plus every `<repeats>_<name>` folder of train_data_dir / reg_data_dir."""
    specs: list[tuple[Path, int | None, str | None, bool, object]] = []
    for parent, is_reg in ((config.train_data_dir, False), (config.reg_data_dir, True)):
        if parent is None:
            continue
        folders = sorted(p for p in Path(parent).iterdir() if p.is_dir() and _KOHYA_FOLDER.match(p.name))
        if not folders:
            raise ValueError(f"dataset: {parent} has no `<repeats>_<name>` folders (e.g. 10_sks); use [[dataset.subsets]] for plain folders")
        specs += [(folder, None, None, is_reg, None) for folder in folders]
    specs += [(Path(s.image_dir), s.num_repeats, s.class_tokens, s.is_reg, s) for s in config.subsets]
    return [_subset(config, *spec) for spec in specs]


def _subset(config: DatasetSection, folder: Path, repeats: int | None, class_tokens: str | None, is_reg: bool, explicit) -> Subset:
    match = _KOHYA_FOLDER.match(folder.name)
    if repeats is None:
        repeats = int(match.group(1)) if match else 1
    if class_tokens is None and match:
        class_tokens = match.group(2).replace("_", " ").strip() or None

    def pick(name: str):
        value = getattr(explicit, name, None) if explicit is not None else None
        return getattr(config, name) if value is None else value

    captions = CaptionOptions(pick("shuffle_caption"), pick("keep_tokens"), config.caption_separator,
                              pick("caption_dropout_rate"), pick("caption_tag_dropout_rate"))
    return Subset(folder, max(1, repeats), class_tokens, is_reg, pick("caption_extension"), captions, pick("flip_aug"), pick("random_crop"))


def scan_subset(index: int, subset: Subset, *, on_corrupt: str, warn: Callable[[str], None]) -> tuple[list[ImageItem], list[str]]:
    """Readable images of a subset with their captions; unreadable ones are skipped (named) or raise."""
    items, skipped = [], []
    for path in sorted(p for p in subset.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        try:
            with Image.open(path) as image:
                image.load()
                size = image.size
        except Exception as err:  # PIL raises many types for broken files
            if on_corrupt == "error":
                raise ValueError(f"dataset: cannot read image {path}: {err} (set dataset.on_corrupt_image = 'skip' to skip it)") from None
            warn(f"skipping unreadable image {path}: {err}")
            skipped.append(str(path))
            continue
        caption = read_caption(path, subset.caption_extension)
        if caption is None:
            if subset.class_tokens is None:
                warn(f"{path} has no caption file ({subset.caption_extension}) and its subset no class_tokens: training it with an empty caption")
            caption = subset.class_tokens or ""
        items.append(ImageItem(path, caption, index, size))
    return items, skipped


def build_dataset(config: DatasetSection, *, resolution: Size, seed: int, warn: Callable[[str], None] = log.warning) -> Dataset:
    subsets = resolve_subsets(config)
    settings = bucket_settings(config, resolution)
    buckets = make_buckets(settings)
    items: list[ImageItem] = []
    skipped: list[str] = []
    for index, subset in enumerate(subsets):
        found, bad = scan_subset(index, subset, on_corrupt=config.on_corrupt_image, warn=warn)
        if not found:
            warn(f"subset {subset.image_dir} has no readable images")
        items += found
        skipped += bad
    if not items:
        raise ValueError("dataset: no readable images in " + ", ".join(str(s.image_dir) for s in subsets))
    for item in items:
        item.bucket = bucket_for(item.size, settings, buckets)
    train, val = split_validation(items, subsets, config.validation_split, seed)
    return Dataset(subsets, train, val, settings, seed, skipped)


def bucket_settings(config: DatasetSection, resolution: Size) -> BucketSettings:
    side = min(resolution)
    step = config.bucket_reso_steps
    min_size = config.min_bucket_reso or max(step, side // 2 // step * step)
    max_size = config.max_bucket_reso or max(resolution) * 2
    return BucketSettings(resolution, config.enable_bucket, min_size, max_size, step, config.bucket_no_upscale)


def split_validation(items: list[ImageItem], subsets: Sequence[Subset], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    candidates = [i for i, item in enumerate(items) if not subsets[item.subset].is_reg]
    if fraction <= 0 or len(candidates) < 2:
        return items, []
    count = min(len(candidates) - 1, max(1, round(len(candidates) * fraction)))
    held = set(random.Random(sample_seed("validation", seed)).sample(candidates, count))
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]
