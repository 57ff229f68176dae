"""LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), or the Tucker form for k x k convs.

FORMAT.md §2.2. Keys: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, optional hada_t1, hada_t2.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..fused import low_rank_linear
from ..spec import LayerSpec
from .tucker import rebuild_tucker

NAME = "loha"
REQUIRED_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
OPTIONAL_KEYS = ("hada_t1", "hada_t2")
OPTIONS = ("use_tucker",)
UP_KEYS = ("hada_w2_a",)


def param_shapes(spec: LayerSpec, rank: int, *, use_tucker: bool = False) -> dict[str, tuple[int, ...]]:
    out_f, in_f = spec.out_features, spec.in_features
    if use_tucker and spec.has_spatial_kernel:
        shapes: dict[str, tuple[int, ...]] = {}
        for n in ("1", "2"):
            shapes[f"hada_w{n}_a"] = (rank, out_f)
            shapes[f"hada_w{n}_b"] = (rank, in_f)
            shapes[f"hada_t{n}"] = (rank, rank, *spec.kernel_size)
        return shapes
    in_flat = in_f * spec.kernel_numel if spec.is_conv else in_f
    return {
        "hada_w1_a": (out_f, rank),
        "hada_w1_b": (rank, in_flat),
        "hada_w2_a": (out_f, rank),
        "hada_w2_b": (rank, in_flat),
    }


def expected_shapes(params: dict[str, Tensor], spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    """The exact shapes tensors of this rank must have on this layer."""
    rank = params["hada_w1_b"].shape[0]
    return param_shapes(spec, rank, use_tucker="hada_t1" in params)


def init_params(spec: LayerSpec, rank: int, *, use_tucker: bool = False) -> dict[str, Tensor]:
    params = {name: torch.empty(shape) for name, shape in param_shapes(spec, rank, use_tucker=use_tucker).items()}
    torch.nn.init.normal_(params["hada_w1_a"], std=0.1)
    torch.nn.init.normal_(params["hada_w1_b"], std=1.0)
    torch.nn.init.normal_(params["hada_w2_b"], std=1.0)
    torch.nn.init.zeros_(params["hada_w2_a"])
    for name in ("hada_t1", "hada_t2"):
        if name in params:
            torch.nn.init.normal_(params[name], std=0.1)
    return params


def scale_rank(params: dict[str, Tensor]) -> int | None:
    return params["hada_w1_b"].shape[0]


def _factor(params: dict[str, Tensor], n: str) -> Tensor:
    w_a, w_b = params[f"hada_w{n}_a"], params[f"hada_w{n}_b"]
    t = params.get(f"hada_t{n}")
    if t is not None:
        return rebuild_tucker(t, w_a, w_b)
    return w_a @ w_b


def _hadamard(params: dict[str, Tensor], spec: LayerSpec) -> Tensor:
    return (_factor(params, "1") * _factor(params, "2")).reshape(spec.weight_shape)


def delta_weight(params: dict[str, Tensor], spec: LayerSpec) -> Tensor:
    if torch.is_grad_enabled() and any(p.requires_grad for p in params.values()):
        # Autograd would keep both full-size factor products for the Hadamard backward; keeping only
        # the small factors and rebuilding the products in backward saves two weight-sized tensors
        # per layer (what makes LoHa on every conv of a UNet run out of memory).
        return checkpoint(_hadamard, params, spec, use_reentrant=False)
    return _hadamard(params, spec)


def _pairwise_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row (r, s) = a[r] * b[s] for every pair, in r-major order: (r1 * r2, n) from (r1, n) and (r2, n)."""
    return (a[:, None, :] * b[None, :, :]).reshape(a.shape[0] * b.shape[0], a.shape[1])


def bypass(x: Tensor, params: dict[str, Tensor], spec: LayerSpec) -> Tensor:
    """ΔW·x without building ΔW.

    (A1 B1) ⊙ (A2 B2) = Σ_rs (A1[:, r] ⊙ A2[:, s]) (B1[r] ⊙ B2[s]): the Hadamard product of two rank-r
    products is one product of rank r1·r2 with row-wise paired factors, so LoHa runs as a LoRA of that
    rank (down with the layer's stride/padding, then a 1x1 up). In the Tucker form the pairing gives a
    1x1 down, an (r1·r2)² k x k core and a 1x1 up. Training then never forms a weight-sized gradient."""
    a1, b1, a2, b2 = (params[k] for k in REQUIRED_KEYS)
    t1, t2 = params.get("hada_t1"), params.get("hada_t2")
    if t1 is not None:  # a: (r, out), b: (r, in), t: (r, r, kh, kw); FORMAT.md §2.2
        down = _pairwise_rows(b1, b2)
        core = torch.einsum("ijkl,IJkl->iIjJkl", t1, t2).reshape(down.shape[0], down.shape[0], *t1.shape[2:])
        up = _pairwise_rows(a1, a2).t()
        return spec.apply_pointwise(spec.apply(spec.apply_pointwise(x, down), core), up)
    down = _pairwise_rows(b1, b2)
    if spec.is_conv:
        down = down.reshape(down.shape[0], spec.in_features, *spec.kernel_size)
    up = _pairwise_rows(a1.t(), a2.t()).t()
    return spec.apply_pointwise(spec.apply(x, down), up)


def fuses(params: dict[str, Tensor], spec: LayerSpec) -> bool:
    """Whether fused() applies: Linear layers (which carry no Tucker cores)."""
    return not spec.is_conv and "hada_t1" not in params


def fused(x: Tensor, weight: Tensor, bias: Tensor | None, params: dict[str, Tensor], scale: float, spec: LayerSpec) -> Tensor:
    """F.linear(x, weight, bias) + scale·ΔW·x for a Linear layer, as one autograd node: the rank r1·r2
    LoRA of bypass()."""
    a1, b1, a2, b2 = (params[k] for k in REQUIRED_KEYS)
    return low_rank_linear(x, weight, bias, _pairwise_rows(b1, b2), _pairwise_rows(a1.t(), a2.t()).t(), scale)


def bypass_cost(params: dict[str, Tensor], spec: LayerSpec) -> int:
    """Multiply-adds per output position of bypass()."""
    pairs = params["hada_w1_b"].shape[0] * params["hada_w2_b"].shape[0]
    if "hada_t1" in params:
        return pairs * (spec.in_features + spec.out_features + pairs * spec.kernel_numel)
    return pairs * (params["hada_w1_b"].shape[1] + spec.out_features)


def rebuild_cost(params: dict[str, Tensor], spec: LayerSpec) -> int:
    """Multiply-adds to build ΔW once (two rank-r products and their Hadamard product)."""
    weight = math.prod(spec.weight_shape)
    return weight * (params["hada_w1_b"].shape[0] + params["hada_w2_b"].shape[0] + 1)
