"""Merging adapters: bake them into a base model, or merge several into one adapter.

- `bake_adapters(parts, [(adapter, strength), ...])` writes W + Σ contributions into the model's own
  weights (any algorithm mix, DoRA included). The adapters are attached with
  `lyco.format.load_network` (several networks nest on the same layers), so the baked weights are by
  construction those of the unfused stack: per layer the outermost wrapper's `effective_weight()` in
  float32, cast once to the weight's dtype. Then every wrapper is removed.
- `merge_adapters([(adapter, strength), ...], mode=...)`:
  - "concat" (plain LoRA/LoCon only, exact): per module the factors are stacked along the rank, each
    adapter's strength·alpha/rank folded into its up factor, alpha = the new rank (scale 1);
  - "svd" (any algorithm): ΔW_total = Σ strength·contribution per module, cut to `rank` (fixed or
    dynamic, `conv_rank` for k x k convs) by truncated SVD, alpha = rank. Modules whose inputs are all
    plain LoRA are factorised from their stacked factors without forming ΔW. DoRA inputs need the
    base model (`base=`), because their contribution depends on W.
  Modules are matched across files by the layer they name, whatever the key style (kohya, SGM,
  `lycoris_`, PEFT); the output uses kohya keys for the family (SDXL: SGM names).

Strengths are a float or {part: float} ("unet", "text_encoder", "text_encoder_2"; missing parts 1.0).
`block_weights` (see lyco.tools.blocks) multiply the strength per UNet block / text encoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .. import naming
from ..format.adapter_file import AdapterFile, ModuleEntry, load_adapter_file
from ..format.container import AdapterFileError
from ..format.load import load_network
from ..layer import LycoLayer
from ..network import detect_family
from ..naming import UNetLayout
from ._common import infer_weight_shape, is_spatial, lora_factors, lora_network_metadata, progress, record_history, scaled_delta
from .blocks import BlockWeights, parse_block_weights
from .convert import ModuleId, default_layout, detect_family as detect_file_family, kohya_key, parse_module_key
from .svd import LowRank, RankRule, as_matrix, factored_svd, lora_tensors, truncated_svd

AdapterSource = Union[AdapterFile, str, os.PathLike]
Strength = Union[float, Mapping[str, float]]
MERGE_MODES = ("concat", "svd")


def part_strength(strength: Strength, part: str) -> float:
    if isinstance(strength, Mapping):
        return float(strength.get(part, strength.get("default", 1.0)))
    return float(strength)


def _describe(strength: Strength) -> object:
    return dict(strength) if isinstance(strength, Mapping) else float(strength)


# ----- bake into a model -------------------------------------------------------------------------------


@dataclass
class BakeReport:
    family: str
    modules_per_adapter: list[int] = field(default_factory=list)
    skipped_keys: list[list[str]] = field(default_factory=list)
    layers_changed: int = 0


@torch.no_grad()
def bake_adapters(
    parts: Mapping[str, nn.Module],
    adapters: Sequence[tuple[AdapterSource, Strength]],
    *,
    family: str | None = None,
    block_weights: BlockWeights | str | Mapping[str, float] | Sequence[float] | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    show_progress: bool = False,
) -> BakeReport:
    """Add the adapters (at their strengths) to the weights of `parts` ({"unet": ..., "text_encoder": ...}).

    The model is changed in place; every module object stays where it was. In strict mode a file
    that does not fit the model raises before any weight changes."""
    if not adapters:
        raise ValueError("no adapters to bake")
    family = family or detect_family(parts)
    weights = block_weights if isinstance(block_weights, BlockWeights) or block_weights is None else parse_block_weights(block_weights, family=family)
    layout = _layout_of(parts, family)
    report = BakeReport(family)
    attached = []
    try:
        for source, strength in adapters:
            result = load_network(parts, source, family=family, strict=strict, allow_pickle=allow_pickle)
            attached.append(result.network)
            for key, layer in result.network.layers.items():
                slot = result.network.slot(key)
                factor = part_strength(strength, slot.part)
                if weights is not None:
                    factor *= weights.weight(_module_id(slot.part, slot.path), key, family=family, layout=layout)
                layer.strength = factor
            report.modules_per_adapter.append(len(result.network))
            report.skipped_keys.append(list(result.skipped_keys))
        slots = list(dict.fromkeys((net.slot(k).part, net.slot(k).path) for net in attached for k in net.layers))
        for part, path in progress(slots, total=len(slots), desc="bake", enabled=show_progress):
            outer = parts[part].get_submodule(path)
            if not isinstance(outer, LycoLayer):
                continue
            weight = outer.innermost.weight
            baked = outer.effective_weight(dtype=torch.float32)
            outer.check_finite(baked)
            weight.copy_(baked.to(device=weight.device, dtype=weight.dtype))
            report.layers_changed += 1
    finally:
        for network in reversed(attached):
            network.remove()
    return report


def _module_id(part: str, path: str) -> ModuleId:
    return ModuleId(part, naming.canonical_text_encoder_path(path) if part != "unet" else path)


def _layout_of(parts: Mapping[str, nn.Module] | None, family: str) -> UNetLayout:
    unet = (parts or {}).get("unet")
    if unet is not None and hasattr(unet, "down_blocks"):
        try:
            return UNetLayout.from_unet(unet)
        except ValueError:
            pass
    return default_layout(family)


# ----- merge into one adapter -------------------------------------------------------------------------


@dataclass(frozen=True)
class MergedLayer:
    key: str
    sources: int
    rank: int
    fro_retained: float
    shape: tuple[int, ...]


@dataclass
class MergeResult:
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    family: str
    layers: list[MergedLayer] = field(default_factory=list)


@dataclass
class _Group:
    key: str
    module: ModuleId | None
    members: list[tuple[ModuleEntry, float]] = field(default_factory=list)


def merge_adapters(
    adapters: Sequence[tuple[AdapterSource, Strength]],
    *,
    mode: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    block_weights: BlockWeights | str | Mapping[str, float] | Sequence[float] | None = None,
    family: str | None = None,
    base: Mapping[str, nn.Module] | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    show_progress: bool = False,
) -> MergeResult:
    """One adapter equal (concat) or closest at the given rank (svd) to the stack of `adapters`.

    base: the model parts, needed only for DoRA inputs in svd mode (and used for exact layer shapes)."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    if not adapters:
        raise ValueError("no adapters to merge")
    files = [a if isinstance(a, AdapterFile) else load_adapter_file(a, allow_pickle=allow_pickle) for a, _ in adapters]
    family = family or (detect_family(base) if base else None) or _files_family(files) or "sd1"
    layout = _layout_of(base, family)
    weights = block_weights if isinstance(block_weights, BlockWeights) or block_weights is None else parse_block_weights(block_weights, family=family)
    groups = _group_modules(files, [s for _, s in adapters], family, layout, weights)
    if mode == "svd" and rank is None and method is None:
        raise ValueError("svd merging needs a rank, or a dynamic method with its parameter")
    rule = RankRule(rank, method, param) if mode == "svd" else None
    conv_rule = RankRule(conv_rank if conv_rank is not None else rank, method, param) if mode == "svd" else None
    table = naming.build_key_table(base, family=family) if base else None
    tensors: dict[str, Tensor] = {}
    layers: list[MergedLayer] = []
    for group in progress(groups, total=len(groups), desc=f"merge ({mode})", enabled=show_progress):
        shape, weight = _shape_and_weight(group, base, table, family)
        if mode == "concat":
            written = _concat(group, shape)
            merged_rank, fro = written["lora_down.weight"].shape[0], 1.0
        else:
            low = _svd_merge(group, shape, weight, conv_rule if is_spatial(shape) else rule, device)
            written, merged_rank, fro = lora_tensors(low, shape), low.rank, low.fro_retained
        tensors.update({f"{group.key}.{k}": v for k, v in written.items()})
        tensors[f"{group.key}.alpha"] = torch.tensor(float(merged_rank))
        layers.append(MergedLayer(group.key, len(group.members), merged_rank, fro, shape))
    metadata = lora_network_metadata(files[0].metadata, tensors, dynamic=method is not None)
    details = {
        "mode": mode, "sources": [os.path.basename(f.source) for f in files], "strengths": [_describe(s) for _, s in adapters],
        "rank": rank, "conv_rank": conv_rank, "method": method, "param": param,
        "block_weights": _describe_weights(weights),
    }
    metadata = record_history(metadata, "merge", {k: v for k, v in details.items() if v is not None})
    return MergeResult(tensors, metadata, family, layers)


