"""Saving a network as a community-compatible safetensors adapter."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from ..network import LycoNetwork
from .container import serialize, write_atomic
from .hashes import sd_scripts_hashes
from .metadata import BaseModelInfo, build_metadata

SAVE_DTYPES = {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(precision: str | torch.dtype | None) -> torch.dtype | None:
    if precision is None or isinstance(precision, torch.dtype):
        return precision
    try:
        return SAVE_DTYPES[precision]
    except KeyError:
        raise ValueError(f"save precision must be one of {sorted(SAVE_DTYPES)}, got {precision!r}") from None


def save_network(
    network: LycoNetwork,
    path: str | os.PathLike,
    *,
    precision: str | torch.dtype | None = None,
    base: BaseModelInfo | None = None,
    title: str | None = None,
    metadata: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapter (every tensor, alpha included, cast to `precision` as sd-scripts does) with
    ss_*/modelspec metadata and sd-scripts hashes; atomic, and never replaces a file unless overwrite."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files are written as .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    tensors = network.adapter_state_dict(dtype=resolve_dtype(precision))
    full = build_metadata(network, base=base, title=title or path.stem, extra=metadata)
    model_hash, legacy_hash = sd_scripts_hashes(tensors, full)
    full["sshs_model_hash"] = model_hash
    full["sshs_legacy_hash"] = legacy_hash
    return write_atomic(path, serialize(tensors, full), overwrite=overwrite)
