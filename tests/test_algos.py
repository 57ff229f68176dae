"""ΔW of every algorithm variant against FORMAT.md §2, rebuilt explicitly in this file.

The references below are written from the FORMAT.md formulas with explicit loops and sums
(rank-1 outer products, Kronecker products block by block, Tucker cores by double sums) in float64;
they never call lyco. They are also used by tests/test_layer.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lyco.layer import LycoLayer

STRENGTH = 0.7


# ----- the test matrix ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    id: str
    algo: str
    rank: int = 4
    alpha: float = 3.0
    options: dict = field(default_factory=dict)
    dora: str | None = None  # "input" / "output"
    rs_lora: bool = False
    both_full: bool = False  # LoKr with w1 and w2 both full matrices: scale 1 whatever alpha

    @property
    def expected_scale(self) -> float:
        """FORMAT.md §2: s = α/r; rsLoRA runtime α/√r; LoKr with both factors full: 1."""
        if self.both_full:
            return 1.0
        if self.rs_lora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def create(self, base: nn.Module, **kwargs) -> LycoLayer:
        kwargs.setdefault("strength", STRENGTH)
        return LycoLayer.create(
            base,
            algo=self.algo,
            rank=self.rank,
            alpha=self.alpha,
            dora=self.dora is not None,
            dora_axis=self.dora or "input",
            rs_lora=self.rs_lora,
            options=dict(self.options),
            **kwargs,
        )


# Shapes with Linear(64, 96): in 64 -> (8, 8), out 96 -> (8, 12) for f=-1, so with rank 4 the LoKr w2 is
# decomposed (4 < 12/2) except with full_matrix. unbalanced_factorization swaps out to (12, 8); rank 2 keeps
# w2 decomposed there (2 < 8/2) so that alpha still matters.
VARIANTS = [
    Variant("lora", "lora"),
    Variant("lora_tucker", "lora", options={"use_tucker": True}),
    Variant("loha", "loha"),
    Variant("loha_tucker", "loha", options={"use_tucker": True}),
    Variant("lokr", "lokr"),
    Variant("lokr_f4", "lokr", options={"factor": 4}),
    Variant("lokr_decompose_both_r2", "lokr", rank=2, options={"decompose_both": True}),
    Variant("lokr_tucker", "lokr", options={"use_tucker": True}),
    Variant("lokr_full_matrix", "lokr", options={"full_matrix": True}, both_full=True),
    Variant("lokr_unbalanced_r2", "lokr", rank=2, options={"unbalanced_factorization": True}),
    Variant("lora_dora_in", "lora", dora="input"),
    Variant("lora_dora_out", "lora", dora="output"),
    Variant("loha_dora_in", "loha", dora="input"),
    Variant("loha_dora_out", "loha", dora="output"),
    Variant("lokr_dora_in", "lokr", dora="input"),
    Variant("lokr_dora_out", "lokr", dora="output"),
    Variant("lora_rs", "lora", rs_lora=True),
]
VARIANT_BY_ID = {v.id: v for v in VARIANTS}

LAYERS = {
    "linear": lambda: nn.Linear(64, 96),
    "conv1x1": lambda: nn.Conv2d(64, 96, 1),
    "conv3x3s2": lambda: nn.Conv2d(64, 96, 3, stride=2, padding=1),
}


def make_input(layer_id: str, gen: torch.Generator | None = None) -> torch.Tensor:
    if layer_id == "linear":
        return torch.randn(2, 3, 64, generator=gen)
    return torch.randn(2, 64, 7, 7, generator=gen)


def has_bypass(v: Variant) -> bool:
    return v.algo in ("lora", "loha", "lokr") and v.dora is None


@torch.no_grad()
def randomize(layer: LycoLayer, std: float = 0.2) -> None:
    """Every adapter tensor to random values (the init makes ΔW zero); dora_scale to other positive norms."""
    for p in layer.adapter.values():
        p.copy_(torch.randn_like(p) * std)
    if layer.dora_scale is not None:
        layer.dora_scale.mul_(1.0 + 0.3 * torch.rand_like(layer.dora_scale))


# ----- explicit references (FORMAT.md §2), float64 --------------------------------------------------
def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def _outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_r a[:, r] ⊗ b[r, :] as a sum of rank-1 outer products (a: (p, r), b: (r, q))."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for r in range(a.shape[1]):
        out += a[:, r, None] * b[None, r, :]
    return out


def _tucker_sum(core: torch.Tensor, w_out: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
    """W[p, q, :, :] = Σ_{i,j} core[i, j, :, :] · w_out[i, p] · w_in[j, q]  (w_out: (r, out), w_in: (r, in))."""
    r1, r2 = core.shape[:2]
    out = torch.zeros(w_out.shape[1], w_in.shape[1], *core.shape[2:], dtype=torch.float64)
    for i in range(r1):
        for j in range(r2):
            out += w_out[i][:, None, None, None] * w_in[j][None, :, None, None] * core[i, j][None, None]
    return out


def ref_lora(t: dict, wshape: tuple) -> torch.Tensor:
    up, down = _d(t["lora_up.weight"]), _d(t["lora_down.weight"])
    out_f, r = up.shape[0], up.shape[1]
    assert up.shape[2:] in ((), (1, 1)), "lora_up is (out, r) or (out, r, 1, 1)"
    up2 = up.reshape(out_f, r)
    if "lora_mid.weight" in t:
        mid = _d(t["lora_mid.weight"])
        assert down.shape[2:] == (1, 1)
        down2 = down[:, :, 0, 0]
        dw = torch.zeros(wshape, dtype=torch.float64)
        for a in range(r):
            for b in range(down2.shape[0]):
                dw += up2[:, a, None, None, None] * down2[b][None, :, None, None] * mid[a, b][None, None]
        return dw
    dw = torch.zeros(wshape, dtype=torch.float64)
    expand = (slice(None),) + (None,) * (len(wshape) - 1)
    for a in range(r):
        assert down[a].shape == wshape[1:], "lora_down rows must have the weight's (in[, k, k]) shape"
        dw += up2[:, a][expand] * down[a][None]
    return dw


def ref_loha(t: dict, wshape: tuple) -> torch.Tensor:
    if "hada_t1" in t:
        f1 = _tucker_sum(_d(t["hada_t1"]), _d(t["hada_w1_a"]), _d(t["hada_w1_b"]))
        f2 = _tucker_sum(_d(t["hada_t2"]), _d(t["hada_w2_a"]), _d(t["hada_w2_b"]))
        assert f1.shape == wshape
        return f1 * f2
    f1 = _outer_sum(_d(t["hada_w1_a"]), _d(t["hada_w1_b"]))
    f2 = _outer_sum(_d(t["hada_w2_a"]), _d(t["hada_w2_b"]))
    # (out, in·k·k), the kernel flattened: back to (out, in, k, k)
    return (f1 * f2).reshape(wshape)


def ref_lokr(t: dict, wshape: tuple) -> torch.Tensor:
    w1 = _d(t["lokr_w1"]) if "lokr_w1" in t else _outer_sum(_d(t["lokr_w1_a"]), _d(t["lokr_w1_b"]))
    out_l, in_m = w1.shape
    out_k, in_n = wshape[0] // out_l, wshape[1] // in_m
    kernel = tuple(wshape[2:])
    if "lokr_w2" in t:
        w2 = _d(t["lokr_w2"])
    elif "lokr_t2" in t:
        w2 = _tucker_sum(_d(t["lokr_t2"]), _d(t["lokr_w2_a"]), _d(t["lokr_w2_b"]))
    else:
        w2 = _outer_sum(_d(t["lokr_w2_a"]), _d(t["lokr_w2_b"]))  # (out_k, in_n·k·k) for convs
        w2 = w2.reshape(out_k, in_n, *kernel)
    assert w2.shape == (out_k, in_n, *kernel)
    dw = torch.zeros(wshape, dtype=torch.float64)
    for i in range(out_l):
        for j in range(in_m):
            dw[i * out_k:(i + 1) * out_k, j * in_n:(j + 1) * in_n] = w1[i, j] * w2
    return dw


REFERENCES = {"lora": ref_lora, "loha": ref_loha, "lokr": ref_lokr}


def reference_delta(algo: str, tensors: dict, wshape: tuple) -> torch.Tensor:
    return REFERENCES[algo](tensors, tuple(wshape))


def _norms(v: torch.Tensor, axis: str) -> torch.Tensor:
    """‖V‖ per output row (out, 1, ...) or per input column (1, in, ...)."""
    if axis == "output":
        dims = tuple(range(1, v.dim()))
    else:
        dims = (0,) + tuple(range(2, v.dim()))
    return v.square().sum(dim=dims, keepdim=True).sqrt()


def reference_weight(v: Variant, layer: LycoLayer, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """W + m·s·ΔW, or for DoRA W + m·(W'(1) − W) with W'(1) = dora_scale · V/‖V‖, V = W + s·ΔW (float64)."""
    w = _d(weight)
    dw = reference_delta(v.algo, layer.tensors(), w.shape)
    s = v.expected_scale
    if v.dora is None:
        return w + strength * s * dw
    combined = w + s * dw
    scale = _d(layer.dora_scale)
    w1 = scale * combined / _norms(combined, v.dora)
    return w + strength * (w1 - w)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


# ----- 1. ΔW against the explicit reconstruction -------------------------------------------------------
@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_delta_weight_matches_explicit_reconstruction(variant: Variant, layer_id: str) -> None:
    torch.manual_seed(0)
    base = LAYERS[layer_id]()
    layer = variant.create(base)
    assert float(layer.delta_weight().detach().abs().max()) == 0.0, "a fresh adapter must have ΔW = 0"
    randomize(layer)
    ref = reference_delta(variant.algo, layer.tensors(), base.weight.shape)
    assert ref.abs().max() > 0
    got = layer.delta_weight()
    assert tuple(got.shape) == tuple(base.weight.shape)
    assert rel_err(got, ref) < 1e-5
    assert layer.scale == pytest.approx(variant.expected_scale, rel=1e-6)
    # the pure function over the named tensors gives the same ΔW
    pure = layer.algo.delta_weight(dict(layer.tensors()), layer.spec)
    assert rel_err(pure, ref) < 1e-5


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.options.get("use_tucker")], ids=lambda v: v.id)
def test_tucker_only_for_spatial_kernels(variant: Variant, layer_id: str) -> None:
    torch.manual_seed(0)
    layer = variant.create(LAYERS[layer_id]())
    core = {"lora": "lora_mid.weight", "loha": "hada_t1", "lokr": "lokr_t2"}[variant.algo]
    assert (core in layer.tensors()) == (layer_id == "conv3x3s2")


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.dora], ids=lambda v: v.id)
def test_dora_scale_initialised_to_weight_norms(variant: Variant, layer_id: str) -> None:
    """FORMAT.md §2.4: dora_scale = norms of W, (out, 1[, 1, 1]) on the output axis, (1, in[, 1, 1]) on the input axis."""
    torch.manual_seed(0)
    base = LAYERS[layer_id]()
    layer = variant.create(base)
    w = base.weight.detach().double()
    rest = (1,) * (w.dim() - 2)
    if variant.dora == "output":
        expected = torch.stack([w[o].norm() for o in range(w.shape[0])]).reshape(w.shape[0], 1, *rest)
    else:
        expected = torch.stack([w[:, i].norm() for i in range(w.shape[1])]).reshape(1, w.shape[1], *rest)
    assert tuple(layer.dora_scale.shape) == tuple(expected.shape)
    assert rel_err(layer.dora_scale, expected) < 1e-6


# ----- 6. shapes and parameter counts (FORMAT.md tables) -----------------------------------------------
def _shapes(layer: LycoLayer) -> dict:
    return {k: tuple(p.shape) for k, p in layer.tensors().items()}


def _trainable(layer: LycoLayer) -> int:
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


LOKR_TABLE = [
    # (id, base, rank, options, expected tensors)
    ("f-1", lambda: nn.Linear(320, 640), 8, {},
     {"lokr_w1": (20, 16), "lokr_w2_a": (32, 8), "lokr_w2_b": (8, 20)}),
    ("factor8", lambda: nn.Linear(320, 640), 8, {"factor": 8},
     {"lokr_w1": (8, 8), "lokr_w2_a": (80, 8), "lokr_w2_b": (8, 40)}),
    ("factor8_decompose_both_r2", lambda: nn.Linear(320, 640), 2, {"factor": 8, "decompose_both": True},
     {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (80, 2), "lokr_w2_b": (2, 40)}),
    ("conv3x3_f-1", lambda: nn.Conv2d(320, 640, 3, padding=1), 8, {},
     {"lokr_w1": (20, 16), "lokr_w2_a": (32, 8), "lokr_w2_b": (8, 180)}),
    ("conv3x3_tucker", lambda: nn.Conv2d(320, 640, 3, padding=1), 8, {"use_tucker": True},
     {"lokr_w1": (20, 16), "lokr_t2": (8, 8, 3, 3), "lokr_w2_a": (8, 32), "lokr_w2_b": (8, 20)}),
    ("conv3x3_full_matrix", lambda: nn.Conv2d(320, 640, 3, padding=1), 8, {"full_matrix": True},
     {"lokr_w1": (20, 16), "lokr_w2": (32, 20, 3, 3)}),
]


@pytest.mark.parametrize("case", LOKR_TABLE, ids=lambda c: c[0])
def test_lokr_verified_examples_table(case) -> None:
    """FORMAT.md §2.3 'Verified examples (Linear 320→640, r=8, α=4)'."""
    torch.manual_seed(0)
    case_id, make_base, rank, options, expected = case
    base = make_base().requires_grad_(False)
    layer = LycoLayer.create(base, algo="lokr", rank=rank, alpha=4, options=options)
    assert _shapes(layer) == expected
    assert _trainable(layer) == sum(math.prod(s) for s in expected.values())
    if case_id == "conv3x3_full_matrix":
        assert float(layer.alpha) == 8.0  # stored alpha = rank (LyCORIS writes lora_dim)
        assert layer.scale == 1.0
    else:
        assert float(layer.alpha) == 4.0
        assert layer.scale == pytest.approx(4 / rank)


def _lora_table(out_f: int, in_f: int, r: int, kind: str) -> dict:
    return {
        "linear": {"lora_down.weight": (r, in_f), "lora_up.weight": (out_f, r)},
        "conv1x1": {"lora_down.weight": (r, in_f, 1, 1), "lora_up.weight": (out_f, r, 1, 1)},
        "conv3x3": {"lora_down.weight": (r, in_f, 3, 3), "lora_up.weight": (out_f, r, 1, 1)},
        "conv3x3_tucker": {"lora_down.weight": (r, in_f, 1, 1), "lora_mid.weight": (r, r, 3, 3),
                           "lora_up.weight": (out_f, r, 1, 1)},
    }[kind]


def _loha_table(out_f: int, in_f: int, r: int, kind: str) -> dict:
    if kind == "conv3x3_tucker":
        return {"hada_w1_a": (r, out_f), "hada_w1_b": (r, in_f), "hada_t1": (r, r, 3, 3),
                "hada_w2_a": (r, out_f), "hada_w2_b": (r, in_f), "hada_t2": (r, r, 3, 3)}
    in_flat = {"linear": in_f, "conv1x1": in_f, "conv3x3": in_f * 9}[kind]
    return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_flat), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_flat)}


SHAPE_BASES = {
    "linear": (lambda: nn.Linear(320, 640), {}),
    "conv1x1": (lambda: nn.Conv2d(320, 640, 1), {}),
    "conv1x1_tucker_ignored": (lambda: nn.Conv2d(320, 640, 1), {"use_tucker": True}),
    "conv3x3": (lambda: nn.Conv2d(320, 640, 3, padding=1), {}),
    "conv3x3_tucker": (lambda: nn.Conv2d(320, 640, 3, padding=1), {"use_tucker": True}),
}


@pytest.mark.parametrize("kind", list(SHAPE_BASES))
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_lora_loha_shape_tables(algo: str, kind: str) -> None:
    """FORMAT.md §2.1 / §2.2 tables (Tucker only takes effect for k x k convs)."""
    torch.manual_seed(0)
    make_base, options = SHAPE_BASES[kind]
    base = make_base().requires_grad_(False)
    layer = LycoLayer.create(base, algo=algo, rank=8, alpha=4, options=options)
    table_kind = "conv1x1" if kind == "conv1x1_tucker_ignored" else kind
    expected = (_lora_table if algo == "lora" else _loha_table)(640, 320, 8, table_kind)
    assert _shapes(layer) == expected
    assert _trainable(layer) == sum(math.prod(s) for s in expected.values())
    assert layer.scale == pytest.approx(0.5)


@pytest.mark.parametrize("alpha", [None, 1.0, 4.0, 100000.0])
def test_lokr_both_full_scale_is_one_whatever_alpha(alpha) -> None:
    """Both LoKr factors full => s = 1 and alpha ignored (readers); created adapters store alpha = rank."""
    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    # rank large enough that w2 is full even without full_matrix (r >= max(out_k, in_n)/2)
    created = LycoLayer.create(base, algo="lokr", rank=6, alpha=alpha)
    assert set(created.tensors()) == {"lokr_w1", "lokr_w2"}
    assert float(created.alpha) == 6.0
    assert created.scale == 1.0
    tensors = {"lokr_w1": torch.randn(8, 8), "lokr_w2": torch.randn(12, 8)}
    loaded = LycoLayer(base, algo="lokr", tensors=tensors, alpha=alpha, strength=STRENGTH)
    assert loaded.scale == 1.0
    x = torch.randn(5, 64)
    expected = nn.functional.linear(
        x.double(), base.weight.double() + STRENGTH * ref_lokr(tensors, (96, 64)), base.bias.double()
    )
    assert rel_err(loaded(x), expected) < 1e-5


@pytest.mark.parametrize(
    "algo,shapes",
    [("lora", {"lora_down.weight": (4, 64), "lora_up.weight": (96, 4)}),
     ("loha", {"hada_w1_a": (96, 4), "hada_w1_b": (4, 64), "hada_w2_a": (96, 4), "hada_w2_b": (4, 64)}),
     ("lokr", {"lokr_w1": (8, 8), "lokr_w2_a": (12, 4), "lokr_w2_b": (4, 8)})],
)
def test_missing_alpha_means_scale_one(algo: str, shapes: dict) -> None:
    """FORMAT.md §2 common rules: without a .alpha key ΔW is applied unscaled."""
    torch.manual_seed(0)
    tensors = {k: torch.randn(s) for k, s in shapes.items()}
    with_alpha = LycoLayer(nn.Linear(64, 96), algo=algo, tensors=tensors, alpha=2.0)
    assert with_alpha.scale == pytest.approx(0.5)
    without = LycoLayer(nn.Linear(64, 96), algo=algo, tensors=tensors, alpha=None)
    assert without.scale == 1.0


def test_rs_lora_stores_alpha_times_sqrt_rank() -> None:
    """FORMAT.md §2.1: rsLoRA runtime scale α/√r, stored alpha α·√r so that stored/r reproduces it."""
    torch.manual_seed(0)
    layer = LycoLayer.create(nn.Linear(64, 96), algo="lora", rank=16, alpha=3, rs_lora=True)
    assert float(layer.alpha) == pytest.approx(12.0)
    assert layer.scale == pytest.approx(3 / 4)


# ----- 7. factorization == LyCORIS ---------------------------------------------------------------------
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16])
def test_factorization_matches_lycoris(factor: int) -> None:
    from lycoris.functional.general import factorization as lycoris_factorization

    from lyco.algos.lokr import factorization

    mismatches = [
        (dim, factorization(dim, factor), lycoris_factorization(dim, factor))
        for dim in range(1, 2049)
        if tuple(factorization(dim, factor)) != tuple(lycoris_factorization(dim, factor))
    ]
    assert not mismatches, mismatches[:10]


# NB: FORMAT.md §2.3 (copying the LyCORIS docstring) lists 360 -> (8, 45) for f=-1 and (12, 30) for f=16;
# the LyCORIS function itself returns (18, 20) and (15, 24) (and (8, 45) for f=8). The values below are
# what lycoris-lora 4.1.3 computes.
@pytest.mark.parametrize(
    "dim,factor,expected",
    [(128, -1, (8, 16)), (360, -1, (18, 20)), (360, 16, (15, 24)), (360, 8, (8, 45)), (1024, -1, (32, 32)),
     (127, -1, (1, 127)), (250, 8, (5, 50)), (64, 16, (4, 16)), (96, 4, (4, 24))],
)
def test_factorization_docstring_examples(dim: int, factor: int, expected: tuple) -> None:
    from lyco.algos.lokr import factorization

    assert tuple(factorization(dim, factor)) == expected
