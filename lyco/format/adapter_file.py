"""AdapterFile: an adapter file parsed into per-module entries, without any model (the stand-alone state)."""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from ..algos import detect_algorithm, get_algorithm, known_keys
from .container import AdapterFileError, read_tensors
from .keys import is_dotted, split_key

EXTRA_SUFFIXES = ("alpha", "dora_scale")
PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass
class ModuleEntry:
    """One module's tensors from a file: its algorithm, tensors by kohya suffix, alpha and DoRA scale."""

    key: str
    algo: str
    tensors: dict[str, Tensor]
    alpha: float | None = None
    dora_scale: Tensor | None = None

    @property
    def rank(self) -> int | None:
        return get_algorithm(self.algo).scale_rank(self.tensors)

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if rank and self.alpha is not None else 1.0

    def source_keys(self) -> list[str]:
        keys = [f"{self.key}.{s}" for s in self.tensors]
        if self.alpha is not None:
            keys.append(f"{self.key}.alpha")
        if self.dora_scale is not None:
            keys.append(f"{self.key}.dora_scale")
        return keys


@dataclass
class AdapterFile:
    source: str
    modules: dict[str, ModuleEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    unparsed_keys: list[str] = field(default_factory=list)

    def algorithms(self) -> Counter:
        return Counter(entry.algo for entry in self.modules.values())


def load_adapter_file(path: str | os.PathLike, *, allow_pickle: bool = False, strict: bool = True) -> AdapterFile:
    tensors, metadata = read_tensors(path, allow_pickle=allow_pickle)
    return parse_adapter(tensors, metadata, source=str(path), strict=strict)


def parse_adapter(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *, source: str = "<memory>", strict: bool = True
) -> AdapterFile:
    """Group keys by module, detect each module's algorithm, check values are finite.

    strict: keys that belong to no known form are an error (naming them); otherwise they are kept
    in `unparsed_keys` for the caller to report."""
    metadata = dict(metadata or {})
    grouped: dict[str, dict[str, Tensor]] = {}
    unparsed: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            unparsed.append(key)
            continue
        module, suffix = split
        grouped.setdefault(module, {})[suffix] = tensor
    _check_finite(source, tensors)
    peft_alphas = _PeftAlphas.from_metadata(metadata)
    modules: dict[str, ModuleEntry] = {}
    for module, parts in grouped.items():
        entry = _module_entry(module, parts, peft_alphas)
        if entry is None:
            unparsed.extend(f"{module}.{s}" for s in parts)
        else:
            modules[module] = entry
    if unparsed and strict:
        raise AdapterFileError(source, f"{len(unparsed)} keys belong to no supported adapter form: {_preview(unparsed)} "
                               "(supported: LoRA/LoCon, LoHa, LoKr, DoRA; pass strict=False / --non-strict to skip them)")
    if not modules:
        raise AdapterFileError(source, "contains no adapter modules (is it a full model checkpoint rather than a LoRA?)")
    return AdapterFile(source, modules, metadata, unparsed)


def _module_entry(module: str, parts: dict[str, Tensor], peft_alphas: "_PeftAlphas") -> ModuleEntry | None:
    algo_keys = {s for s in parts if s not in EXTRA_SUFFIXES}
    algo = detect_algorithm(algo_keys)
    if algo is None or algo_keys - known_keys(algo):
        return None
    alpha_tensor = parts.get("alpha")
    alpha = float(alpha_tensor.float().item()) if alpha_tensor is not None else None
    tensors = {s: parts[s] for s in algo_keys}
    dora_scale = parts.get("dora_scale")
    if is_dotted(module):
        if alpha is None:
            alpha = peft_alphas.alpha_for(module, algo.scale_rank(tensors))
        if dora_scale is not None:
            # PEFT's lora_magnitude_vector is always per output channel: (out,) for Linear but
            # (1, out, 1, 1) for Conv2d, which would read as LyCORIS's input-axis (1, in, 1, 1).
            dora_scale = dora_scale.reshape(-1)
    return ModuleEntry(module, algo.NAME, tensors, alpha, dora_scale)


def _check_finite(source: str, tensors: Mapping[str, Tensor]) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(source, f"NaN or Inf values in {len(bad)} tensors: {_preview(bad)}; the file is damaged or the training diverged")


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass(frozen=True)
class _PeftAlphas:
    """diffusers' `lora_adapter_metadata`: per component lora_alpha / alpha_pattern (scale = alpha / r)."""

    config: Mapping[str, object]

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "_PeftAlphas":
        raw = metadata.get(PEFT_METADATA_KEY)
        try:
            return cls(json.loads(raw) if raw else {})
        except json.JSONDecodeError:
            return cls({})

    def alpha_for(self, module: str, rank: int | None) -> float | None:
        component, _, path = module.partition(".")
        pattern = self.config.get(f"{component}.alpha_pattern") or {}
        for key, value in dict(pattern).items():
            if re.match(rf"(.*\.)?({key})$", path):
                return self._stored(component, value, rank)
        alpha = self.config.get(f"{component}.lora_alpha")
        return self._stored(component, alpha, rank)

    def _stored(self, component: str, alpha: object, rank: int | None) -> float | None:
        """The kohya-style stored alpha (scale = stored / r) for a PEFT alpha; rsLoRA scales by alpha / sqrt(r)."""
        if alpha is None:
            return None
        if self.config.get(f"{component}.use_rslora") and rank:
            return float(alpha) * math.sqrt(rank)
        return float(alpha)
