"""Training data: subsets and kohya folders, captions, buckets, epochs, corrupt images, latent cache invalidation."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainers.batching import BatchSource, LatentKeys, fill_latent_cache, rank_slice
from trainers.buckets import BucketSettings, bucket_for, fit_to_bucket, make_buckets
from trainers.cache import LatentCache
from trainers.captions import CaptionOptions, process_caption, read_caption
from trainers.config import DatasetSection
from trainers.data import build_dataset


def image(path: Path, size=(64, 64), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def dataset_config(**kwargs) -> DatasetSection:
    return DatasetSection.model_validate(kwargs)


@pytest.fixture()
def kohya(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for i in range(3):
        image(root / "5_sks dog" / f"{i}.png")
    (root / "5_sks dog" / "0.txt").write_text("a photo of sks dog, grass\n")
    image(root / "2_cat" / "a.jpg", (96, 64))
    (root / "2_cat" / "a.caption").write_text("cat on a sofa")
    (root / "notes").mkdir()  # not a <repeats>_<name> folder: ignored
    return root


def test_kohya_folders_repeats_class_tokens_and_captions(kohya):
    data = build_dataset(dataset_config(train_data_dir=str(kohya)), resolution=(64, 64), seed=0)
    repeats = {s.image_dir.name: s.num_repeats for s in data.subsets}
    assert repeats == {"2_cat": 2, "5_sks dog": 5}
    captions = {item.path.name: item.caption for item in data.items}
    assert captions == {"0.png": "a photo of sks dog, grass", "1.png": "sks dog", "2.png": "sks dog", "a.jpg": "cat"}
    assert data.uses_per_epoch() == 3 * 5 + 2
    # the caption extension is configurable (per subset too)
    data = build_dataset(dataset_config(train_data_dir=str(kohya), caption_extension=".caption"), resolution=(64, 64), seed=0)
    assert {i.path.name: i.caption for i in data.items}["a.jpg"] == "cat on a sofa"


def test_explicit_subsets_and_regularisation(tmp_path, kohya):
    image(tmp_path / "reg" / "r.png")
    config = dataset_config(subsets=[{"image_dir": str(kohya / "2_cat"), "num_repeats": 3, "class_tokens": "feline"},
                                     {"image_dir": str(tmp_path / "reg"), "is_reg": True, "class_tokens": "a dog"}])
    data = build_dataset(config, resolution=(64, 64), seed=0)
    assert [s.num_repeats for s in data.subsets] == [3, 1]
    assert [i.caption for i in data.items] == ["feline", "a dog"]  # explicit class_tokens win over the folder name
    source = BatchSource(data, rank=0, world=1, prior_loss_weight=0.25)
    batch = source.build(0, 0, [0, 1])
    assert batch["weights"].tolist() == [1.0, 0.25]
    assert batch["pixels"].shape == (2, 3, 64, 64) and batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1


def test_corrupt_images_are_skipped_with_their_name_or_fail(tmp_path):
    folder = tmp_path / "1_x"
    image(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    truncated = image(folder / "cut.png", (64, 64)).read_bytes()
    (folder / "cut.png").write_bytes(truncated[: len(truncated) // 2])
    warnings: list[str] = []
    data = build_dataset(dataset_config(train_data_dir=str(tmp_path)), resolution=(64, 64), seed=0, warn=warnings.append)
    assert [i.path.name for i in data.items] == ["good.png"]
    assert sorted(Path(p).name for p in data.skipped) == ["broken.png", "cut.png"]
    assert any("broken.png" in w for w in warnings) and any("cut.png" in w for w in warnings)
    with pytest.raises(ValueError, match="broken.png"):
        build_dataset(dataset_config(train_data_dir=str(tmp_path), on_corrupt_image="error"), resolution=(64, 64), seed=0)


def test_caption_shuffle_keep_tokens_and_dropouts():
    caption = "sks, red, blue, green, yellow"
    shuffled = process_caption(caption, CaptionOptions(shuffle=True, keep_tokens=1), random.Random(3))
    assert shuffled.startswith("sks, ") and sorted(shuffled.split(", ")) == sorted(caption.split(", "))
    seen = {process_caption(caption, CaptionOptions(shuffle=True, keep_tokens=1), random.Random(s)) for s in range(20)}
    assert len(seen) > 5 and all(s.startswith("sks, ") for s in seen)
    dropped = [process_caption(caption, CaptionOptions(tag_dropout_rate=0.5, keep_tokens=1), random.Random(s)) for s in range(50)]
    assert all(d.startswith("sks") for d in dropped) and min(len(d) for d in dropped) < len(caption)
    empties = sum(process_caption(caption, CaptionOptions(dropout_rate=0.3), random.Random(s)) == "" for s in range(200))
    assert 30 < empties < 90
    assert process_caption(caption, CaptionOptions(), random.Random(0)) == caption


def test_read_caption(tmp_path):
    img = image(tmp_path / "a.png")
    assert read_caption(img, ".txt") is None
    (tmp_path / "a.txt").write_text("\n  first line  \nsecond\n")
    assert read_caption(img, ".txt") == "first line" and read_caption(img, "txt") == "first line"


def test_buckets():
    settings = BucketSettings((512, 512), enabled=True, min_size=256, max_size=1024, step=64)
    buckets = make_buckets(settings)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) for w, h in buckets)
    assert bucket_for((1920, 1080), settings, buckets) == min(buckets, key=lambda b: abs(b[0] / b[1] - 16 / 9))
    assert bucket_for((1000, 1000), settings, buckets) == (512, 512)
    no_up = BucketSettings((512, 512), enabled=True, step=64, no_upscale=True)
    assert bucket_for((300, 200), no_up, []) == (256, 192)  # small images are never upscaled
    assert bucket_for((2048, 1024), no_up, []) == (704, 320)
    off = BucketSettings((64, 64))
    assert bucket_for((300, 100), off, make_buckets(off)) == (64, 64)
    wide = Image.new("RGB", (200, 100))
    cropped, (top, left) = fit_to_bucket(wide, (64, 64))
    assert cropped.size == (64, 64) and top == 0 and left == (128 - 64) // 2
    _, (_, rand_left) = fit_to_bucket(wide, (64, 64), rng=random.Random(1))
    assert 0 <= rand_left <= 64


def test_aspect_buckets_in_the_dataset(tmp_path):
    image(tmp_path / "1_a" / "wide.png", (256, 128))
    image(tmp_path / "1_a" / "tall.png", (128, 256))
    image(tmp_path / "1_a" / "square.png", (200, 200))
    config = dataset_config(train_data_dir=str(tmp_path), enable_bucket=True, resolution=128, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)
    data = build_dataset(config, resolution=(128, 128), seed=0)
    assert {i.path.name: i.bucket for i in data.items} == {"wide.png": (192, 64), "tall.png": (64, 192), "square.png": (128, 128)}
    assert any("bucket 192x64: 1 images" in line for line in data.summary_lines())
    for batch in data.epoch_batches(0, 2):
        assert len({data.items[i].bucket for i in batch}) == 1  # a batch never mixes buckets


def test_epochs_are_deterministic_and_complete(kohya):
    data = build_dataset(dataset_config(train_data_dir=str(kohya)), resolution=(64, 64), seed=7)
    epoch0 = data.epoch_batches(0, 4)
    assert epoch0 == data.epoch_batches(0, 4) and epoch0 != data.epoch_batches(1, 4)
    uses = Counter(i for batch in epoch0 for i in batch)
    assert {data.items[i].path.name: n for i, n in uses.items()} == {"0.png": 5, "1.png": 5, "2.png": 5, "a.jpg": 2}


def test_rank_slices_cover_the_global_batch_evenly():
    assert rank_slice([5, 6, 7, 8], rank=0, world=1) == [(0, 5), (1, 6), (2, 7), (3, 8)]
    a, b = rank_slice([5, 6, 7, 8], rank=0, world=2), rank_slice([5, 6, 7, 8], rank=1, world=2)
    assert a + b == [(0, 5), (1, 6), (2, 7), (3, 8)]
    a, b = rank_slice([5, 6, 7], rank=0, world=2), rank_slice([5, 6, 7], rank=1, world=2)
    assert len(a) == len(b) == 2 and [i for _, i in a + b][:3] == [5, 6, 7]


def test_validation_split_holds_out_non_reg_images(tmp_path):
    for i in range(10):
        image(tmp_path / "1_a" / f"{i}.png")
    config = dataset_config(train_data_dir=str(tmp_path), validation_split=0.2)
    data = build_dataset(config, resolution=(64, 64), seed=0)
    assert len(data.val_items) == 2 and len(data.items) == 8
    again = build_dataset(config, resolution=(64, 64), seed=0)
    assert [i.path for i in again.val_items] == [i.path for i in data.val_items]


class FakeVAE(torch.nn.Module):
    """Stands in for AutoencoderKL: 8x average pooling, fixed std."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(scale))
        self.config = type("C", (), {"scaling_factor": 0.5, "shift_factor": None})()
        self.calls = 0

    @property
    def device(self):
        return self.weight.device

    @property
    def dtype(self):
        return self.weight.dtype

    def encode(self, pixels):
        self.calls += len(pixels)
        mean = torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4] * self.weight
        return type("E", (), {"latent_dist": type("D", (), {"mean": mean, "std": torch.full_like(mean, 0.01)})()})()


