"""AdapterStack: any mix of LoRA/LoCon/LoHa/LoKr adapters, with per-adapter strengths, on one diffusers pipeline.

Works on every pipeline object with a ``unet`` and a ``text_encoder`` (and ``text_encoder_2``):
SD1/SD2/SDXL text-to-image, img2img and inpaint pipelines alike.

* Each adapter is a `LycoNetwork` whose `LycoLayer`s wrap the pipeline's layers; several adapters
  on one layer nest. A layer's strength = the adapter's UNet or text-encoder strength x the block
  weight of the layer's block (pipelines.block_weights), written to `LycoLayer.strength`, so changes
  take effect at once and never reload a file. Strength 0 (or disabled) runs the frozen layer alone.
* Unfused (default): adapters run beside the frozen weights.
* Fused: the stack keeps ONE pristine copy of every touched base weight, writes
  ``original + sum(enabled contributions)`` computed in fp32 and cast once, and takes the wrappers
  out of the module tree, so generation runs at base speed. Unfuse copies the originals back
  (bit-exact, never a subtraction); a strength change while fused re-fuses from the originals.
* Adapters come from a file, a parsed `AdapterFile`, or an in-memory `LycoNetwork`. A network
  already attached to this pipeline (a trainer's) is borrowed: removing it from the stack restores its
  strengths and leaves it attached; any other network is copied in through its state dict.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lyco import naming
from lyco.format import AdapterFile, load_adapter_file, load_network, parse_adapter
from lyco.format.hashes import file_model_hash
from lyco.layer import LycoLayer, note_state_change, state_changes
from lyco.network import LycoNetwork

from . import block_weights as bw

PARTS = ("unet", "text_encoder", "text_encoder_2")
_FORBIDDEN_NAME_CHARS = set(':<>,"\n\r')
_KEEP: Any = object()  # "leave unchanged" for keyword arguments whose None has a meaning

AdapterSource = str | os.PathLike | AdapterFile | LycoNetwork
Slot = tuple[str, str]


class AdapterStackError(ValueError):
    """A stack operation that cannot be done; the message names the adapter and the fix."""


@dataclass(frozen=True)
class AdapterSettings:
    """How one adapter is applied: UNet and text-encoder strengths, optional lbw block weights."""

    unet: float = 1.0
    text_encoder: float = 1.0
    block_weights: bw.BlockWeightSpec | None = None
    enabled: bool = True


@dataclass(frozen=True)
class AdapterInfo:
    """What `AdapterStack.list()` reports for one adapter."""

    name: str
    source: str
    short_hash: str | None
    algorithms: Mapping[str, int]
    modules: Mapping[str, int]
    settings: AdapterSettings
    skipped_keys: tuple[str, ...] = ()
    borrowed: bool = False


@dataclass
class _Entry:
    name: str
    network: LycoNetwork
    source: str
    short_hash: str | None
    settings: AdapterSettings
    blocks: dict[str, str | None]
    weights: dict[str, float] | None = None
    skipped_keys: tuple[str, ...] = ()
    borrowed_state: dict[str, tuple[float, bool]] | None = None
    origin: str = "user"
    extra: dict[str, Any] = field(default_factory=dict)


def pipeline_parts(pipe: Any) -> dict[str, nn.Module]:
    """{"unet", "text_encoder"[, "text_encoder_2"]} of a diffusers pipeline; errors name what is missing."""
    parts = {name: getattr(pipe, name, None) for name in PARTS}
    missing = [name for name in ("unet", "text_encoder") if parts[name] is None]
    if missing:
        raise AdapterStackError(f"{type(pipe).__name__} has no {' or '.join(missing)}; the adapter stack needs a Stable Diffusion pipeline")
    return {name: module for name, module in parts.items() if module is not None}


def detect_pipeline_family(pipe: Any) -> str:
    from .models import detect_family

    return detect_family(pipe)


def adapter_short_hash(path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
    """A1111's Lora short hash: ``sshs_model_hash`` from the metadata, else sha256 of the data section; 12 hex."""
    full = (metadata or {}).get("sshs_model_hash") or file_model_hash(str(path))
    return full[:12]


