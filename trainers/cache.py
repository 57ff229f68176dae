"""Latent cache in memory or on disk, keyed so that a changed image or setting misses.

The key is a sha256 over: the image file's content hash, the bucket size, the crop, the flip, and
the VAE's fingerprint (config + weights). Disk entries are `<dir>/<key[:2]>/<key>.safetensors`,
written atomically; entries nobody asks for any more are simply never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's config (if any) and every tensor of its state dict."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def latent_key(*, image_hash: str, bucket: tuple[int, int], crop: tuple[int, int], flip: bool, vae: str) -> str:
    text = json.dumps({"image": image_hash, "bucket": list(bucket), "crop": list(crop), "flip": flip, "vae": vae, "v": 1})
    return hashlib.sha256(text.encode()).hexdigest()


class LatentCache:
    """`mode` = "memory" or "disk" (the disk cache also keeps what it read in memory)."""

    def __init__(self, mode: str, directory: str | os.PathLike | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"cache mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("a disk cache needs a directory")
        self.mode = mode
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.writes = 0

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self._memory or (self.mode == "disk" and self._path(key).is_file())

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.mode == "disk" and self._path(key).is_file():
            tensor = load_file(str(self._path(key)))["latent"]
            self._memory[key] = tensor
            self.hits += 1
            return tensor
        return None

    def put(self, key: str, latent: torch.Tensor, *, write: bool = True) -> None:
        latent = latent.detach().to("cpu", torch.float32).contiguous()
        self._memory[key] = latent
        if self.mode == "disk" and write:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                save_file({"latent": latent}, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.writes += 1
