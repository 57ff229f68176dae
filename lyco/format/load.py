"""Loading an adapter file into a model: resolve keys, validate everything, then attach."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from torch import nn

from .. import naming
from ..layer import LycoLayer
from ..network import LycoNetwork, detect_family
from . import detect
from .adapter_file import AdapterFile, ModuleEntry, _preview, load_adapter_file
from .container import AdapterFileError


@dataclass
class LoadResult:
    network: LycoNetwork
    skipped_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_network(
    parts: Mapping[str, nn.Module],
    adapter: AdapterFile | str | os.PathLike,
    *,
    family: str | None = None,
    strength: float = 1.0,
    strict: bool = True,
    allow_pickle: bool = False,
) -> LoadResult:
    """Attach the adapters of a file (or parsed AdapterFile) to a model given as {part: module}.

    Every key is matched and every shape checked before the model is touched: in strict mode any
    problem raises AdapterFileError naming the file and keys and nothing changes; otherwise the
    modules that fit are loaded and the rest are returned in `skipped_keys`."""
    if not isinstance(adapter, AdapterFile):
        adapter = load_adapter_file(adapter, allow_pickle=allow_pickle, strict=strict)
    family = family or detect_family(parts)
    table = naming.build_key_table(parts, family=family)
    planned: list[tuple[str, str, LycoLayer]] = []
    skipped = list(adapter.unparsed_keys)
    problems: list[str] = []
    claimed: dict[tuple[str, str], str] = {}
    unmatched: list[str] = []
    for entry in adapter.modules.values():
        target = table.lookup(entry.key)
        if target is None:
            unmatched.append(entry.key)
            skipped.extend(entry.source_keys())
            continue
        if target in claimed:
            problems.append(f"{entry.key} and {claimed[target]} both name {target[0]}.{target[1]}")
            skipped.extend(entry.source_keys())
            continue
        claimed[target] = entry.key
        try:
            layer = _build_layer(parts, target, entry, table.written[target], strength)
        except (ValueError, TypeError) as err:
            problems.append(str(err))
            skipped.extend(entry.source_keys())
            continue
        planned.append((target[0], target[1], layer))
    if unmatched:
        problems.insert(0, _unmatched_message(unmatched, adapter, family, parts))
    if problems and strict:
        raise AdapterFileError(adapter.source, "cannot be loaded into this model:\n  " + "\n  ".join(problems)
                               + "\n(nothing was changed; pass strict=False / --non-strict to load the modules that fit)")
    if not planned:
        raise AdapterFileError(adapter.source, "no module of the file matches this model:\n  " + "\n  ".join(problems))
    network = LycoNetwork(parts, family=family)
    for part, path, layer in planned:
        network.add_layer(part, path, layer)
    return LoadResult(network, skipped, problems)


def _build_layer(parts: Mapping[str, nn.Module], target: tuple[str, str], entry: ModuleEntry, key: str, strength: float) -> LycoLayer:
    part, path = target
    module = parts[part].get_submodule(path)
    try:
        return LycoLayer(module, algo=entry.algo, tensors=entry.tensors, alpha=entry.alpha, dora_scale=entry.dora_scale, name=key, strength=strength)
    except (ValueError, TypeError) as err:
        shapes = {s: tuple(t.shape) for s, t in entry.tensors.items()}
        raise ValueError(f"{entry.key}: {entry.algo} tensors {shapes} do not fit {part}.{path} ({err})") from None


def _unmatched_message(unmatched: list[str], adapter: AdapterFile, family: str, parts: Mapping[str, nn.Module]) -> str:
    file_family, scheme = detect.detect_family_from_keys(adapter.modules)
    hint = ""
    if file_family and file_family != family and not (family in ("sd1", "sd2") and file_family in ("sd1", "sd2")):
        hint = f" The file looks like a {file_family} adapter but the model is {family}: use a matching base model."
    return f"{len(unmatched)} modules match nothing in the model parts {sorted(parts)}: {_preview(unmatched)}.{hint}"
