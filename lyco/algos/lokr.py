"""LoKr: ΔW = kron(w1, w2) with w1 the small factor and w2 optionally low-rank or Tucker.

FORMAT.md §2.3. Keys: lokr_w1 | lokr_w1_a + lokr_w1_b, and lokr_w2 | lokr_w2_a + lokr_w2_b (+ lokr_t2).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..fused import kronecker_linear
from ..spec import LayerSpec
from .tucker import rebuild_tucker

NAME = "lokr"
REQUIRED_KEYS = ()  # one of the w1 forms and one of the w2 forms, checked by has_complete_keys
OPTIONAL_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OPTIONS = ("factor", "decompose_both", "full_matrix", "use_tucker", "unbalanced_factorization")
UP_KEYS = ("lokr_w2", "lokr_w2_b")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split dim into (m, n), m <= n, m * n = dim: (factor, dim/factor) when factor divides dim,
    otherwise the most square split whose smaller side does not exceed factor (-1 = no limit)."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))  # type: ignore[return-value]
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        candidate = m + 1
        while dim % candidate:
            candidate += 1
        if candidate + dim // candidate > m + n or candidate > limit:
            break
        m, n = candidate, dim // candidate
    return (m, n) if m <= n else (n, m)


def split_dims(spec: LayerSpec, *, factor: int = -1, unbalanced_factorization: bool = False) -> tuple[int, int, int, int]:
    """(out_l, out_k, in_m, in_n): w1 is (out_l, in_m), w2 is (out_k, in_n[, k, k])."""
    in_m, in_n = factorization(spec.in_features, factor)
    out_l, out_k = factorization(spec.out_features, factor)
    if unbalanced_factorization:
        out_l, out_k = out_k, out_l
    return out_l, out_k, in_m, in_n


def param_shapes(
    spec: LayerSpec,
    rank: int,
    *,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
    use_tucker: bool = False,
    unbalanced_factorization: bool = False,
) -> dict[str, tuple[int, ...]]:
    out_l, out_k, in_m, in_n = split_dims(spec, factor=factor, unbalanced_factorization=unbalanced_factorization)
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(out_l, in_m) / 2 and not full_matrix:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, rank), (rank, in_m)
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    full = full_matrix or rank >= max(out_k, in_n) / 2
    return shapes | _w2_shapes(spec, out_k, in_n, rank, full=full, tucker=use_tucker and spec.has_spatial_kernel)


def _w2_shapes(spec: LayerSpec, out_k: int, in_n: int, rank: int, *, full: bool, tucker: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the second (large) Kronecker factor: full, Tucker, or a rank-`rank` product."""
    if full:
        return {"lokr_w2": (out_k, in_n, *spec.kernel_size) if spec.is_conv else (out_k, in_n)}
    if tucker:
        return {"lokr_t2": (rank, rank, *spec.kernel_size), "lokr_w2_a": (rank, out_k), "lokr_w2_b": (rank, in_n)}
    in_flat = in_n * spec.kernel_numel if spec.is_conv else in_n
    return {"lokr_w2_a": (out_k, rank), "lokr_w2_b": (rank, in_flat)}


def expected_shapes(params: dict[str, Tensor], spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    """The exact shapes these tensors must have on this layer, given the split w1 implies."""
    w1_shape = params["lokr_w1"].shape if "lokr_w1" in params else (params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[1])
    out_l, in_m = w1_shape
    if out_l < 1 or in_m < 1 or spec.out_features % out_l or spec.in_features % in_m:
        return {"lokr_w1": (-1, -1)}  # no split of this layer's dims fits w1: report the mismatch
    out_k, in_n = spec.out_features // out_l, spec.in_features // in_m
    shapes: dict[str, tuple[int, ...]] = {}
    if "lokr_w1" in params:
        shapes["lokr_w1"] = (out_l, in_m)
    else:
        r1 = params["lokr_w1_b"].shape[0]
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, r1), (r1, in_m)
    full = "lokr_w2" in params
    rank = 0 if full else params["lokr_w2_b"].shape[0]
    return shapes | _w2_shapes(spec, out_k, in_n, rank, full=full, tucker="lokr_t2" in params)


def init_params(spec: LayerSpec, rank: int, **options) -> dict[str, Tensor]:
    params = {name: torch.empty(shape) for name, shape in param_shapes(spec, rank, **options).items()}
    for name, tensor in params.items():
        if name in ("lokr_w2", "lokr_w2_b"):
            torch.nn.init.zeros_(tensor)
        else:
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return params


def has_complete_keys(keys: set[str]) -> bool:
    has_w1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
    has_w2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
    return has_w1 and has_w2


