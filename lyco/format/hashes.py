"""Adapter hashes as sd-scripts computes them (FORMAT.md §3.4), which A1111 shows and prefers."""
from __future__ import annotations

import hashlib
import struct
from typing import Mapping

from torch import Tensor

from .container import serialize


def data_section(blob: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", blob[:8])
    return blob[8 + header_len :]


def model_hash(blob: bytes) -> str:
    """`sshs_model_hash`: sha256 of the tensor data section (independent of metadata)."""
    return hashlib.sha256(data_section(blob)).hexdigest()


def legacy_hash(blob: bytes) -> str:
    """`sshs_legacy_hash`: first 8 hex of sha256 of the 64 KiB at offset 1 MiB of the serialized file."""
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def sd_scripts_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(model hash, legacy hash) of the file sd-scripts would serialise: the tensors with only ss_* metadata."""
    blob = serialize(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return model_hash(blob), legacy_hash(blob)


def file_model_hash(path: str) -> str:
    """The same data-section hash read from an existing file (A1111's addnet_hash_safetensors)."""
    with open(path, "rb") as handle:
        return model_hash(handle.read())
