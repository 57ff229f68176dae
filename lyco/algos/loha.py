"""LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), or the Tucker form for k x k convs.

FORMAT.md §2.2. Keys: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, optional hada_t1, hada_t2.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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