class AdapterStack:
    """Named adapters bound to one pipeline. See the module docstring for the two modes."""

    def __init__(
        self, pipe: Any, *, family: str | None = None, originals_device: str | torch.device | None = None, collapse: bool = True,
    ) -> None:
        self.pipe = pipe
        self.parts = pipeline_parts(pipe)
        self.family = family or detect_pipeline_family(pipe)
        if self.family not in bw.FORMS:
            raise AdapterStackError(f"unknown family {self.family!r}; expected one of {sorted(bw.FORMS)}")
        self._layout = bw.unet_layout(self.parts["unet"])
        self._entries: dict[str, _Entry] = {}
        self._originals_device = None if originals_device is None else torch.device(originals_device)
        self._originals: dict[Slot, Tensor] = {}
        self._swapped: dict[Slot, nn.Module] = {}
        # slot -> (parent module, attribute, its CollapsedLayer); the cache outlives inference blocks
        self._collapsed: dict[Slot, tuple[nn.Module, str, CollapsedLayer]] = {}
        self._collapsed_cache: dict[Slot, tuple[nn.Module, str, CollapsedLayer | None]] = {}
        self.collapse = collapse

    # ----- adding and removing ----------------------------------------------------------------------
    def add(
        self,
        name: str,
        source: AdapterSource,
        *,
        strength: float = 1.0,
        unet: float | None = None,
        text_encoder: float | None = None,
        block_weights: bw.BlockWeightSpec | None = None,
        enabled: bool = True,
        strict: bool = True,
        origin: str = "user",
    ) -> AdapterInfo:
        """Load an adapter under `name`. `strength` sets both parts; `unet` / `text_encoder` override it."""
        _check_name(name)
        if name in self._entries:
            raise AdapterStackError(f"an adapter named {name!r} is already loaded; remove it first or choose another name")
        settings = AdapterSettings(
            unet=float(strength if unet is None else unet),
            text_encoder=float(strength if text_encoder is None else text_encoder),
            block_weights=block_weights,
            enabled=enabled,
        )
        weights = self._resolve_weights(name, block_weights)
        with self._structure_change():
            entry = self._attach(name, source, strict=strict)
            entry.settings, entry.weights, entry.origin = settings, weights, origin
            self._entries[name] = entry
            self._apply(entry)
        return self._info(entry)

    def _attach(self, name: str, source: AdapterSource, *, strict: bool) -> _Entry:
        if isinstance(source, LycoNetwork):
            if self._is_attached_here(source):
                state = {key: (layer.strength, layer.enabled) for key, layer in source.layers.items()}
                return self._entry(name, source, "<memory>", None, borrowed_state=state)
            source = parse_adapter(source.adapter_state_dict(), source=f"<network {name}>")
        if not isinstance(source, AdapterFile):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"adapter file {path} does not exist (adapter {name!r}); check the path")
            try:
                source = load_adapter_file(path, strict=strict)
            except ValueError as err:
                raise AdapterStackError(f"adapter {name!r}: {err}") from err
        short = adapter_short_hash(source.source, source.metadata) if Path(source.source).is_file() else None
        try:
            result = load_network(self.parts, source, family=self.family, strict=strict)
        except ValueError as err:
            raise AdapterStackError(f"adapter {name!r}: {err}") from err
        for key, layer in result.network.layers.items():
            device = layer.innermost.weight.device
            if any(p.device != device for p in layer.adapter.values()):
                layer.to(device)
            layer.train(self.parts[result.network.slot(key).part].training)  # new modules default to training mode
        return self._entry(name, result.network, source.source, short, skipped=tuple(result.skipped_keys))

    def _entry(self, name: str, network: LycoNetwork, source: str, short: str | None, *, skipped: tuple[str, ...] = (),
               borrowed_state: dict[str, tuple[float, bool]] | None = None) -> _Entry:
        blocks = {key: bw.block_of(network.slot(key).part, network.slot(key).path, layout=self._layout) for key in network.layers}
        return _Entry(name, network, source, short, AdapterSettings(), blocks, skipped_keys=skipped, borrowed_state=borrowed_state)

    def _is_attached_here(self, network: LycoNetwork) -> bool:
        if not network.layers:
            return False
        for key, layer in network.layers.items():
            slot = network.slot(key)
            try:
                top = _get(self.parts[slot.part], slot.path) if slot.part in self.parts else None
            except AttributeError:
                top = None
            if top is None or not _chain_contains(top, layer):
                return False
        return True

    def remove(self, name: str) -> None:
        """Take an adapter out; the model's modules are exactly as before it was added."""
        entry = self._get_entry(name)
        with self._structure_change():
            del self._entries[name]
            if entry.borrowed_state is not None:
                for key, layer in entry.network.layers.items():
                    layer.strength, layer.enabled = entry.borrowed_state[key]
            else:
                entry.network.remove()

    def clear(self) -> None:
        for name in list(self._entries):
            self.remove(name)

    # ----- settings ----------------------------------------------------------------------------------
    def set_strength(
        self,
        name: str,
        strength: float | None = None,
        *,
        unet: float | None = None,
        text_encoder: float | None = None,
        block_weights: Any = _KEEP,
    ) -> AdapterSettings:
        """One number for both parts, or `unet` / `text_encoder` separately; `block_weights` = a preset
        name or values (None clears them). Takes effect at once (re-fuses when fused)."""
        current = self._get_entry(name).settings
        new = replace(
            current,
            unet=float(unet if unet is not None else strength if strength is not None else current.unet),
            text_encoder=float(text_encoder if text_encoder is not None else strength if strength is not None else current.text_encoder),
            block_weights=current.block_weights if block_weights is _KEEP else block_weights,
        )
        self.configure(name, new)
        return new

    def enable(self, name: str) -> None:
        self.configure(name, replace(self._get_entry(name).settings, enabled=True))

    def disable(self, name: str) -> None:
        self.configure(name, replace(self._get_entry(name).settings, enabled=False))

    def configure(self, name: str, settings: AdapterSettings) -> None:
        """Replace an adapter's settings as a whole."""
        entry = self._get_entry(name)
        weights = self._resolve_weights(name, settings.block_weights) if settings.block_weights != entry.settings.block_weights else entry.weights
        entry.settings, entry.weights = settings, weights
        self._apply(entry)
        if self.fused:
            self._fuse_slots(self._slots_of([entry]))

    def settings(self, name: str) -> AdapterSettings:
        return self._get_entry(name).settings

    @contextlib.contextmanager
    def overridden(self, settings: Mapping[str, AdapterSettings]) -> Iterator["AdapterStack"]:
        """Apply settings for some adapters inside a `with` block and restore the previous ones after."""
        saved = {name: self._get_entry(name).settings for name in settings}
        changed = [name for name, new in settings.items() if new != saved[name]]
        try:
            for name in changed:
                self.configure(name, settings[name])
            yield self
        finally:
            for name in changed:
                if name in self._entries:
                    self.configure(name, saved[name])

    def _resolve_weights(self, name: str, spec: bw.BlockWeightSpec | None) -> dict[str, float] | None:
        if spec is None:
            return None
        try:
            return bw.resolve(spec, family=self.family)
        except bw.BlockWeightError as err:
            raise AdapterStackError(f"adapter {name!r}: {err}") from None

    def _apply(self, entry: _Entry) -> None:
        settings = entry.settings
        for key, layer in entry.network.layers.items():
            part_strength = settings.unet if entry.network.slot(key).part == "unet" else settings.text_encoder
            layer.strength = part_strength * bw.multiplier(entry.weights, entry.blocks[key])
            layer.enabled = settings.enabled

    # ----- views -------------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def list(self) -> list[AdapterInfo]:
        return [self._info(entry) for entry in self._entries.values()]

    def info(self, name: str) -> AdapterInfo:
        return self._info(self._get_entry(name))

    def origin(self, name: str) -> str:
        return self._get_entry(name).origin

    def network(self, name: str) -> LycoNetwork:
        return self._get_entry(name).network

    def _info(self, entry: _Entry) -> AdapterInfo:
        algorithms: dict[str, int] = {}
        modules: dict[str, int] = {}
        for key, layer in entry.network.layers.items():
            algorithms[layer.algo.NAME] = algorithms.get(layer.algo.NAME, 0) + 1
            part = entry.network.slot(key).part
            modules[part] = modules.get(part, 0) + 1
        return AdapterInfo(entry.name, entry.source, entry.short_hash, algorithms, modules, entry.settings,
                           entry.skipped_keys, entry.borrowed_state is not None)

    def _get_entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            loaded = ", ".join(self._entries) or "none"
            raise AdapterStackError(f"no adapter named {name!r} in the stack (loaded: {loaded})") from None

    # ----- fusing ------------------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        return bool(self._swapped)

    def fuse(self) -> None:
        """Bake every enabled adapter into the weights (fp32 sum, one cast) for base-speed generation."""
        if self.fused:
            return
        self._uncollapse()
        self._collapsed_cache.clear()
        slots = self._slots_of(self._entries.values())
        for slot in slots:
            top = _get(self.parts[slot[0]], slot[1])
            for layer in _chain(top):
                if layer.merged:
                    raise AdapterStackError(f"{slot[0]}.{slot[1]}: adapter module {layer.name} was merged outside the stack; unmerge it first")
        for slot in slots:
            top = _get(self.parts[slot[0]], slot[1])
            base = naming.innermost_module(top)
            self._originals[slot] = base.weight.detach().to(self._originals_device or base.weight.device, copy=True)
            self._swapped[slot] = top
            _set(self.parts[slot[0]], slot[1], base)
        self._fuse_slots(slots)

    def unfuse(self) -> None:
        """Restore the exact original weights (bit-identical) and put the adapters back beside them."""
        with torch.no_grad():
            for slot, top in self._swapped.items():
                base = naming.innermost_module(top)
                base.weight.copy_(self._originals[slot])
                _set(self.parts[slot[0]], slot[1], top)
        self._swapped.clear()
        self._originals.clear()

    @torch.no_grad()
    def _fuse_slots(self, slots: Sequence[Slot]) -> None:
        for slot in slots:
            top = self._swapped[slot]
            weight = naming.innermost_module(top).weight
            weight.copy_(self._originals[slot])  # contributions (DoRA) must see the pristine weight
            weight.copy_(summed_weight(top))

    # ----- collapsed inference -----------------------------------------------------------------------
    @contextlib.contextmanager
    def inference(self) -> Iterator["AdapterStack"]:
        """Inside the block, an unfused stack runs each adapted layer as ONE op with a cached
        ``W + sum(contributions)`` (fp32 sum, one cast: the fused numbers) instead of running every
        adapter beside it. A layer's cache is rebuilt on its next forward after any strength, enable or
        merge change; adapter parameters edited in place are picked up when the next block starts.
        The base weights are never written. The caches (one weight copy per
        adapted layer) are kept between blocks so that repeated generations do not rebuild them;
        `drop_inference_cache()` frees them. Nothing happens when fused or with `collapse=False`."""
        if self.fused or not self.collapse or self._collapsed:
            yield self
            return
        self._collapse()
        try:
            yield self
        finally:
            self._uncollapse()

    def drop_inference_cache(self) -> None:
        """Free the summed weights kept for collapsed inference (they are rebuilt when needed)."""
        self._collapsed_cache.clear()

    def _collapse(self) -> None:
        if not self._collapsed_cache:
            for slot in self._slots_of(self._entries.values()):
                self._collapsed_cache[slot] = (*_parent(self.parts[slot[0]], slot[1]), None)
        note_state_change()  # every collapsed layer re-reads its adapters once (parameters may have been edited)
        for slot, (parent, attr, collapsed) in list(self._collapsed_cache.items()):
            top = getattr(parent, attr)
            if collapsed is None or collapsed.chain is not top:
                if not isinstance(top, LycoLayer):
                    continue
                collapsed = CollapsedLayer(top)
                self._collapsed_cache[slot] = (parent, attr, collapsed)
            self._collapsed[slot] = (parent, attr, collapsed)
            setattr(parent, attr, collapsed)

    def _uncollapse(self) -> None:
        for parent, attr, collapsed in self._collapsed.values():
            setattr(parent, attr, collapsed.chain)
        self._collapsed.clear()

    def _slots_of(self, entries: Any) -> list[Slot]:
        slots: dict[Slot, None] = {}
        for entry in entries:
            for key in entry.network.layers:
                slot = entry.network.slot(key)
                slots[(slot.part, slot.path)] = None
        return list(slots)

    @contextlib.contextmanager
    def _structure_change(self) -> Iterator[None]:
        """Adding or removing wrappers needs them in the tree: unfuse around it, re-fuse after."""
        was_fused, was_collapsed = self.fused, dict(self._collapsed)
        if was_fused:
            self.unfuse()
        self._uncollapse()
        self._collapsed_cache.clear()
        try:
            yield
        finally:
            if was_collapsed:
                self._collapse()
            if was_fused:
                self.fuse()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or _FORBIDDEN_NAME_CHARS & set(name) or name != name.strip():
        raise AdapterStackError(
            f"adapter name {name!r} cannot be used: names appear in prompt tags and PNG metadata, so they must be "
            f"non-empty, without surrounding spaces and without any of {''.join(sorted(_FORBIDDEN_NAME_CHARS)).strip()!r}; "
            "rename the file or pass another name"
        )


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding `path`'s last component, and that component's attribute name."""
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    setattr(*_parent(root, path), module)


def _chain(top: nn.Module) -> list[LycoLayer]:
    layers = []
    while isinstance(top, LycoLayer):
        layers.append(top)
        top = top.base
    return layers


def _chain_contains(top: nn.Module, layer: LycoLayer) -> bool:
    return any(item is layer for item in _chain(top))


@torch.no_grad()
def summed_weight(top: nn.Module) -> Tensor:
    """``W + sum(active contributions)`` of a wrapper chain, summed in fp32 and cast once to W's dtype."""
    weight = naming.innermost_module(top).weight
    total = weight.to(dtype=torch.float32, copy=True)
    active = [layer for layer in _chain(top) if layer.active]
    for layer in active:
        total += layer.contribution(dtype=torch.float32).to(weight.device)
    if active and not torch.isfinite(total).all():
        for layer in active:  # name the culprit
            layer.check_finite(layer.contribution(dtype=torch.float32))
        raise FloatingPointError(f"adapters {[layer.name for layer in active]}: the summed weight overflows float32")
    return total.to(weight.dtype)


