"""Turning an epoch's global batches into this process's tensors, and filling the latent cache."""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from .cache import LatentCache, file_hash, latent_key
from .data import Dataset, ImageItem, sample_seed


def rank_slice(batch: Sequence[int], *, rank: int, world: int) -> list[tuple[int, int]]:
    """(slot, item) pairs of this process's share of a global batch. A short final batch is padded
    (cycling its own items) so that every process gets the same, non-zero number of samples."""
    entries = list(enumerate(batch))
    if world > 1:
        while len(entries) % world:
            entries.append((len(entries), batch[len(entries) % len(batch)]))
    share = len(entries) // world
    return entries[rank * share:(rank + 1) * share]


def encode_latents(vae: Any, pixels: Tensor, seeds: Sequence[int]) -> Tensor:
    """VAE latents sampled from each image's posterior with its own seed, scaled like the pipelines."""
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        latents = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


class LatentKeys:
    """Cache keys of every (item, flip) the run can ask for."""

    def __init__(self, vae_fingerprint: str) -> None:
        self.vae = vae_fingerprint
        self._hashes: dict[str, str] = {}

    def key(self, item: ImageItem, flip: bool) -> str:
        path = str(item.path)
        if path not in self._hashes:
            self._hashes[path] = file_hash(item.path)
        top_left = _center_crop(item)
        return latent_key(image_hash=self._hashes[path], bucket=item.bucket, crop=top_left, flip=flip, vae=self.vae)


def _center_crop(item: ImageItem) -> tuple[int, int]:
    width, height = item.size
    scale = max(item.bucket[0] / width, item.bucket[1] / height)
    resized = (max(item.bucket[0], round(width * scale)), max(item.bucket[1], round(height * scale)))
    return ((resized[1] - item.bucket[1]) // 2, (resized[0] - item.bucket[0]) // 2)


def fill_latent_cache(dataset: Dataset, vae: Any, cache: LatentCache, keys: LatentKeys, *, batch_size: int,
                      rank: int = 0, world: int = 1, progress: Callable[[int, int], None] | None = None) -> int:
    """Encode every (item, flip) this run uses that the cache lacks; on disk, processes split the work.
    Returns the number of latents encoded here."""
    wanted: list[tuple[ImageItem, bool, str]] = []
    for item in dataset.items + dataset.val_items:
        flips = (False, True) if dataset.subsets[item.subset].flip_aug else (False,)
        wanted += [(item, flip, keys.key(item, flip)) for flip in flips]
    missing = [w for w in wanted if w[2] not in cache]
    if cache.mode == "disk":
        missing = missing[rank::world]
    by_bucket: dict[tuple[int, int], list] = {}
    for entry in missing:
        by_bucket.setdefault(entry[0].bucket, []).append(entry)
    done = 0
    for entries in by_bucket.values():
        for start in range(0, len(entries), batch_size):
            chunk = entries[start:start + batch_size]
            pixels = torch.stack([dataset.load_pixels(item, flip=flip, rng=None)[0] for item, flip, _ in chunk])
            latents = encode_latents(vae, pixels, [sample_seed("cache", key) for _, _, key in chunk])
            for (_, _, key), latent in zip(chunk, latents):
                cache.put(key, latent)
            done += len(chunk)
            if progress:
                progress(done, len(missing))
    return done


class BatchSource:
    """Builds this process's part of a global batch: latents (cached) or pixels, captions, seeds, SDXL sizes."""

    def __init__(self, dataset: Dataset, *, rank: int, world: int, prior_loss_weight: float,
                 cache: LatentCache | None = None, keys: LatentKeys | None = None) -> None:
        self.dataset, self.rank, self.world = dataset, rank, world
        self.prior_loss_weight = prior_loss_weight
        self.cache, self.keys = cache, keys

    def build(self, epoch: int, batch_index: int, batch: Sequence[int]) -> dict[str, Any]:
        samples = []
        for slot, item_index in rank_slice(batch, rank=self.rank, world=self.world):
            plan = self.dataset.sample_plan(item_index, epoch, (batch_index, slot))
            samples.append(self._sample(self.dataset.items[item_index], plan))
        return collate(samples)

    def validation_batches(self, batch_size: int) -> list[dict[str, Any]]:
        """This process's share of the held-out items: raw captions, no augmentation, fixed seeds."""
        items = list(enumerate(self.dataset.val_items))[self.rank::self.world]
        samples = []
        for index, item in items:
            plan = {"caption": item.caption, "flip": False, "crop_seed": None, "is_reg": False,
                    "noise_seed": sample_seed("validation-noise", self.dataset.seed, index)}
            samples.append(self._sample(item, plan))
        groups: dict[tuple[int, int], list] = {}
        for sample in samples:
            groups.setdefault(sample["target_size"], []).append(sample)
        return [collate(group[i:i + batch_size]) for group in groups.values() for i in range(0, len(group), batch_size)]

    def _sample(self, item: ImageItem, plan: dict) -> dict[str, Any]:
        sample: dict[str, Any] = {"caption": plan["caption"], "noise_seed": plan["noise_seed"],
                                  "weight": self.prior_loss_weight if plan["is_reg"] else 1.0,
                                  "original_size": (item.size[1], item.size[0]),
                                  "target_size": (item.bucket[1], item.bucket[0])}
        if self.cache is not None and self.keys is not None:
            latent = self.cache.get(self.keys.key(item, plan["flip"]))
            if latent is None:
                raise RuntimeError(f"latent of {item.path} is missing from the cache")
            sample["latent"], sample["crop"] = latent, _center_crop(item)
        else:
            rng = random.Random(plan["crop_seed"]) if plan["crop_seed"] is not None else None
            sample["pixels"], sample["crop"] = self.dataset.load_pixels(item, flip=plan["flip"], rng=rng)
            sample["vae_seed"] = sample_seed("vae", plan["noise_seed"])
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "captions": [s["caption"] for s in samples],
        "noise_seeds": [s["noise_seed"] for s in samples],
        "weights": torch.tensor([s["weight"] for s in samples], dtype=torch.float32),
        "original_sizes": [s["original_size"] for s in samples],
        "crops": [s["crop"] for s in samples],
        "target_sizes": [s["target_size"] for s in samples],
    }
    if "latent" in samples[0]:
        batch["latents"] = torch.stack([s["latent"] for s in samples])
    else:
        batch["pixels"] = torch.stack([s["pixels"] for s in samples])
        batch["vae_seeds"] = [s["vae_seed"] for s in samples]
    return batch


class _EpochView(TorchDataset):
    def __init__(self, source: BatchSource, epoch: int, batches: list[list[int]], start: int) -> None:
        self.source, self.epoch, self.batches, self.start = source, epoch, batches, start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, index: int) -> dict[str, Any]:
        b = self.start + index
        return self.source.build(self.epoch, b, self.batches[b])


def epoch_loader(source: BatchSource, epoch: int, batches: list[list[int]], *, start: int, num_workers: int) -> DataLoader:
    """Batches `start..` of an epoch, in order (the order itself was shuffled by `epoch_batches`)."""
    # Its own generator: creating the iterator must not draw from the global RNG (which adapter dropout
    # uses and a resumed run restores), or resumed runs would diverge.
    return DataLoader(_EpochView(source, epoch, batches, start), batch_size=None, shuffle=False, num_workers=num_workers,
                      persistent_workers=False, generator=torch.Generator().manual_seed(epoch))
