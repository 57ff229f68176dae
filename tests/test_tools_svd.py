"""Rank selection (sd-scripts resize_lora.py conventions) and low-rank factorisation helpers."""
from __future__ import annotations

import pytest
import torch

from lyco.tools.svd import (
    LowRank, RankRule, clamp_factors, factored_svd, fro_retained, lora_tensors, select_rank, sum_retained, truncated_svd,
)
from lyco.tools.svd import _quantile

SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])


def matrix_with_spectrum(s: torch.Tensor, out_f: int = 12, in_f: int = 10, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, len(s), generator=gen, dtype=torch.float64))
    return (u * s.double()) @ v.t()


@pytest.mark.parametrize(
    "method, param, expected",
    [
        # sv_ratio: keep s >= s_max / param (8/4 = 2 -> 8, 4, 2; the value at the threshold is kept)
        ("sv_ratio", 4.0, 3),
        ("sv_ratio", 3.9, 2),
        ("sv_ratio", 1.0, 1),
        ("sv_ratio", 1000.0, 6),
        # sv_fro: smallest r with sqrt(sum_{i<r} s^2 / sum s^2) >= param; squares 64, 16, 4, 1, .25, .0625 of 85.3125
        ("sv_fro", 0.866, 1),  # sqrt(64/85.31) = 0.8661
        ("sv_fro", 0.87, 2),  # sqrt(80/85.31) = 0.9684
        ("sv_fro", 0.99, 3),  # sqrt(84/85.31) = 0.9923
        ("sv_fro", 1.0, 6),
        # sv_cumulative: smallest r with sum_{i<r} s >= param * sum s; cumulative 8, 12, 14, 15, 15.5, 15.75 of 15.75
        ("sv_cumulative", 12 / 15.75, 2),  # exactly reached at rank 2
        ("sv_cumulative", 0.5, 1),
        ("sv_cumulative", 0.9, 4),  # 14/15.75 = 0.889 < 0.9 <= 15/15.75
        ("sv_cumulative", 1.0, 6),
    ],
)
def test_dynamic_methods_pick_expected_ranks(method, param, expected):
    assert select_rank(SPECTRUM, method=method, param=param) == expected
    assert RankRule(None, method, param).select(SPECTRUM) == expected


def test_cumulative_fraction_equal_up_to_rounding_counts_as_reached():
    # 0.6 + 0.3 is 0.8999999999999999 in floating point: still rank 2 for a target of 0.9
    assert select_rank(torch.tensor([0.6, 0.3, 0.1]), method="sv_cumulative", param=0.9) == 2


def test_dynamic_rank_is_capped_by_rank_and_fixed_rank_by_the_spectrum():
    assert select_rank(SPECTRUM, rank=2, method="sv_ratio", param=1000.0) == 2
    assert select_rank(SPECTRUM, rank=4) == 4
    assert select_rank(SPECTRUM, rank=100) == 6


def test_zero_matrix_gets_rank_one():
    assert select_rank(torch.zeros(5), rank=4) == 1
    assert select_rank(torch.zeros(5), method="sv_fro", param=0.9) == 1


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(method="sv_nope", param=1.0), dict(method="sv_fro"),
                                    dict(method="sv_fro", param=1.5), dict(method="sv_ratio", param=0.5)])
def test_invalid_rules_are_rejected(kwargs):
    with pytest.raises(ValueError):
        RankRule(kwargs.pop("rank", None), **kwargs)


def test_truncated_svd_is_the_eckart_young_optimum():
    a = matrix_with_spectrum(SPECTRUM).float()
    low = truncated_svd(a, RankRule(3))
    assert low.rank == 3 and low.up.shape == (12, 3) and low.down.shape == (3, 10)
    error = torch.linalg.matrix_norm(a - low.up @ low.down)
    torch.testing.assert_close(error, SPECTRUM[3:].norm(), rtol=1e-4, atol=1e-5)
    assert low.fro_retained == pytest.approx(float(SPECTRUM[:3].norm() / SPECTRUM.norm()), rel=1e-5)
    assert low.sum_retained == pytest.approx(14 / 15.75, rel=1e-5)
    assert low.max_ratio == pytest.approx(4.0, rel=1e-5)


def test_full_rank_reconstructs_exactly():
    a = torch.randn(9, 7, generator=torch.Generator().manual_seed(1))
    low = truncated_svd(a, RankRule(100))
    assert low.rank == 7
    torch.testing.assert_close(low.up @ low.down, a, rtol=1e-5, atol=1e-5)


def test_factored_svd_matches_the_dense_svd_without_forming_the_product():
    gen = torch.Generator().manual_seed(2)
    up, down = torch.randn(20, 5, generator=gen), torch.randn(5, 30, generator=gen)
    dense = truncated_svd(up @ down, RankRule(3))
    factored = factored_svd(up, down, RankRule(3))
    torch.testing.assert_close(factored.singular_values, dense.singular_values[:5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(factored.up @ factored.down, dense.up @ dense.down, rtol=1e-4, atol=1e-4)
    full = factored_svd(up, down, RankRule(64))
    assert full.rank == 5
    torch.testing.assert_close(full.up @ full.down, up @ down, rtol=1e-4, atol=1e-4)


def test_clamp_quantile_bounds_both_factors():
    gen = torch.Generator().manual_seed(3)
    up, down = torch.randn(50, 4, generator=gen), torch.randn(4, 60, generator=gen)
    up[0, 0] = 100.0
    clamped_up, clamped_down = clamp_factors(up, down, 0.9)
    hi = _quantile(torch.cat([up.flatten(), down.flatten()]).abs().double(), 0.9)
    assert clamped_up.abs().max() <= hi + 1e-6 and clamped_down.abs().max() <= hi + 1e-6
    assert clamp_factors(up, down, 1.0)[0] is up
    with pytest.raises(ValueError):
        clamp_factors(up, down, 0.0)


def test_quantile_matches_torch():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for q in (0.0, 0.5, 0.99, 1.0):
        assert _quantile(values, q) == pytest.approx(float(torch.quantile(values, q)))


def test_kohya_layouts():
    low = LowRank(torch.randn(16, 3), torch.randn(3, 8 * 9), torch.ones(3))
    conv = lora_tensors(low, (16, 8, 3, 3))
    assert conv["lora_down.weight"].shape == (3, 8, 3, 3) and conv["lora_up.weight"].shape == (16, 3, 1, 1)
    pointwise = lora_tensors(LowRank(torch.randn(16, 3), torch.randn(3, 8), torch.ones(3)), (16, 8, 1, 1))
    assert pointwise["lora_down.weight"].shape == (3, 8, 1, 1)
    linear = lora_tensors(LowRank(torch.randn(16, 3), torch.randn(3, 8), torch.ones(3)), (16, 8))
    assert linear["lora_down.weight"].shape == (3, 8) and linear["lora_up.weight"].shape == (16, 3)


def test_retained_fractions():
    assert fro_retained(SPECTRUM, 6) == pytest.approx(1.0)
    assert sum_retained(SPECTRUM, 1) == pytest.approx(8 / 15.75)
    assert fro_retained(torch.zeros(3), 1) == 1.0
