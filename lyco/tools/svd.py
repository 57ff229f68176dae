"""Rank selection and low-rank factorisation by truncated SVD (pure functions, no model, no files).

Conventions follow kohya-ss/sd-scripts `networks/resize_lora.py` (`index_sv_ratio`, `index_sv_fro`,
`index_sv_cumulative`, `rank_resize`) and `networks/extract_lora_from_models.py`:

- the factor layout is sd-scripts': `up = U·S` (out, r), `down = Vh` (r, in), so `up @ down` is the
  best rank-r approximation (Eckart-Young);
- `rank` is the fixed rank, and the hard upper limit when a dynamic method is used;
- a matrix whose largest singular value is <= MIN_SV (sd-scripts' zero-matrix rule) gets rank 1.

Dynamic methods (`s` sorted descending):

- `sv_ratio`: keep the singular values with s >= s_max / param. sd-scripts counts `S > min_sv`
  (strict); lyco keeps ties, so a value exactly at the threshold is kept.
- `sv_fro`: the smallest rank whose retained Frobenius fraction sqrt(sum_kept s^2 / sum s^2) >= param
  (sd-scripts searches the cumulative s^2 fraction for param^2; the same rank).
- `sv_cumulative`: the smallest rank whose cumulative sum of s >= param * sum(s).

Thresholds are compared in float64 with a relative slack of 1e-5 (float32 SVD accuracy), so a value
or cumulative fraction equal to the target up to rounding (0.6 + 0.3 vs 0.9, or a singular value
computed as 1.9999995 for 8/4) counts as reaching it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # sd-scripts resize_lora.py MIN_SV: below this the matrix counts as zero
_SLACK = 1e-5


@dataclass(frozen=True)
class RankRule:
    """How to pick the rank of one layer: fixed `rank`, or a dynamic `method` with `param`, capped at `rank`."""

    rank: int | None = None
    method: str | None = None
    param: float | None = None

    def __post_init__(self) -> None:
        if self.method is None:
            if self.rank is None or self.rank < 1:
                raise ValueError(f"a fixed rank must be >= 1, got {self.rank}")
            return
        if self.method not in DYNAMIC_METHODS:
            raise ValueError(f"unknown dynamic method {self.method!r}; choose one of {DYNAMIC_METHODS}")
        if self.param is None:
            raise ValueError(f"{self.method} needs a parameter (--dynamic-param)")
        if self.method == "sv_ratio" and self.param < 1:
            raise ValueError(f"sv_ratio is max(s)/min(kept s) and must be >= 1, got {self.param}")
        if self.method in ("sv_fro", "sv_cumulative") and not 0 < self.param <= 1:
            raise ValueError(f"{self.method} is a fraction in (0, 1], got {self.param}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"the maximum rank must be >= 1, got {self.rank}")

    def select(self, singular_values: Tensor) -> int:
        return select_rank(singular_values, rank=self.rank, method=self.method, param=self.param)

    def describe(self) -> str:
        if self.method is None:
            return f"rank {self.rank}"
        cap = f", max rank {self.rank}" if self.rank is not None else ""
        return f"{self.method}={self.param:g}{cap}"


def select_rank(s: Tensor, *, rank: int | None = None, method: str | None = None, param: float | None = None) -> int:
    """The rank to keep for singular values `s` (descending): between 1 and len(s)."""
    if s.numel() == 0:
        raise ValueError("no singular values")
    values = s.detach().double().cpu()
    available = values.numel()
    if float(values[0]) <= MIN_SV:
        return 1
    if method is None:
        if rank is None:
            raise ValueError("pass a rank or a dynamic method")
        chosen = rank
    elif method == "sv_ratio":
        chosen = int((values >= values[0] / param * (1 - _SLACK)).sum())
    elif method == "sv_fro":
        fraction = values.pow(2).cumsum(0) / values.pow(2).sum()
        chosen = _first_reaching(fraction, float(param) ** 2)
    elif method == "sv_cumulative":
        fraction = values.cumsum(0) / values.sum()
        chosen = _first_reaching(fraction, float(param))
    else:
        raise ValueError(f"unknown dynamic method {method!r}; choose one of {DYNAMIC_METHODS}")
    if rank is not None:
        chosen = min(chosen, rank)
    return max(1, min(chosen, available))


def _first_reaching(fraction: Tensor, target: float) -> int:
    reached = torch.nonzero(fraction >= target * (1 - _SLACK))
    return int(reached[0]) + 1 if reached.numel() else fraction.numel()


def fro_retained(s: Tensor, rank: int) -> float:
    """sqrt(sum of the kept s^2 / sum of all s^2): the fraction of ||ΔW||_F a rank-r truncation keeps."""
    squares = s.detach().double().pow(2)
    total = float(squares.sum())
    return 1.0 if total == 0 else float(squares[:rank].sum() / total) ** 0.5


def sum_retained(s: Tensor, rank: int) -> float:
    values = s.detach().double().abs()
    total = float(values.sum())
    return 1.0 if total == 0 else float(values[:rank].sum() / total)


@dataclass
class LowRank:
    """A rank-r factorisation `up @ down` of a matrix, with the full spectrum it was cut from."""

    up: Tensor  # (out, r) = U·S
    down: Tensor  # (r, in) = Vh
    singular_values: Tensor  # every singular value of the original matrix (descending)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def fro_retained(self) -> float:
        return fro_retained(self.singular_values, self.rank)

    @property
    def sum_retained(self) -> float:
        return sum_retained(self.singular_values, self.rank)

    @property
    def max_ratio(self) -> float:
        """s_max / s_min over the kept singular values (sd-scripts' `max_ratio`)."""
        s = self.singular_values
        last = float(s[self.rank - 1])
        return float("inf") if last == 0 else float(s[0]) / last


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError:  # ill-conditioned input on some LAPACK builds: retry in float64
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def truncated_svd(matrix: Tensor, rule: RankRule, *, clamp_quantile: float | None = None, device: str | torch.device | None = None) -> LowRank:
    """Best rank-r factorisation of a 2-D matrix (computed in float32 on `device`, returned on the CPU)."""
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    work = matrix.detach().to(device=device or matrix.device, dtype=torch.float32)
    u, s, vh = _svd(work)
    return _cut(u, s, vh, rule, clamp_quantile)


def factored_svd(up: Tensor, down: Tensor, rule: RankRule, *, clamp_quantile: float | None = None, device: str | torch.device | None = None) -> LowRank:
    """Truncated SVD of `up @ down` (out, k) x (k, in) without forming the product: QR of both factors
    and an SVD of the small k x k core. Exact (same spectrum as the dense SVD) and cheap for LoRA ranks."""
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"factored_svd needs (out, k) and (k, in) factors, got {tuple(up.shape)} and {tuple(down.shape)}")
    device = device or up.device
    up = up.detach().to(device=device, dtype=torch.float32)
    down = down.detach().to(device=device, dtype=torch.float32)
    q_up, r_up = torch.linalg.qr(up)  # up = Qu Ru, Qu (out, m)
    q_down, r_down = torch.linalg.qr(down.t())  # downᵀ = Qd Rd, Qd (in, n)
    core_u, s, core_vh = _svd(r_up @ r_down.t())  # up @ down = Qu (Ru Rdᵀ) Qdᵀ
    return _cut(q_up @ core_u, s, core_vh @ q_down.t(), rule, clamp_quantile)