def _files_family(files: Sequence[AdapterFile]) -> str | None:
    found = {detect_file_family(f) for f in files} - {None}
    return found.pop() if len(found) == 1 else None


def _describe_weights(weights: BlockWeights | None) -> object:
    if weights is None:
        return None
    return {**dict(weights.blocks), **dict(weights.patterns)}


def _group_modules(files: Sequence[AdapterFile], strengths: Sequence[Strength], family: str, layout: UNetLayout, weights: BlockWeights | None) -> list[_Group]:
    groups: dict[object, _Group] = {}
    for adapter, strength in zip(files, strengths):
        for entry in adapter.modules.values():
            module = parse_module_key(entry.key, family=family, layout=layout)
            if module is None:
                identity, key = ("raw", entry.key), entry.key
            else:
                identity, key = module, kohya_key(module, family=family, layout=layout)
            factor = part_strength(strength, module.part if module else _raw_part(entry.key))
            if weights is not None:
                factor *= weights.weight(module, entry.key, family=family, layout=layout)
            group = groups.setdefault(identity, _Group(key, module))
            if any(member is entry for member, _ in group.members):
                continue
            group.members.append((entry, factor))
    return list(groups.values())


def _raw_part(key: str) -> str:
    return "unet" if key.startswith(("lora_unet", "lycoris")) else "text_encoder"


