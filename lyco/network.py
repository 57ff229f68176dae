"""LycoNetwork: adapters injected into a model's parts (UNet, text encoders) by swapping children.

A network is attached from the moment it is built until `remove()`, which puts every original
module object back (in any order, also when several networks wrap the same layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import naming
from .layer import LycoLayer
from .settings import NetworkConfig
from .targets import TEXT_ENCODER_PARTS, UNET_PART, Candidate, select_candidates


def detect_family(parts: Mapping[str, nn.Module]) -> str:
    """'sdxl' when there is a second text encoder or the UNet uses SDXL's text_time embedding, else 'sd1'
    (SD1 and SD2 share one naming scheme; callers that know it is SD2 pass family='sd2')."""
    unet = parts.get(UNET_PART)
    config = getattr(unet, "config", None)
    if "text_encoder_2" in parts or getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd1"


@dataclass(frozen=True)
class Slot:
    """Where a layer lives: the model part and the module path inside it."""

    part: str
    path: str


class LycoNetwork(nn.Module):
    """A set of LycoLayers keyed by their file key. Only adapter tensors are registered as parameters,
    so `state_dict()` / `parameters()` cover the adapter alone, never the frozen model."""

    def __init__(self, parts: Mapping[str, nn.Module], *, family: str, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self._parts = dict(parts)
        self._layouts = _layouts(parts, family)
        self._layers: dict[str, LycoLayer] = {}
        self._slots: dict[str, Slot] = {}
        self.adapters = nn.ModuleDict()
        self.attached = True

    # ----- building --------------------------------------------------------------------------------
    @classmethod
    def create(cls, parts: Mapping[str, nn.Module], config: NetworkConfig, *, family: str | None = None) -> "LycoNetwork":
        """Freshly initialised adapters (ΔW = 0) on every module the config targets."""
        family = family or detect_family(parts)
        network = cls(parts, family=family, config=config)
        candidates = select_candidates(parts, config.selection(), network.qualified_path)
        if not candidates:
            raise ValueError(f"preset {config.preset!r} with include={list(config.include)} exclude={list(config.exclude)} matches no module in {sorted(parts)}")
        for candidate in candidates:
            network.add_layer(candidate.part, candidate.path, _create_layer(candidate, config, network.file_key(candidate.part, candidate.path)))
        return network

    def qualified_path(self, part: str, path: str) -> str:
        canonical = naming.canonical_text_encoder_path(path) if part in TEXT_ENCODER_PARTS else path
        return f"{part}.{canonical}"

    def file_key(self, part: str, path: str) -> str:
        return naming.file_key(part, path, family=self.family, layout=self._layouts.get(part))

    def add_layer(self, part: str, path: str, layer: LycoLayer) -> None:
        """Attach a built layer in place of the module currently at part/path."""
        key = layer.name or self.file_key(part, path)
        if key in self._layers:
            raise ValueError(f"module key {key!r} is already in this network")
        parent, attr = _parent_of(self._parts[part], path)
        if getattr(parent, attr) is not layer.base:
            raise RuntimeError(f"{part}.{path} changed since the layer for {key} was built")
        setattr(parent, attr, layer)
        self._layers[key] = layer
        self._slots[key] = Slot(part, path)
        self.adapters[key] = layer.adapter

    # ----- views -----------------------------------------------------------------------------------
    @property
    def layers(self) -> Mapping[str, LycoLayer]:
        return self._layers

    def slot(self, key: str) -> Slot:
        return self._slots[key]

    def layers_of(self, part: str) -> Iterator[tuple[str, LycoLayer]]:
        return ((k, layer) for k, layer in self._layers.items() if self._slots[k].part == part)

    def __len__(self) -> int:
        return len(self._layers)

    def adapter_state_dict(self, *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """File tensors: `<key>.<suffix>`, `<key>.alpha` (0-dim) and `<key>.dora_scale`, detached copies."""
        out: dict[str, Tensor] = {}
        for key, layer in self._layers.items():
            for suffix, tensor in layer.tensors().items():
                out[f"{key}.{suffix}"] = tensor.detach().clone()
            out[f"{key}.alpha"] = layer.alpha.detach().clone().float()
            if layer.dora_scale is not None:
                out[f"{key}.dora_scale"] = layer.dora_scale.detach().clone()
        if dtype is not None:
            out = {k: v.to(dtype) for k, v in out.items()}
        return out

    def param_groups(
        self,
        *,
        unet_lr: float,
        text_encoder_lr: float | Mapping[str, float] | None = None,
        loraplus_ratio: float | None = None,
    ) -> list[dict]:
        """Optimizer groups: one per part (UNet, each text encoder), split into the B ("up") halves and
        the rest when a LoRA+ ratio is given (B gets lr * ratio)."""
        groups = []
        for part in self._parts:
            lr = unet_lr if part == UNET_PART else _part_lr(text_encoder_lr, part, unet_lr)
            layers = [layer for _, layer in self.layers_of(part)]
            if not layers or lr == 0:
                continue
            if loraplus_ratio is None:
                params = [p for layer in layers for p in layer.adapter.values()]
                groups.append({"params": params, "lr": lr, "name": part})
                continue
            up = [p for layer in layers for p in layer.up_parameters()]
            down = [p for layer in layers for p in layer.down_parameters()]
            groups.append({"params": down, "lr": lr, "name": f"{part}.down"})
            if up:
                groups.append({"params": up, "lr": lr * loraplus_ratio, "name": f"{part}.up"})
        return groups

    # ----- behaviour -------------------------------------------------------------------------------
    def set_strength(self, strength: float, *, part: str | None = None) -> None:
        for key, layer in self._layers.items():
            if part is None or self._slots[key].part == part:
                layer.strength = float(strength)

    def train(self, mode: bool = True) -> "LycoNetwork":
        super().train(mode)
        for layer in self._layers.values():
            layer.train(mode)
        return self

    def merge(self) -> None:
        for layer in self._layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in reversed(list(self._layers.values())):
            layer.unmerge()

    def check_finite(self) -> None:
        for layer in self._layers.values():
            layer.check_finite()

    def remove(self) -> None:
        """Unmerge and put every original module back; the network is empty afterwards."""
        for key in reversed(list(self._layers)):
            layer = self._layers[key]
            layer.unmerge()
            slot = self._slots[key]
            _detach(self._parts[slot.part], slot.path, layer)
        self._layers.clear()
        self._slots.clear()
        self.adapters = nn.ModuleDict()
        self.attached = False


def _layouts(parts: Mapping[str, nn.Module], family: str) -> dict[str, naming.UNetLayout]:
    unet = parts.get(UNET_PART)
    if unet is None or not hasattr(unet, "down_blocks"):
        return {}
    return {UNET_PART: naming.UNetLayout.from_unet(unet)}


def _part_lr(text_encoder_lr: float | Mapping[str, float] | None, part: str, default: float) -> float:
    if text_encoder_lr is None:
        return default
    if isinstance(text_encoder_lr, Mapping):
        return float(text_encoder_lr.get(part, default))
    return float(text_encoder_lr)


def _create_layer(candidate: Candidate, config: NetworkConfig, key: str) -> LycoLayer:
    settings = config.with_overrides([o for o in config.overrides if o.matches(candidate)])
    rank, alpha = settings.rank_and_alpha(spatial_conv=candidate.is_spatial_conv)
    try:
        return LycoLayer.create(
            candidate.module,
            algo=settings.algo,
            rank=rank,
            alpha=alpha,
            dora=settings.dora,
            dora_axis=settings.dora_axis,
            rs_lora=settings.rs_lora,
            options=settings.algo_options(),
            name=key,
            dropout=settings.dropout,
            rank_dropout=settings.rank_dropout,
            module_dropout=settings.module_dropout,
            path=settings.path,
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"{candidate.qualified} ({key}): {err}") from None


def _parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


def _detach(root: nn.Module, path: str, layer: LycoLayer) -> None:
    parent, attr = _parent_of(root, path)
    current = getattr(parent, attr)
    if current is layer:
        setattr(parent, attr, layer.base)
        return
    while isinstance(current, LycoLayer):
        if current.base is layer:
            current.base = layer.base
            return
        current = current.base
    raise RuntimeError(f"adapter {layer.name} is no longer attached at {path}")


def iter_lyco_layers(modules: Iterable[nn.Module]) -> Iterator[LycoLayer]:
    for root in modules:
        for module in root.modules():
            if isinstance(module, LycoLayer):
                yield module