def _cut(u: Tensor, s: Tensor, vh: Tensor, rule: RankRule, clamp_quantile: float | None) -> LowRank:
    rank = rule.select(s)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None:
        up, down = clamp_factors(up, down, clamp_quantile)
    return LowRank(up.contiguous().cpu(), down.contiguous().cpu(), s.cpu())


def clamp_factors(up: Tensor, down: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """Clip both factors to ±(the `quantile` of their absolute values), as sd-scripts'
    extract_lora_from_models.py does with `clamp_quantile` (it takes the quantile of the signed values
    of cat(U·S, Vh) and clamps to ±hi; the absolute-value quantile is the symmetric form of that rule).
    Removes outliers of the factors at the cost of exactness; 1.0 changes nothing."""
    if not 0 < quantile <= 1:
        raise ValueError(f"clamp quantile must be in (0, 1], got {quantile}")
    if quantile == 1:
        return up, down
    values = torch.cat([up.flatten(), down.flatten()]).abs().double()
    hi = _quantile(values, quantile)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _quantile(values: Tensor, q: float) -> float:
    """torch.quantile's linear interpolation, without its 16M-element input limit."""
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def as_matrix(delta: Tensor) -> Tensor:
    """ΔW as the 2-D matrix that is factorised: (out, in) or, for convs, (out, in·k·k)."""
    return delta.reshape(delta.shape[0], -1)


def lora_tensors(low: LowRank, weight_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """The factors in the kohya LoRA/LoCon layout for a layer of `weight_shape` (FORMAT.md §2.1):
    Linear down (r, in), up (out, r); Conv down (r, in, k, k), up (out, r, 1, 1)."""
    rank = low.rank
    if len(weight_shape) == 2:
        return {"lora_down.weight": low.down, "lora_up.weight": low.up}
    out_f, in_f, *kernel = weight_shape
    return {
        "lora_down.weight": low.down.reshape(rank, in_f, *kernel).contiguous(),
        "lora_up.weight": low.up.reshape(out_f, rank, 1, 1).contiguous(),
    }