def test_latent_cache_invalidation_on_disk(tmp_path):
    folder = tmp_path / "data" / "1_a"
    image(folder / "x.png", colour=(10, 200, 10))
    image(folder / "y.png")
    config = dataset_config(train_data_dir=str(tmp_path / "data"), flip_aug=True, cache_latents="disk")
    cache_dir = tmp_path / "cache"

    def run(vae, size=64, **kwargs):
        data = build_dataset(dataset_config(**{**config.model_dump(), **kwargs}), resolution=(size, size), seed=0)
        cache = LatentCache("disk", cache_dir)
        keys = LatentKeys(f"vae-{float(vae.weight.detach())}")
        encoded = fill_latent_cache(data, vae, cache, keys, batch_size=4)
        return data, cache, keys, encoded

    vae = FakeVAE()
    data, cache, keys, encoded = run(vae)
    assert encoded == 4  # 2 images x (plain, flipped)
    flipped = cache.get(keys.key(data.items[0], True))
    assert not torch.equal(flipped, cache.get(keys.key(data.items[0], False)))
    assert run(vae)[3] == 0  # a second run reads everything from disk
    image(folder / "y.png", colour=(0, 0, 250))  # a changed image is re-encoded, the other is not
    assert run(vae)[3] == 2
    assert run(vae, flip_aug=False)[3] == 0  # fewer variants: nothing new
    assert run(vae, size=128)[3] == 4  # another size: all new
    assert run(FakeVAE(scale=2.0))[3] == 4  # another VAE: all new
    source = BatchSource(data, rank=0, world=1, prior_loss_weight=1.0, cache=cache, keys=keys)
    batch = source.build(0, 0, [0, 1])
    assert batch["latents"].shape == (2, 4, 8, 8) and "pixels" not in batch


def test_memory_cache_encodes_once(tmp_path):
    image(tmp_path / "1_a" / "x.png")
    data = build_dataset(dataset_config(train_data_dir=str(tmp_path), cache_latents="memory"), resolution=(64, 64), seed=0)
    vae, cache = FakeVAE(), LatentCache("memory")
    keys = LatentKeys("v")
    assert fill_latent_cache(data, vae, cache, keys, batch_size=2) == 1
    assert fill_latent_cache(data, vae, cache, keys, batch_size=2) == 0 and vae.calls == 1
    assert not list(tmp_path.rglob("*.safetensors"))