def _shape_and_weight(group: _Group, base, table, family: str) -> tuple[tuple[int, ...], Tensor | None]:
    if table is not None:
        target = table.lookup(group.key) or next((table.lookup(e.key) for e, _ in group.members if table.lookup(e.key)), None)
        if target is not None:
            module = naming.innermost_module(base[target[0]].get_submodule(target[1]))
            return tuple(module.weight.shape), module.weight
    sd1 = family == "sd1"
    shapes = {infer_weight_shape(entry, pointwise_proj=sd1) for entry, _ in group.members}
    if len(shapes) != 1:
        raise AdapterFileError(group.members[0][0].key, f"the merged files disagree on the layer shape of {group.key}: {sorted(shapes)}")
    return shapes.pop(), None


def _concat(group: _Group, shape: tuple[int, ...]) -> dict[str, Tensor]:
    ups, downs = [], []
    for entry, factor in group.members:
        if entry.algo != "lora" or "lora_mid.weight" in entry.tensors or entry.dora_scale is not None:
            kind = "DoRA" if entry.dora_scale is not None else ("Tucker LoCon" if entry.algo == "lora" else entry.algo)
            raise ValueError(f"{entry.key}: concat merging is exact for plain LoRA/LoCon only, not {kind}; use mode='svd' (--mode svd)")
        up = entry.tensors["lora_up.weight"].float()
        down = entry.tensors["lora_down.weight"].float()
        ups.append((up.flatten(1) * (factor * entry.scale)))
        downs.append(down.flatten(1))
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    low = LowRank(up, down, torch.empty(0))
    return lora_tensors(low, shape)


def _svd_merge(group: _Group, shape: tuple[int, ...], weight: Tensor | None, rule: RankRule, device) -> LowRank:
    factors = [lora_factors(entry) for entry, _ in group.members]
    if all(f is not None for f in factors) and all(e.dora_scale is None for e, _ in group.members):
        up = torch.cat([f[0] * (factor * entry.scale) for f, (entry, factor) in zip(factors, group.members)], dim=1)
        down = torch.cat([f[1] for f in factors], dim=0)
        return factored_svd(up, down, rule, device=device)
    total = None
    for entry, factor in group.members:
        delta = scaled_delta(entry, shape, weight=weight, device=device) * factor
        total = delta if total is None else total + delta
    return truncated_svd(as_matrix(total), rule, device=device)
