"""Which modules get an adapter: presets (immutable values), include/exclude regexes, overrides.

Matching mirrors sd-scripts / LyCORIS: a module whose class name is listed is expanded to every
nn.Linear / nn.Conv2d inside it; modules listed by dotted name are added directly. Regexes are
searched (re.search) in the qualified path `<part>.<path>`, e.g. `unet.mid_block.attentions.0.proj_in`
or `text_encoder.text_model.encoder.layers.3.mlp.fc1` (text encoders always in the `text_model.` form).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from torch import nn

UNET_PART = "unet"
TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2")
_TRANSFORMER = ("Transformer2DModel",)
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_ATTN = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")
_TE_MLP = ("CLIPMLP",)
_TIME_EMBEDDING = ("time_embedding.linear_1", "time_embedding.linear_2")


@dataclass(frozen=True)
class Preset:
    """A named target selection. Values, not classes: creating a network never changes a preset."""

    name: str
    unet_classes: tuple[str, ...]
    unet_names: tuple[str, ...] = ()
    text_encoder_classes: tuple[str, ...] = ()
    spatial_convs: bool = False
    # sd-scripts' conv_dim behaviour: setting conv_rank also adds these classes and their k x k convs.
    conv_rank_adds: tuple[str, ...] = ()
    description: str = ""


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in (
            Preset("attn-only", ("Attention",), (), _TE_ATTN, description="UNet attention projections + CLIP attention"),
            Preset(
                "attn-mlp",
                _TRANSFORMER,
                (),
                _TE_ATTN + _TE_MLP,
                conv_rank_adds=_CONV_BLOCKS,
                description="sd-scripts networks.lora default: everything inside Transformer2DModel + CLIP attention/MLP; "
                "conv_rank adds ResNet and sampler convs like sd-scripts' conv_dim",
            ),
            Preset("unet-transformer-only", _TRANSFORMER, description="everything inside the UNet's Transformer2DModel blocks"),
            Preset(
                "unet-convblock-only",
                _CONV_BLOCKS,
                ("conv_in", "conv_out"),
                spatial_convs=True,
                description="ResNet blocks, down/upsamplers, conv_in and conv_out",
            ),
            Preset(
                "full-lin",
                _TRANSFORMER + ("ResnetBlock2D",),
                _TIME_EMBEDDING,
                _TE_ATTN + _TE_MLP,
                description="every Linear and 1x1 conv of transformer and ResNet blocks, time embedding, CLIP attention/MLP",
            ),
            Preset(
                "full",
                _TRANSFORMER + _CONV_BLOCKS,
                ("conv_in", "conv_out") + _TIME_EMBEDDING,
                _TE_ATTN + _TE_MLP,
                spatial_convs=True,
                description="full-lin plus every k x k conv, down/upsamplers, conv_in and conv_out",
            ),
        )
    }
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class Candidate:
    """One adaptable module found in a model part."""

    part: str
    path: str  # as named_modules() yields it
    qualified: str  # "<part>.<canonical path>", what regexes and overrides see
    module: nn.Module
    enclosing_classes: frozenset[str]

    @property
    def is_spatial_conv(self) -> bool:
        base = innermost_base(self.module)
        return isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)


@dataclass(frozen=True)
class ModuleOverride:
    """Different settings (algo, rank, alpha, ...) for modules whose qualified path matches `pattern`
    (re.search) or that sit inside a module of one of `classes`."""

    settings: Mapping[str, Any]
    pattern: str | None = None
    classes: tuple[str, ...] = ()

    def matches(self, candidate: Candidate) -> bool:
        if self.pattern is not None and re.search(self.pattern, candidate.qualified):
            return True
        return bool(set(self.classes) & candidate.enclosing_classes)


@dataclass(frozen=True)
class TargetSelection:
    preset: str = "attn-mlp"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    conv_rank_set: bool = False
    parts: tuple[str, ...] = field(default=(UNET_PART,) + TEXT_ENCODER_PARTS)


def is_adaptable(module: nn.Module) -> bool:
    if getattr(type(module), "is_lyco_wrapper", False):
        return True
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def innermost_base(module: nn.Module) -> nn.Module:
    while getattr(type(module), "is_lyco_wrapper", False):
        module = module.base
    return module


def walk_modules(root: nn.Module, prefix: str = "", classes: tuple[str, ...] = ()) -> Iterator[tuple[str, nn.Module, tuple[str, ...]]]:
    """named_modules() that treats an adapter wrapper as the layer it wraps (its insides are skipped),
    yielding (path, module, enclosing class names)."""
    for name, child in root.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child, classes
        if not getattr(type(child), "is_lyco_wrapper", False):
            yield from walk_modules(child, path, classes + (type(child).__name__,))


def select_candidates(parts: Mapping[str, nn.Module], selection: TargetSelection, qualify) -> list[Candidate]:
    """Every module the selection targets, in model order, each once.

    `qualify(part, path)` returns the qualified path used by regexes (naming decides its form)."""
    preset = get_preset(selection.preset)
    include = [re.compile(p) for p in selection.include]
    exclude = [re.compile(p) for p in selection.exclude]
    found: dict[tuple[str, str], Candidate] = {}
    for part_name in selection.parts:
        root = parts.get(part_name)
        if root is None:
            continue
        is_unet = part_name == UNET_PART
        classes = set(preset.unet_classes if is_unet else preset.text_encoder_classes)
        if is_unet and selection.conv_rank_set:
            classes |= set(preset.conv_rank_adds)
        spatial = preset.spatial_convs or (selection.conv_rank_set and bool(preset.conv_rank_adds))
        names = set(preset.unet_names) if is_unet else set()
        for path, module, enclosing in walk_modules(root):
            if not is_adaptable(module):
                continue
            candidate = Candidate(part_name, path, qualify(part_name, path), module, frozenset(enclosing))
            by_preset = (bool(classes & candidate.enclosing_classes) or path in names) and (spatial or not candidate.is_spatial_conv)
            by_include = any(r.search(candidate.qualified) for r in include)
            if (by_preset or by_include) and not any(r.search(candidate.qualified) for r in exclude):
                found.setdefault((part_name, path), candidate)
    return list(found.values())


def validate_override_settings(settings: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"override settings {unknown} are not adapter settings; valid: {sorted(allowed)}")


def dataclass_field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))