class CollapsedLayer(nn.Module):
    """Runs a chain of LycoLayers as one op with a cached summed weight (see AdapterStack.inference).

    Falls back to the chain itself whenever gradients can flow into an adapter or it is in training
    mode, so training through it is exact. The cache is re-checked only when `lyco.layer.state_changes()`
    moved (a strength, enable or merge change anywhere, or a new inference block), so the per-forward
    cost is one int comparison.

    The chain is held, not registered as a child: diffusers walks every module of a pipeline on each
    call, and nested adapters with their parameter dicts would multiply that walk. `.to()`/`.half()`
    and `.train()` are passed on to the chain explicitly, so nothing it holds is left behind."""

    def __init__(self, chain: LycoLayer) -> None:
        super().__init__()
        self.__dict__["chain"] = chain
        self._layers = _chain(chain)
        self.__dict__["_base"] = naming.innermost_module(chain)
        self._is_linear = not self._layers[0].spec.is_conv
        # Plain lists, so that the checks avoid nn.Module attribute lookups.
        self._tensors = [p for layer in self._layers for p in layer.adapter.values()]
        self._tensors += [layer.dora_scale for layer in self._layers if layer.dora_scale is not None]
        self._checked_at: int | None = None
        self._run_base = False
        self._key: tuple | None = None
        self._weight: Tensor | None = None
        self.training = chain.training

    def _apply(self, fn: Any, recurse: bool = True) -> "CollapsedLayer":
        self.chain._apply(fn, recurse)
        self._weight, self._key, self._checked_at = None, None, None
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "CollapsedLayer":
        self.chain.train(mode)
        return super().train(mode)

    def _state(self) -> tuple:
        weight = self._base.weight
        # A merge writes the weight (its version changes); parameter edits change tensor versions.
        return (id(weight), weight._version, tuple(t._version for t in self._tensors),
                tuple((layer.enabled, layer.strength) for layer in self._layers))

    def _refresh(self) -> None:
        # Nothing to add: the base module itself, so strength 0 is the base model bit for bit
        # (a copied weight can take a different kernel path and differ in the last bit).
        self._run_base = not any(layer.active for layer in self._layers)
        if not self._run_base:
            key = self._state()
            if key != self._key:
                self._weight, self._key = None, None
                self._weight, self._key = summed_weight(self.chain), key
        self._checked_at = state_changes()

    def _runs_chain(self) -> bool:
        return self.training or (torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs or self._runs_chain():
            return self.chain(x, *args, **kwargs)
        if self._checked_at != state_changes():
            self._refresh()
        if self._run_base:
            return self._base(x)
        weight, bias = self._weight, self._base.bias
        if weight.dtype != x.dtype:
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        if self._is_linear:
            return F.linear(x, weight, bias)
        return self._layers[0].spec.apply(x, weight, bias)
