"""Reading and writing safetensors containers safely: header validation, atomic writes, no clobbering."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch
from torch import Tensor

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024


class AdapterFileError(ValueError):
    """A problem with an adapter file; the message names the file and what to do."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


def read_header(path: str | os.PathLike) -> dict:
    """The parsed safetensors JSON header, after checking the container is complete."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(path, "no such file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise AdapterFileError(path, f"only {size} bytes: not a safetensors file (too short for a header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise AdapterFileError(path, "not a safetensors file (the header length is impossible); is it a .ckpt/pickle or a truncated download?")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdapterFileError(path, f"corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(path, "corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        end = entry.get("data_offsets", [0, 0])[1] if isinstance(entry, dict) else None
        if end is None or end > data_len:
            raise AdapterFileError(path, f"truncated file: tensor {key!r} ends at byte {end} but the data section has {data_len} bytes; download it again")
    return header


def read_tensors(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file. Pickle files (.ckpt/.pt) only with allow_pickle=True,
    and then with weights_only=True so no code in the file can run."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle=allow_pickle), {}
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise AdapterFileError(path, f"cannot read tensors ({err})") from None
    return tensors, dict(metadata)


def _read_pickle(path: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    if not allow_pickle:
        raise AdapterFileError(
            path,
            "pickle checkpoints can run code when loaded and are refused; convert it with "
            "`lyco-convert --allow-pickle IN OUT.safetensors` if you trust its source",
        )
    if not path.is_file():
        raise AdapterFileError(path, "no such file")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise AdapterFileError(path, f"cannot read as a weights-only torch checkpoint ({err})") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise AdapterFileError(path, "the checkpoint is not a flat mapping of tensors")
    return dict(loaded)


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write bytes to path through a temporary file in the same folder and a rename, so a crash
    never leaves a half-written file; refuse to replace an existing file unless overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def serialize(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return safetensors.torch.save(contiguous, metadata=dict(metadata) if metadata else None)
