"""LoRA / LoCon: ΔW = up @ down (kohya layout), or up · mid · down (Tucker layout for k x k convs).

FORMAT.md §2.1. Keys: lora_down.weight, lora_up.weight, optional lora_mid.weight.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..fused import low_rank_linear
from ..spec import LayerSpec

NAME = "lora"
REQUIRED_KEYS = ("lora_down.weight", "lora_up.weight")
OPTIONAL_KEYS = ("lora_mid.weight",)
OPTIONS = ("use_tucker",)
# The zero-initialised "B" half, which LoRA+ trains with a larger learning rate.
UP_KEYS = ("lora_up.weight",)


def param_shapes(spec: LayerSpec, rank: int, *, use_tucker: bool = False) -> dict[str, tuple[int, ...]]:
    out_f, in_f = spec.out_features, spec.in_features
    if not spec.is_conv:
        return {"lora_down.weight": (rank, in_f), "lora_up.weight": (out_f, rank)}
    if use_tucker and spec.has_spatial_kernel:
        return {
            "lora_down.weight": (rank, in_f, 1, 1),
            "lora_mid.weight": (rank, rank, *spec.kernel_size),
            "lora_up.weight": (out_f, rank, 1, 1),
        }
    return {"lora_down.weight": (rank, in_f, *spec.kernel_size), "lora_up.weight": (out_f, rank, 1, 1)}


def expected_shapes(params: dict[str, Tensor], spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    """The exact shapes tensors of this rank must have on this layer."""
    rank = params["lora_down.weight"].shape[0]
    return param_shapes(spec, rank, use_tucker="lora_mid.weight" in params)


def init_params(spec: LayerSpec, rank: int, *, use_tucker: bool = False) -> dict[str, Tensor]:
    params = {name: torch.empty(shape) for name, shape in param_shapes(spec, rank, use_tucker=use_tucker).items()}
    torch.nn.init.kaiming_uniform_(params["lora_down.weight"], a=math.sqrt(5))
    if "lora_mid.weight" in params:
        torch.nn.init.kaiming_uniform_(params["lora_mid.weight"], a=math.sqrt(5))
    torch.nn.init.zeros_(params["lora_up.weight"])
    return params


def scale_rank(params: dict[str, Tensor]) -> int | None:
    return params["lora_down.weight"].shape[0]


def delta_weight(params: dict[str, Tensor], spec: LayerSpec) -> Tensor:
    up = params["lora_up.weight"].flatten(1)
    down = params["lora_down.weight"].flatten(1)
    mid = params.get("lora_mid.weight")
    if mid is not None:
        return torch.einsum("ab...,oa,bi->oi...", mid, up, down).reshape(spec.weight_shape)
    return (up @ down).reshape(spec.weight_shape)


def bypass(x: Tensor, params: dict[str, Tensor], spec: LayerSpec) -> Tensor:
    """ΔW·x as thin ops: down (with the layer's stride/padding) then up, never building ΔW."""
    down, up = params["lora_down.weight"], params["lora_up.weight"]
    mid = params.get("lora_mid.weight")
    if mid is None:
        return spec.apply_pointwise(spec.apply(x, down), up)
    return spec.apply_pointwise(spec.apply(spec.apply_pointwise(x, down), mid), up)


def fuses(params: dict[str, Tensor], spec: LayerSpec) -> bool:
    """Whether fused() applies: Linear layers (which carry no Tucker core)."""
    return not spec.is_conv and "lora_mid.weight" not in params


def fused(x: Tensor, weight: Tensor, bias: Tensor | None, params: dict[str, Tensor], scale: float, spec: LayerSpec) -> Tensor:
    """F.linear(x, weight, bias) + scale·ΔW·x for a Linear layer, as one autograd node."""
    return low_rank_linear(x, weight, bias, params["lora_down.weight"], params["lora_up.weight"], scale)


def mask_rank(params: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """Rank dropout: zero whole rank components (rows of down)."""
    down = params["lora_down.weight"]
    shaped = keep.reshape(-1, *([1] * (down.dim() - 1))).to(down.dtype)
    return {**params, "lora_down.weight": down * shaped}


def bypass_cost(params: dict[str, Tensor], spec: LayerSpec) -> int:
    """Multiply-adds per output position of bypass()."""
    return sum(p.numel() for p in params.values())


def rebuild_cost(params: dict[str, Tensor], spec: LayerSpec) -> int:
    """Multiply-adds to build ΔW once."""
    return _numel(spec.weight_shape) * params["lora_down.weight"].shape[0]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
