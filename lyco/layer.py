"""LycoLayer: the one wrapper class for every algorithm.

It keeps the frozen layer as its `base` child and is the only place where
`strength * alpha / rank * ΔW` is applied. Forward runs one of two paths:
bypass (ΔW·x without building ΔW; for a plain nn.Linear, one autograd node with the base op, see
fused) or rebuild (one F.linear/F.conv2d with W + strength·s·ΔW,
collapsing nested wrappers into a single op; when training, W + ΔW is built again in backward instead
of being kept, see rebuild_op). Merge bakes the contribution into the base weight
and unmerge restores the kept original bit-exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Mapping

import torch
from torch import Tensor, nn

from . import rebuild_op
from .algos import get_algorithm
from .dora import DORA_AXES, dora_axis_of, dora_weight, weight_norms
from .spec import LayerSpec

PATHS = ("auto", "bypass", "rebuild")
# What one multiply-add of a training-time ΔW build costs, relative to one of a matmul: the build runs
# in forward and again in backward, with elementwise passes and the factor gradients (measured on CPU
# for LoHa on the SD1.5 attention shapes, where it decides between the paths).
_TRAINING_BUILD_COST = 16

_state_changes = 0


def state_changes() -> int:
    """A counter that moves whenever any adapter's strength, enabled flag or merge state changes.

    Caches derived from those (pipelines' collapsed layers) compare one int per forward instead of
    re-reading every layer; in-place edits of adapter parameters do not move it."""
    return _state_changes


def note_state_change() -> None:
    global _state_changes
    _state_changes += 1


def _param_name(suffix: str) -> str:
    return suffix.replace(".", "_")


class LycoLayer(nn.Module):
    """A low-rank adapter around a frozen nn.Linear / nn.Conv2d (or around another LycoLayer)."""

    is_lyco_wrapper = True

    def __init__(
        self,
        base: nn.Module,
        *,
        algo: str,
        tensors: Mapping[str, Tensor],
        alpha: float | None = None,
        dora_scale: Tensor | None = None,
        name: str = "",
        strength: float = 1.0,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        path: str = "auto",
    ) -> None:
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"{name or 'adapter'}: path must be one of {PATHS}, got {path!r}")
        self.base = base
        self.name = name
        self.algo_name = get_algorithm(algo).NAME
        self.spec = LayerSpec.from_module(self.innermost)
        self.param_keys = tuple(tensors)
        self.adapter = nn.ParameterDict(
            {_param_name(k): nn.Parameter(t.detach().clone().float()) for k, t in tensors.items()}
        )
        self._check_shapes()
        self.rank = self.algo.scale_rank(dict(tensors))
        if alpha is None:  # a file without .alpha means scale 1, as in every reader (FORMAT.md §2)
            alpha = float(self.rank or 1)
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=True)
        self.dora_scale = (
            nn.Parameter(dora_scale.detach().clone().float().reshape(self._dora_shape(dora_scale)))
            if dora_scale is not None
            else None
        )
        self.strength = float(strength)
        self.enabled = True
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.path = path

    # ----- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        base: nn.Module,
        *,
        algo: str = "lora",
        rank: int = 8,
        alpha: float | None = None,
        dora: bool = False,
        dora_axis: str = "input",
        rs_lora: bool = False,
        options: Mapping[str, object] | None = None,
        **layer_kwargs,
    ) -> "LycoLayer":
        """A freshly initialised adapter whose ΔW is exactly zero."""
        algorithm = get_algorithm(algo)
        options = dict(options or {})
        unknown = set(options) - set(algorithm.OPTIONS)
        if unknown:
            raise ValueError(f"options {sorted(unknown)} do not apply to {algorithm.NAME}; valid: {list(algorithm.OPTIONS)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        inner = _innermost(base)
        spec = LayerSpec.from_module(inner)
        tensors = algorithm.init_params(spec, rank, **options)
        scale_rank = algorithm.scale_rank(tensors)
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        if scale_rank is None:
            alpha = float(rank)  # both LoKr factors full: scale 1, and LyCORIS writes alpha = rank
        elif rs_lora:
            alpha = alpha * math.sqrt(scale_rank)  # runtime alpha/sqrt(r) stored so that stored/r reproduces it
        dora_scale = None
        if dora:
            if dora_axis not in DORA_AXES:
                raise ValueError(f"dora_axis must be one of {DORA_AXES}, got {dora_axis!r}")
            dora_scale = weight_norms(inner.weight.detach().float(), dora_axis)
        return cls(base, algo=algorithm.NAME, tensors=tensors, alpha=alpha, dora_scale=dora_scale, **layer_kwargs)

    def _check_shapes(self) -> None:
        shapes = self._shapes()
        try:
            expected = self.algo.expected_shapes(self.tensors(), self.spec)
        except (KeyError, IndexError) as err:
            raise ValueError(f"{self.name}: incomplete {self.algo.NAME} tensors {shapes} ({err})") from None
        if shapes != expected:
            raise ValueError(
                f"{self.name}: {self.algo.NAME} tensors {shapes} do not fit a layer of weight shape "
                f"{self.spec.weight_shape} (expected {expected})"
            )

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.tensors().items()}

    def _dora_shape(self, dora_scale: Tensor) -> tuple[int, ...]:
        axis = dora_axis_of(tuple(dora_scale.shape), self.spec.weight_shape)
        if axis is None:
            raise ValueError(f"{self.name}: dora_scale of shape {tuple(dora_scale.shape)} fits neither axis of weight {self.spec.weight_shape}")
        rest = [1] * (len(self.spec.weight_shape) - 2)
        return (self.spec.out_features, 1, *rest) if axis == "output" else (1, self.spec.in_features, *rest)

    # ----- views -----------------------------------------------------------------------------------
    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = float(value)
        note_state_change()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        note_state_change()

    @property
    def algo(self) -> ModuleType:
        """The algorithm's module of pure functions (looked up by name so layers stay deep-copyable)."""
        return get_algorithm(self.algo_name)

    @property
    def innermost(self) -> nn.Module:
        return _innermost(self.base)

    @property
    def scale(self) -> float:
        """alpha / r, or 1 when the algorithm has no rank (LoKr with two full factors)."""
        return float(self.alpha) / self.rank if self.rank else 1.0

    @property
    def dora_axis(self) -> str | None:
        return None if self.dora_scale is None else dora_axis_of(tuple(self.dora_scale.shape), self.spec.weight_shape)

    @property
    def merged(self) -> bool:
        state = _merge_state(self.innermost)
        return state is not None and any(layer is self for layer in state.merged)

    def frozen_weight(self) -> Tensor:
        """The base layer's own weight, without any adapter merged into it."""
        state = _merge_state(self.innermost)
        return self.innermost.weight if state is None else state.pristine

    def tensors(self) -> dict[str, Tensor]:
        """The algorithm's tensors by file suffix (lora_down.weight, hada_w1_a, ...)."""
        return {k: self.adapter[_param_name(k)] for k in self.param_keys}

    def up_parameters(self) -> list[nn.Parameter]:
        return [self.adapter[_param_name(k)] for k in self.param_keys if k in self.algo.UP_KEYS]

    def down_parameters(self) -> list[nn.Parameter]:
        ups = {id(p) for p in self.up_parameters()}
        rest = [p for p in self.adapter.values() if id(p) not in ups]
        return rest + ([self.dora_scale] if self.dora_scale is not None else [])

    # ----- math ------------------------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """The unscaled ΔW of the algorithm (FORMAT.md §2), in the layer's weight shape, fp32."""
        return self.algo.delta_weight(self.tensors(), self.spec)

    def contribution(self, *, dtype: torch.dtype | None = None, params: Mapping[str, Tensor] | None = None,
                     dora_scale: Tensor | None = None) -> Tensor:
        """What this adapter adds to the frozen weight at its strength: m·s·ΔW, or m·(DoRA(W+sΔW) − W).
        `params` / `dora_scale` stand in for the layer's own tensors (same shapes)."""
        params = self.tensors() if params is None else params
        if dtype is not None:
            params = {k: p.to(dtype) for k, p in params.items()}
        delta = self.algo.delta_weight(dict(params), self.spec)
        if self.dora_scale is None:
            return delta * (self.strength * self.scale)
        weight = self.frozen_weight().to(device=delta.device, dtype=torch.float32)
        magnitude = self.dora_scale if dora_scale is None else dora_scale
        decomposed = dora_weight(weight + delta.float() * self.scale, magnitude, self.dora_axis)
        return ((decomposed - weight) * self.strength).to(delta.dtype)

    def effective_weight(self, *, dtype: torch.dtype | None = None) -> Tensor:
        """The frozen weight plus every active adapter contribution down the wrapper chain."""
        inner = self.base.effective_weight(dtype=dtype) if isinstance(self.base, LycoLayer) else self.base.weight
        if dtype is not None:
            inner = inner.to(dtype)
        if not self.active:
            return inner
        return inner + self.contribution(dtype=inner.dtype).to(inner.dtype)

    # ----- forward ---------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether this adapter currently adds anything in forward (enabled, unmerged, strength != 0)."""
        return self.enabled and not self.merged and self.strength != 0.0

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self.active or (self.training and self.module_dropout and torch.rand(()) < self.module_dropout):
            return self.base(x, *args, **kwargs)
        rank_keep = self._rank_keep_mask(x.device)
        params, keep = self._masked(self.tensors(), x.dtype, rank_keep)
        if self._use_bypass(x, params):
            scale = self.strength * self.scale * self._rank_scale()
            if keep is None and not args and not kwargs and self._fuses_with_base(params):
                return self.algo.fused(x, self.base.weight, self.base.bias, params, scale, self.spec)
            adapter_in = nn.functional.dropout(x, self.dropout, training=True) if self._input_dropout() else x
            params = self._with_scale_folded(params, scale)
            out = self.algo.bypass(adapter_in, params, self.spec)
            return self.base(x, *args, **kwargs) + _mask_channels(out, keep, self.spec)
        if self._input_dropout():
            delta = _mask_rows(self.contribution(dtype=x.dtype, params=params), keep) * self._rank_scale()
            adapter_in = nn.functional.dropout(x, self.dropout, training=True)
            return self.base(x, *args, **kwargs) + self.spec.apply(adapter_in, delta)
        bias = self.innermost.bias
        bias = None if bias is None else bias.to(x.dtype)
        if self._rebuilds_in_backward():
            return self._forward_rebuilt_in_backward(x, rank_keep, bias)
        delta = _mask_rows(self.contribution(dtype=x.dtype, params=params), keep) * self._rank_scale()
        inner = self.base.effective_weight(dtype=x.dtype) if isinstance(self.base, LycoLayer) else self.base.weight.to(x.dtype)
        return self.spec.apply(x, inner + delta, bias)

    def _masked(self, tensors: Mapping[str, Tensor], dtype: torch.dtype, rank_keep: Tensor | None) -> tuple[dict[str, Tensor], Tensor | None]:
        """The tensors in `dtype` with rank dropout applied to the factors where the algorithm can,
        and the output-row mask still to apply to ΔW where it cannot."""
        params = {k: p.to(dtype=dtype) for k, p in tensors.items()}
        if rank_keep is not None and hasattr(self.algo, "mask_rank"):
            return self.algo.mask_rank(params, rank_keep), None
        return params, rank_keep

    def _with_scale_folded(self, params: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
        # ΔW is linear in its up factor: scaling that small tensor spares an output-sized multiply
        # in forward and in backward.
        key = next(k for k in self.algo.UP_KEYS if k in params)
        return {**params, key: params[key] * scale}

    def _fuses_with_base(self, params: Mapping[str, Tensor]) -> bool:
        # The fused node runs the base's F.linear itself: only for a plain nn.Linear without hooks of its own.
        base = self.base
        return (
            type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not self._input_dropout()
            and hasattr(self.algo, "fused")
            and self.algo.fuses(params, self.spec)
        )

    def _rebuilds_in_backward(self) -> bool:
        # Nested wrappers build their weight from tensors of other layers too: plain autograd there.
        trained = any(p.requires_grad for p in self.adapter.values()) or (self.dora_scale is not None and self.dora_scale.requires_grad)
        return torch.is_grad_enabled() and trained and not isinstance(self.base, LycoLayer) and rebuild_op.supports(self.spec)

    def _forward_rebuilt_in_backward(self, x: Tensor, rank_keep: Tensor | None, bias: Tensor | None) -> Tensor:
        keys, dtype, rank_scale = self.param_keys, x.dtype, self._rank_scale()

        def build(base_weight: Tensor, *tensors: Tensor) -> Tensor:
            params, keep = self._masked(dict(zip(keys, tensors)), dtype, rank_keep)
            dora_scale = tensors[len(keys)] if len(tensors) > len(keys) else None
            delta = self.contribution(params=params, dora_scale=dora_scale).to(dtype)
            return base_weight.to(dtype) + _mask_rows(delta, keep) * rank_scale

        tensors = [self.base.weight, *self.tensors().values()] + ([self.dora_scale] if self.dora_scale is not None else [])
        return rebuild_op.apply_rebuilt(x, build, tensors, self.spec, bias)

    def _input_dropout(self) -> bool:
        return self.training and self.dropout > 0

    def _rank_keep_mask(self, device: torch.device) -> Tensor | None:
        if not (self.training and self.rank_dropout > 0):
            return None
        size = self.rank if hasattr(self.algo, "mask_rank") and self.rank else self.spec.out_features
        return torch.rand(size, device=device) > self.rank_dropout

    def _rank_scale(self) -> float:
        return 1.0 / (1.0 - self.rank_dropout) if self.training and self.rank_dropout > 0 else 1.0

    def _use_bypass(self, x: Tensor, params: Mapping[str, Tensor]) -> bool:
        if self.path == "rebuild" or self.dora_scale is not None or not hasattr(self.algo, "bypass"):
            if self.path == "bypass":
                raise ValueError(f"{self.name}: the bypass path is not available for {self.algo.NAME}{' with DoRA' if self.dora_scale is not None else ''}")
            return False
        if self.path == "bypass":
            return True
        channels = x.shape[1] if self.spec.is_conv else x.shape[-1]
        positions = x.numel() // max(channels, 1)
        bypass, rebuild = positions * self.algo.bypass_cost(params, self.spec), self.algo.rebuild_cost(params, self.spec)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter.values()):
            # Training: bypass runs its products three times (forward, input gradient, factor gradients);
            # rebuild takes the weight-sized gradient of the op (one multiply-add per weight entry and
            # position) plus its builds, whose elementwise passes cost far more per multiply-add on CPU.
            return 3 * bypass < positions * math.prod(self.spec.weight_shape) + _TRAINING_BUILD_COST * rebuild
        return bypass < rebuild

    # ----- merge -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Bake the contribution into the frozen weight. The weight's pristine copy is kept once per
        layer, and the merged weight is always pristine + Σ merged contributions computed in fp32, so
        merges and unmerges of stacked adapters work in any order and never drift."""
        if self.merged:
            return
        base = self.innermost
        self.check_finite(self.contribution(dtype=torch.float32))
        state = _merge_state(base) or _MergeState(base.weight.detach().clone(), [])
        state.merged.append(self)
        base.__dict__[_MERGE_STATE] = state
        _write_merged(base, state)
        note_state_change()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take this adapter out of the weight; the last unmerge restores the pristine copy bit-exactly."""
        if not self.merged:
            return
        base = self.innermost
        state = _merge_state(base)
        state.merged = [layer for layer in state.merged if layer is not self]
        if state.merged:
            _write_merged(base, state)
        else:
            base.weight.copy_(state.pristine)
            del base.__dict__[_MERGE_STATE]
        note_state_change()

    def check_finite(self, delta: Tensor | None = None) -> None:
        tensors = {"ΔW": delta} if delta is not None else dict(self.tensors())
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"adapter module {self.name or self.spec}: {key} contains NaN or Inf values")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, algo={self.algo.NAME}, rank={self.rank}, alpha={float(self.alpha):g}, strength={self.strength:g}, dora={self.dora_axis}"


_MERGE_STATE = "_lyco_merge_state"


@dataclass
class _MergeState:
    """Kept on a frozen layer while adapters are merged into it."""

    pristine: Tensor
    merged: list["LycoLayer"]


def _merge_state(module: nn.Module) -> _MergeState | None:
    return module.__dict__.get(_MERGE_STATE)


def _write_merged(base: nn.Module, state: _MergeState) -> None:
    total = state.pristine.float()
    for layer in state.merged:
        total = total + layer.contribution(dtype=torch.float32).to(total.device)
    base.weight.copy_(total.to(base.weight.dtype))


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, LycoLayer):
        module = module.base
    return module


def _mask_rows(delta: Tensor, keep: Tensor | None) -> Tensor:
    if keep is None:
        return delta
    return delta * keep.reshape(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)


def _mask_channels(out: Tensor, keep: Tensor | None, spec: LayerSpec) -> Tensor:
    if keep is None:
        return out
    if spec.is_conv:
        return out * keep.reshape(1, -1, *([1] * (out.dim() - 2))).to(out.dtype)
    return out * keep.to(out.dtype)