def scale_rank(params: dict[str, Tensor]) -> int | None:
    """The rank alpha divides by; None when both factors are full matrices (scale 1)."""
    if "lokr_w2_b" in params:
        return params["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in params:
        return params["lokr_w1_b"].shape[0]
    return None


def w1_matrix(params: dict[str, Tensor]) -> Tensor:
    if "lokr_w1" in params:
        return params["lokr_w1"]
    return params["lokr_w1_a"] @ params["lokr_w1_b"]


def w2_tensor(params: dict[str, Tensor], spec: LayerSpec, out_k: int, in_n: int) -> Tensor:
    """w2 in (out_k, in_n) for linear layers or (out_k, in_n, k, k) for convs."""
    if "lokr_w2" in params:
        w2 = params["lokr_w2"]
    elif "lokr_t2" in params:
        w2 = rebuild_tucker(params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"])
    else:
        w2 = params["lokr_w2_a"] @ params["lokr_w2_b"]
    return w2.reshape(out_k, in_n, *spec.kernel_size) if spec.is_conv else w2.reshape(out_k, in_n)


def _factor_sizes(params: dict[str, Tensor], spec: LayerSpec) -> tuple[int, int, int, int]:
    w1 = w1_matrix(params)
    out_l, in_m = w1.shape
    return out_l, spec.out_features // out_l, in_m, spec.in_features // in_m


def delta_weight(params: dict[str, Tensor], spec: LayerSpec) -> Tensor:
    _, out_k, _, in_n = _factor_sizes(params, spec)
    w1 = w1_matrix(params)
    w2 = w2_tensor(params, spec, out_k, in_n)
    if spec.is_conv:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(spec.weight_shape)


def bypass(x: Tensor, params: dict[str, Tensor], spec: LayerSpec) -> Tensor:
    """ΔW·x through the Kronecker identity kron(A, B)·vec(X) = vec(A·X·Bᵀ), never building ΔW."""
    out_l, out_k, in_m, in_n = _factor_sizes(params, spec)
    w1 = w1_matrix(params)
    if not spec.is_conv:
        grouped = x.reshape(*x.shape[:-1], in_m, in_n)
        mixed = _w2_apply(grouped, params, spec, out_k, in_n)  # (..., in_m, out_k)
        return torch.einsum("...jp,ij->...ip", mixed, w1).reshape(*x.shape[:-1], spec.out_features)
    batch = x.shape[0]
    grouped = x.reshape(batch * in_m, in_n, *x.shape[2:])
    mixed = _w2_apply(grouped, params, spec, out_k, in_n)  # (B*in_m, out_k, H', W')
    mixed = mixed.reshape(batch, in_m, out_k, *mixed.shape[2:])
    out = torch.einsum("bjp...,ij->bip...", mixed, w1)
    return out.reshape(batch, spec.out_features, *out.shape[3:])


def fuses(params: dict[str, Tensor], spec: LayerSpec) -> bool:
    """Whether fused() applies and pays off: Linear layers only; it applies w2 built as one matrix,
    which for a low-rank w2 must cost at most twice the two factored products per position (the fused
    node saves more than that)."""
    if spec.is_conv:
        return False
    if "lokr_w2" in params:
        return True
    if "lokr_t2" in params:
        return False
    w2_a, w2_b = params["lokr_w2_a"], params["lokr_w2_b"]
    return w2_a.shape[0] * w2_b.shape[1] <= 2 * (w2_a.numel() + w2_b.numel())


def fused(x: Tensor, weight: Tensor, bias: Tensor | None, params: dict[str, Tensor], scale: float, spec: LayerSpec) -> Tensor:
    """F.linear(x, weight, bias) + scale·ΔW·x for a Linear layer, as one autograd node."""
    _, out_k, _, in_n = _factor_sizes(params, spec)
    return kronecker_linear(x, weight, bias, w1_matrix(params), w2_tensor(params, spec, out_k, in_n), scale)


def _w2_apply(grouped: Tensor, params: dict[str, Tensor], spec: LayerSpec, out_k: int, in_n: int) -> Tensor:
    """Apply w2 (the layer-shaped factor) to inputs whose channel axis holds in_n features."""
    if "lokr_w2" in params:
        return spec.apply(grouped, w2_tensor(params, spec, out_k, in_n))
    w2_a, w2_b = params["lokr_w2_a"], params["lokr_w2_b"]
    if "lokr_t2" in params:
        reduced = spec.apply_pointwise(grouped, w2_b)
        return spec.apply_pointwise(spec.apply(reduced, params["lokr_t2"]), w2_a.t())
    if spec.is_conv:
        reduced = spec.apply(grouped, w2_b.reshape(w2_b.shape[0], in_n, *spec.kernel_size))
        return spec.apply_pointwise(reduced, w2_a)
    return spec.apply_pointwise(spec.apply_pointwise(grouped, w2_b), w2_a)


def bypass_cost(params: dict[str, Tensor], spec: LayerSpec) -> int:
    """Multiply-adds per output position of bypass()."""
    out_l, out_k, in_m, _ = _factor_sizes(params, spec)
    w2_cost = sum(p.numel() for name, p in params.items() if name.startswith(("lokr_w2", "lokr_t2")))
    return in_m * w2_cost + out_l * in_m * out_k


def rebuild_cost(params: dict[str, Tensor], spec: LayerSpec) -> int:
    """Multiply-adds to build ΔW once (the Kronecker product plus w2)."""
    return 2 * math.prod(spec.weight_shape)
