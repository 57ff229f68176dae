"""LycoLayer: forward paths, merge/unmerge, fresh-adapter identity, gradients, dropouts, nesting, errors.

Expected outputs are F.linear / F.conv2d with weights built from the explicit FORMAT.md references in
tests/test_algos.py (float64), never from lyco's own ΔW.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lyco.layer import LycoLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_algos import (  # noqa: E402
    LAYERS,
    STRENGTH,
    VARIANT_BY_ID,
    VARIANTS,
    Variant,
    has_bypass,
    make_input,
    randomize,
    reference_delta,
    reference_weight,
    rel_err,
)

TOL = 1e-5
PATHS = ["bypass", "rebuild", "merged"]


def apply_base(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's op with another weight, in float64."""
    bias = None if base.bias is None else base.bias.detach().double()
    if isinstance(base, nn.Linear):
        return F.linear(x.double(), weight.double(), bias)
    return F.conv2d(x.double(), weight.double(), bias, base.stride, base.padding, base.dilation)


def run_path(layer: LycoLayer, x: torch.Tensor, path: str) -> torch.Tensor:
    if path == "merged":
        layer.merge()
        try:
            return layer(x).detach()
        finally:
            layer.unmerge()
    layer.path = path
    return layer(x).detach()


def build(variant: Variant, layer_id: str, **kwargs) -> tuple[nn.Module, LycoLayer]:
    base = LAYERS[layer_id]()
    return base, variant.create(base, **kwargs)


# ----- 2. forward on each path == F.linear/F.conv2d with the reference weight --------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_forward_matches_reference_weight(variant: Variant, layer_id: str, path: str) -> None:
    torch.manual_seed(1)
    base, layer = build(variant, layer_id)
    randomize(layer)
    x = make_input(layer_id)
    weight = base.weight.detach().clone()
    expected = apply_base(base, x, reference_weight(variant, layer, weight, STRENGTH))
    if path == "bypass" and not has_bypass(variant):
        layer.path = "bypass"
        with pytest.raises(ValueError, match="bypass"):
            layer(x)
        return
    got = run_path(layer, x, path)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < TOL
    # the adapter's effect is not negligible (so a wrong strength/scale would fail)
    assert rel_err(base(x).detach(), expected) > 1e-2
    assert torch.equal(base.weight, weight)


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_contribution_matches_reference(variant: Variant, layer_id: str) -> None:
    torch.manual_seed(2)
    base, layer = build(variant, layer_id)
    randomize(layer)
    weight = base.weight.detach()
    expected = reference_weight(variant, layer, weight, STRENGTH) - weight.double()
    assert rel_err(layer.contribution(), expected) < TOL
    assert rel_err(layer.effective_weight(), expected + weight.double()) < TOL


@pytest.mark.parametrize("strength", [0.0, -0.5, 2.0])
@pytest.mark.parametrize("variant_id", ["lora", "lokr_tucker", "loha_dora_out"])
def test_other_strengths(variant_id: str, strength: float) -> None:
    """m = 0 is the base layer (also for DoRA, A1111/ComfyUI convention), other m follow the formula."""
    torch.manual_seed(3)
    variant = VARIANT_BY_ID[variant_id]
    base, layer = build(variant, "conv3x3s2", strength=strength)
    randomize(layer)
    x = make_input("conv3x3s2")
    expected = apply_base(base, x, reference_weight(variant, layer, base.weight, strength))
    for path in ["rebuild", "merged"]:
        assert rel_err(run_path(layer, x, path), expected) < TOL
    if strength == 0.0:
        assert torch.equal(layer(x), base(x))


# ----- 3. wrapped == merged; unmerge is bit-exact ------------------------------------------------------
@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_wrapped_equals_merged_and_unmerge_is_exact(variant: Variant, layer_id: str) -> None:
    torch.manual_seed(4)
    base, layer = build(variant, layer_id)
    randomize(layer)
    x = make_input(layer_id)
    original = base.weight.detach().clone()
    base_out = base(x).detach()
    wrapped = {p: run_path(layer, x, p) for p in (["bypass"] if has_bypass(variant) else []) + ["rebuild"]}
    layer.merge()
    assert layer.merged
    assert not torch.equal(base.weight, original)
    merged = layer(x).detach()
    assert torch.equal(merged, base(x).detach()), "merged layer must run only the base op"
    for out in wrapped.values():
        assert rel_err(out, merged) < TOL
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(base.weight, original)
    assert torch.equal(base(x), base_out)


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant_id", ["lora_tucker", "loha", "lokr_decompose_both_r2", "lokr_dora_in", "lora_dora_out"])
def test_twenty_merge_unmerge_cycles_with_strength_changes(variant_id: str, layer_id: str) -> None:
    torch.manual_seed(5)
    variant = VARIANT_BY_ID[variant_id]
    base, layer = build(variant, layer_id)
    randomize(layer)
    x = make_input(layer_id)
    original = base.weight.detach().clone()
    for cycle in range(20):
        layer.strength = float(torch.empty(()).uniform_(-1.5, 1.5))
        expected = reference_weight(variant, layer, original, layer.strength)
        layer.merge()
        layer.merge()  # a second merge is a no-op
        assert rel_err(base.weight, expected) < TOL
        if cycle % 3 == 0:
            layer.strength = 0.25  # changing the strength while merged must not break unmerge
        layer.unmerge()
        layer.unmerge()  # a second unmerge is a no-op
        assert torch.equal(base.weight, original), f"cycle {cycle}"
    layer.strength = 0.25
    assert rel_err(run_path(layer, x, "rebuild"), apply_base(base, x, reference_weight(variant, layer, original, 0.25))) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_half_precision_merge(variant: Variant, layer_id: str, dtype: torch.dtype) -> None:
    """Merge math in fp32 then one rounding to the weight dtype; unmerge restores the half weight bit-exactly."""
    torch.manual_seed(6)
    base = LAYERS[layer_id]().to(dtype)
    layer = variant.create(base)
    randomize(layer)
    original = base.weight.detach().clone()
    contribution = layer.contribution(dtype=torch.float32).detach()
    expected = reference_weight(variant, layer, original.float(), STRENGTH)
    assert rel_err(contribution + original.float(), expected) < TOL
    for _ in range(3):
        layer.merge()
        assert base.weight.dtype == dtype
        assert torch.equal(base.weight, (original.float() + contribution).to(dtype))
        layer.unmerge()
        assert torch.equal(base.weight, original)


# ----- 4. a fresh adapter changes nothing --------------------------------------------------------------
def _variant_paths(paths: list) -> list:
    """(variant, path) pairs, leaving out bypass where the variant has none (that error is tested above)."""
    return [
        pytest.param(v, p, id=f"{v.id}-{p}")
        for v in VARIANTS
        for p in paths
        if p != "bypass" or has_bypass(v)
    ]


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant,path", _variant_paths(["auto", "bypass", "rebuild", "merged", "auto_no_grad"]))
def test_fresh_adapter_is_bit_identical(variant: Variant, path: str, layer_id: str) -> None:
    torch.manual_seed(7)
    base, layer = build(variant, layer_id)
    x = make_input(layer_id)
    expected = base(x).detach()
    original = base.weight.detach().clone()
    if path == "auto_no_grad":
        layer.path = "auto"
        with torch.no_grad():
            got = layer(x)
    else:
        got = run_path(layer, x, path)
    assert torch.equal(got, expected)
    if path == "merged":
        layer.merge()
        assert torch.equal(base.weight, original)
        layer.unmerge()
    assert torch.equal(base.weight, original)


# ----- 5. gradients only for adapter parameters --------------------------------------------------------
@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant,path", _variant_paths(["bypass", "rebuild"]))
def test_only_adapter_parameters_get_gradients(variant: Variant, path: str, layer_id: str) -> None:
    torch.manual_seed(8)
    base = LAYERS[layer_id]().requires_grad_(False)
    layer = variant.create(base, path=path)
    x = make_input(layer_id)
    adapter_names = {n for n, p in layer.named_parameters() if not n.startswith("base.")}
    assert adapter_names, "the adapter must have trainable parameters"
    expected_count = len(layer.tensors()) + (1 if variant.dora else 0)
    assert len(adapter_names) == expected_count
    # fresh init: every parameter still gets a gradient (zeros allowed, None not)
    layer(x).square().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(grads[n] is not None for n in adapter_names), [n for n in adapter_names if grads[n] is None]
    assert base.weight.grad is None and base.bias.grad is None
    assert not base.weight.requires_grad
    # random tensors: every gradient is non-zero
    layer.zero_grad(set_to_none=True)
    randomize(layer)
    layer(x).square().sum().backward()
    for n, p in layer.named_parameters():
        if n in adapter_names:
            assert p.grad is not None and p.grad.abs().max() > 0, n
            assert torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("use_tucker", [False, True])
def test_loha_backward_keeps_only_the_factors(use_tucker: bool) -> None:
    """LoHa's gradients equal those of the plain formula, while autograd keeps the input and the small
    factors only: neither the two factor products nor the summed weight the conv needs."""
    torch.manual_seed(9)
    conv = nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
    layer = LycoLayer.create(conv, algo="loha", rank=4, alpha=2.0, options={"use_tucker": use_tucker})
    randomize(layer)
    layer.path = "rebuild"
    x = torch.randn(2, 64, 6, 6)
    saved: list[int] = []
    own = {p.data_ptr() for p in layer.parameters()}  # saving a parameter costs no memory

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in own:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.square().sum().backward()
    ours = {k: p.grad.clone() for k, p in layer.adapter.items()}

    params = {k: p.detach().clone().requires_grad_(True) for k, p in layer.adapter.items()}
    factors = []
    for n in ("1", "2"):
        a, b = params[f"hada_w{n}_a"], params[f"hada_w{n}_b"]
        if use_tucker:  # FORMAT.md §2.2: t[i,j,k,l] contracted with a[i,o] and b[j,i']
            factors.append(torch.einsum("ijkl,io,jp->opkl", params[f"hada_t{n}"], a, b))
        else:
            factors.append((a @ b).reshape(conv.weight.shape))
    delta = factors[0] * factors[1] * (layer.alpha / 4)
    F.conv2d(x, conv.weight + delta, conv.bias, padding=1).square().sum().backward()
    for key, grad in ours.items():
        torch.testing.assert_close(grad, params[key].grad, rtol=1e-4, atol=1e-5, msg=key)
    weight_bytes = conv.weight.numel() * conv.weight.element_size()
    assert sum(saved) <= x.numel() * x.element_size(), sum(saved) / weight_bytes


def _train_step(layer: LycoLayer, x: torch.Tensor, upstream: torch.Tensor) -> tuple[dict, int]:
    """Gradients of <layer(x), upstream> for x and every adapter tensor, and the bytes autograd saved
    beyond the layer's own parameters (saving those costs no memory)."""
    saved: list[int] = []
    own = {p.data_ptr() for p in layer.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in own:
            saved.append(t.numel() * t.element_size())
        return t

    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(11)  # the same rank-dropout mask in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    (out * upstream).sum().backward()
    grads = {"x": x.grad, **{k: p.grad.clone() for k, p in layer.adapter.items()}}
    if layer.dora_scale is not None:
        grads["dora_scale"] = layer.dora_scale.grad.clone()
    return grads, sum(saved)


REBUILD_CASES = [(layer_id, options) for layer_id in LAYERS for options in ({}, {"rank_dropout": 0.3}, {"padding_mode": "reflect"})
                 if layer_id != "linear" or "padding_mode" not in options]


@pytest.mark.parametrize("layer_id,options", REBUILD_CASES, ids=[f"{lid}-{'-'.join(o) or 'plain'}" for lid, o in REBUILD_CASES])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_training_rebuild_path_matches_autograd_and_keeps_no_weight_sized_tensor(variant: Variant, layer_id: str, options: dict, monkeypatch) -> None:
    """The rebuild path used for training (DoRA's, and any layer with path="rebuild") rebuilds W + ΔW in
    backward: its gradients (input, every factor, DoRA's magnitude) equal plain autograd through the same
    forward, and what it keeps for backward is the input and the factors, not the rebuilt weight."""
    torch.manual_seed(12)
    base = LAYERS[layer_id]()
    if "padding_mode" in options:
        base.padding_mode = options["padding_mode"]
    layer = variant.create(base, rank_dropout=options.get("rank_dropout", 0.0))
    randomize(layer)
    layer.train()
    layer.path = "rebuild"
    x = make_input(layer_id)
    upstream = torch.randn_like(layer(x))
    ours, ours_saved = _train_step(layer, x, upstream)
    monkeypatch.setattr("lyco.rebuild_op.supports", lambda spec: False)  # plain autograd on op(x, W + ΔW)
    plain, plain_saved = _train_step(layer, x, upstream)
    for key, grad in plain.items():
        torch.testing.assert_close(ours[key], grad, rtol=1e-5, atol=1e-6, msg=key)
        assert grad.abs().max() > 0, key
    # the input once (F.pad of a padding mode keeps its input too, and passes on a padded copy), plus
    # small tensors such as the rank-dropout mask
    inputs = 1.0 if "padding_mode" not in options else 1.0 + (81 / 49 if layer_id == "conv3x3s2" else 1.0)
    assert ours_saved <= x.numel() * x.element_size() * inputs + 256
    assert ours_saved < plain_saved - 0.9 * base.weight.numel() * base.weight.element_size()


@pytest.mark.parametrize("variant_id", ["lora", "loha", "lokr"])
def test_training_rebuild_path_under_autocast_matches_autograd(variant_id: str, monkeypatch) -> None:
    """Under bf16 autocast the op runs in bf16 like F.conv2d would, and the gradients (returned in each
    tensor's own dtype) match plain autograd's within bf16 precision."""
    torch.manual_seed(13)
    base = LAYERS["conv3x3s2"]()
    layer = VARIANT_BY_ID[variant_id].create(base)
    randomize(layer)
    layer.path = "rebuild"
    x = make_input("conv3x3s2")
    results = []
    for rebuilt in (True, False):
        if not rebuilt:
            monkeypatch.setattr("lyco.rebuild_op.supports", lambda spec: False)
        layer.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(leaf)
        out.float().square().sum().backward()
        results.append((out, leaf.grad, {k: p.grad for k, p in layer.adapter.items()}))
    (out, grad_x, grads), (plain_out, plain_grad_x, plain_grads) = results
    assert out.dtype == plain_out.dtype == torch.bfloat16 and grad_x.dtype == torch.float32
    assert rel_err(out, plain_out) < 2e-2 and rel_err(grad_x, plain_grad_x) < 3e-2
    for key, grad in plain_grads.items():
        assert grads[key].dtype == torch.float32 and rel_err(grads[key], grad) < 3e-2, key


# ----- 7b. the training bypass path: gradients against the explicit formula ----------------------------
BYPASS_VARIANTS = [v for v in VARIANTS if has_bypass(v)]
BYPASS_LAYERS = ["linear", "conv1x1", "conv3x3s2", "conv3x3s2-reflect"]
# One fused autograd node with the base op, on Linear layers: LoRA, LoHa (as a LoRA of rank r1·r2) and
# the LoKr variants whose w2 is cheap enough to apply as one matrix. Convolutions keep plain autograd.
FUSED_LINEAR = {"lora", "lora_rs", "loha", "lokr", "lokr_full_matrix", "lokr_unbalanced_r2"}
FUSED_NODES = {"_LowRankLinearBackward", "_KroneckerLinearBackward"}


def _fused_node(variant: Variant, layer_id: str) -> str | None:
    if layer_id != "linear":
        return None
    plain_id = variant.id.replace("_tucker", "")  # use_tucker only changes k x k convolutions
    kind = "Kronecker" if variant.algo == "lokr" else "LowRank"
    return f"_{kind}LinearBackward" if plain_id in FUSED_LINEAR else None


def _bypass_layer(layer_id: str, bias: bool) -> nn.Module:
    base = LAYERS[layer_id.removesuffix("-reflect")]()
    if layer_id.endswith("-reflect"):
        base.padding_mode = "reflect"
    if not bias:
        base.bias = None
    return base.requires_grad_(False)


def _reference_forward(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's op with another weight, in float64, padding modes included."""
    if isinstance(base, nn.Conv2d) and base.padding_mode != "zeros":
        ph, pw = base.padding
        padded = F.pad(x.double(), (pw, pw, ph, ph), mode=base.padding_mode)
        bias = None if base.bias is None else base.bias.detach().double()
        return F.conv2d(padded, weight.double(), bias, base.stride, 0, base.dilation)
    return apply_base(base, x, weight)


def _reference_loss(variant: Variant, layer: LycoLayer, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    weight = reference_weight(variant, layer, layer.base.weight, STRENGTH)
    return (_reference_forward(layer.base, x, weight) * upstream.double()).sum()


@pytest.mark.parametrize("x_needs_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layer_id", BYPASS_LAYERS)
@pytest.mark.parametrize("variant", BYPASS_VARIANTS, ids=lambda v: v.id)
def test_training_bypass_gradients_match_the_formula(variant: Variant, layer_id: str, bias: bool, x_needs_grad: bool) -> None:
    """Input and factor gradients of the bypass path (one fused node where _fused_node says so) equal
    those of <op(x, W + m·s·ΔW), upstream> with ΔW from the FORMAT.md reference in float64: the input
    gradient by autograd on that reference, each factor's gradient along a random direction as a
    difference quotient. ΔW is linear in each single tensor, so that quotient is exact for any step; a
    large step keeps float32 rounding of the perturbed parameter out of it."""
    torch.manual_seed(14)
    base = _bypass_layer(layer_id, bias)
    layer = variant.create(base, path="bypass")
    randomize(layer)
    x = make_input(layer_id.removesuffix("-reflect")).requires_grad_(x_needs_grad)
    out = layer(x)
    upstream = torch.randn(out.shape)
    node = _fused_node(variant, layer_id)
    assert type(out.grad_fn).__name__ == node if node else type(out.grad_fn).__name__ not in FUSED_NODES
    (out * upstream).sum().backward()
    if x_needs_grad:
        x64 = x.detach().double().requires_grad_(True)
        _reference_loss(variant, layer, x64, upstream).backward()
        assert rel_err(x.grad, x64.grad) < TOL
    eps = 0.5
    for key, param in layer.adapter.items():
        direction = torch.randn_like(param, dtype=torch.float64)
        original = param.detach().clone()
        losses = []
        with torch.no_grad():
            for sign in (1, -1):
                param.copy_(original + sign * eps * direction.float())
                losses.append(float(_reference_loss(variant, layer, x.detach(), upstream)))
            param.copy_(original)
        expected = (losses[0] - losses[1]) / (2 * eps)
        measured = float((param.grad.double() * direction.float().double()).sum())
        assert abs(measured - expected) <= 1e-4 * max(1.0, abs(expected)), key


@pytest.mark.parametrize(
    "algo,positions,node",
    [
        ("loha", 1024, "_RebuiltWeightOpBackward"),  # rank 16 pairs to 256: past ~d positions, the weight gradient is cheaper
        ("loha", 64, "_LowRankLinearBackward"),
        ("lora", 1024, "_LowRankLinearBackward"),
        ("lora", 1, "_LowRankLinearBackward"),
        ("lokr", 1024, "_KroneckerLinearBackward"),
    ],
)
def test_training_path_follows_the_training_cost(algo: str, positions: int, node: str) -> None:
    """path="auto" in training picks bypass or rebuild by what each costs forward and backward."""
    layer = LycoLayer.create(nn.Linear(320, 320).requires_grad_(False), algo=algo, rank=16, alpha=8)
    out = layer(torch.randn(1, positions, 320, requires_grad=True))
    assert type(out.grad_fn).__name__ == node
    with torch.no_grad():
        assert layer(torch.randn(1, positions, 320)).grad_fn is None


@pytest.mark.parametrize("variant_id,layer_id", [("lora", "linear"), ("loha", "linear"), ("lokr", "linear")])
def test_fused_node_under_autocast_runs_in_bf16_and_keeps_gradient_dtypes(variant_id: str, layer_id: str) -> None:
    torch.manual_seed(15)
    variant = VARIANT_BY_ID[variant_id]
    layer = variant.create(_bypass_layer(layer_id, True), path="bypass")
    randomize(layer)
    x = make_input(layer_id).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert type(out.grad_fn).__name__ == _fused_node(variant, layer_id)
    upstream = torch.randn(out.shape)
    (out.float() * upstream).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    _reference_loss(variant, layer, x64, upstream).backward()
    weight = reference_weight(variant, layer, layer.base.weight, STRENGTH)
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert rel_err(out, _reference_forward(layer.base, x, weight)) < 2e-2
    assert rel_err(x.grad, x64.grad) < 3e-2
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().max() > 0 for p in layer.adapter.values())


@pytest.mark.parametrize("variant_id,layer_id", [("lora", "linear"), ("lokr_full_matrix", "linear")])
def test_fused_node_takes_an_expanded_output_gradient(variant_id: str, layer_id: str) -> None:
    """out.sum().backward() hands backward a stride-0 gradient; the fused node takes it like any other."""
    variant = VARIANT_BY_ID[variant_id]
    layer = variant.create(_bypass_layer(layer_id, True), path="bypass")
    randomize(layer)
    x = make_input(layer_id).requires_grad_(True)
    layer(x).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    _reference_forward(layer.base, x64, reference_weight(variant, layer, layer.base.weight, STRENGTH)).sum().backward()
    assert rel_err(x.grad, x64.grad) < TOL


def test_fused_linear_keeps_the_input_and_a_rank_sized_tensor_for_backward() -> None:
    """What the fused LoRA node keeps beyond the parameters: the input (which the base op keeps anyway)
    and the (positions, rank) hidden activations, nothing output-sized."""
    layer = VARIANT_BY_ID["lora"].create(nn.Linear(64, 96).requires_grad_(False), path="bypass")
    randomize(layer)
    x = make_input("linear").requires_grad_(True)
    saved, own = [], {p.data_ptr() for p in layer.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in own:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert sum(saved) == x.numel() * 4 + 6 * layer.rank * 4


def test_a_hooked_base_layer_is_still_called() -> None:
    """The fused node runs F.linear itself, so a base layer with hooks keeps the separate path and its hooks fire."""
    base = nn.Linear(64, 96).requires_grad_(False)
    calls = []
    base.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    layer = VARIANT_BY_ID["lora"].create(base)
    randomize(layer)
    x = make_input("linear")
    out = layer(x)
    assert calls == [torch.Size([2, 3, 96])]
    assert rel_err(out, apply_base(base, x, reference_weight(VARIANT_BY_ID["lora"], layer, base.weight, STRENGTH))) < TOL


# ----- 8. dropouts -------------------------------------------------------------------------------------
DROPOUT_VARIANTS = ["lora", "loha", "lokr", "lokr_tucker", "lora_dora_out"]


def _dropout_pair(variant: Variant, layer_id: str, path: str, **dropouts):
    """Two adapters with the same tensors around the same base layer, one of them with dropouts."""
    base, plain = build(variant, layer_id)
    randomize(plain)
    dropped = LycoLayer(
        base,
        algo=variant.algo,
        tensors={k: t.detach() for k, t in plain.tensors().items()},
        alpha=float(plain.alpha),
        dora_scale=None if plain.dora_scale is None else plain.dora_scale.detach(),
        strength=plain.strength,
        **dropouts,
    )
    plain.path = dropped.path = path
    return base, plain, dropped


def _paths(variant: Variant) -> list:
    return (["bypass"] if has_bypass(variant) else []) + ["rebuild"]


@pytest.mark.parametrize("layer_id", ["linear", "conv3x3s2"])
@pytest.mark.parametrize("variant_id", DROPOUT_VARIANTS)
def test_dropouts_have_no_effect_in_eval(variant_id: str, layer_id: str) -> None:
    torch.manual_seed(9)
    variant = VARIANT_BY_ID[variant_id]
    for path in _paths(variant):
        base, plain, dropped = _dropout_pair(variant, layer_id, path, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
        plain.eval()
        dropped.eval()
        x = make_input(layer_id)
        expected = plain(x)
        assert rel_err(expected, base(x)) > 1e-3
        for _ in range(5):
            assert torch.equal(dropped(x), expected), path


def test_dropouts_given_to_create_have_no_effect_in_eval() -> None:
    torch.manual_seed(10)
    base = nn.Linear(64, 96)
    layer = LycoLayer.create(base, algo="lora", rank=4, alpha=3, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    randomize(layer)
    layer.eval()
    x = torch.randn(4, 64)
    expected = apply_base(base, x, base.weight.double() + 0.75 * reference_delta("lora", layer.tensors(), (96, 64)))
    for _ in range(5):
        assert rel_err(layer(x), expected) < TOL


@pytest.mark.parametrize("layer_id", ["linear", "conv3x3s2"])
@pytest.mark.parametrize("variant_id", DROPOUT_VARIANTS)
def test_module_dropout_almost_always_returns_base(variant_id: str, layer_id: str) -> None:
    torch.manual_seed(11)
    variant = VARIANT_BY_ID[variant_id]
    for path in _paths(variant):
        base, plain, dropped = _dropout_pair(variant, layer_id, path, module_dropout=0.999)
        dropped.train()
        x = make_input(layer_id)
        base_out = base(x)
        hits = sum(torch.equal(dropped(x), base_out) for _ in range(50))
        assert hits >= 48, (path, hits)
        dropped.eval()
        assert rel_err(dropped(x), plain(x)) < TOL


@pytest.mark.parametrize("kind", ["rank_dropout", "dropout"])
@pytest.mark.parametrize("layer_id", ["linear", "conv3x3s2"])
@pytest.mark.parametrize("variant_id", ["lora", "loha", "lokr", "lora_dora_out"])
def test_train_dropout_changes_output_but_keeps_expectation(variant_id: str, layer_id: str, kind: str) -> None:
    """Train-mode (rank) dropout zeroes parts of the adapter's contribution on most draws; the 1/(1-p)
    rescale keeps its mean over many draws near the full contribution (loose tolerance, seeded).
    DoRA is nonlinear in ΔW, so there only the change is checked."""
    torch.manual_seed(12)
    variant = VARIANT_BY_ID[variant_id]
    draws = 300
    for path in _paths(variant):
        base, plain, dropped = _dropout_pair(variant, layer_id, path, **{kind: 0.5})
        dropped.train()
        x = make_input(layer_id)[:1]
        with torch.no_grad():
            base_out = base(x)
            full = plain(x) - base_out
            total = torch.zeros_like(full)
            differing = 0
            for _ in range(draws):
                delta = dropped(x) - base_out
                differing += int(rel_err(delta, full) > 1e-3)
                total += delta
        assert differing > draws // 2, (path, differing)
        if variant.dora is None:
            assert rel_err(total / draws, full) < 0.35, path


def test_layer_can_be_deep_copied() -> None:
    """Training scripts deep-copy the wrapped UNet (EMA weights, diffusers' EMAModel); the copy must be
    independent and give the same outputs."""
    torch.manual_seed(16)
    base = nn.Linear(64, 96)
    layer = LycoLayer.create(base, algo="lokr", rank=4, alpha=3, strength=STRENGTH)
    randomize(layer)
    clone = copy.deepcopy(layer)
    x = torch.randn(3, 64)
    assert torch.equal(clone(x), layer(x))
    assert clone.base is not base and clone.base.weight is not base.weight
    clone.merge()
    assert not layer.merged and clone.merged


# ----- 9. nested adapters ------------------------------------------------------------------------------
NESTED = [
    ("lora", "lokr", "bypass", "bypass"),
    ("lora", "lokr", "rebuild", "rebuild"),
    ("lokr_decompose_both_r2", "lora_tucker", "bypass", "bypass"),
    ("lokr_decompose_both_r2", "lora_tucker", "rebuild", "rebuild"),
    ("loha", "lora", "rebuild", "bypass"),
    ("lora", "loha_tucker", "bypass", "rebuild"),
    ("lokr_full_matrix", "loha", "rebuild", "rebuild"),
]


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("inner_id,outer_id,inner_path,outer_path", NESTED, ids=["-".join(c) for c in NESTED])
def test_nested_adapters(inner_id: str, outer_id: str, inner_path: str, outer_path: str, layer_id: str) -> None:
    torch.manual_seed(13)
    inner_v, outer_v = VARIANT_BY_ID[inner_id], VARIANT_BY_ID[outer_id]
    base = LAYERS[layer_id]()
    inner = inner_v.create(base, strength=0.7, path=inner_path)
    outer = outer_v.create(inner, strength=1.3, path=outer_path)
    assert outer.innermost is base
    randomize(inner)
    randomize(outer)
    x = make_input(layer_id)
    original = base.weight.detach().clone()
    w = original.double()
    expected_weight = (
        w
        + 0.7 * inner_v.expected_scale * reference_delta(inner_v.algo, inner.tensors(), w.shape)
        + 1.3 * outer_v.expected_scale * reference_delta(outer_v.algo, outer.tensors(), w.shape)
    )
    expected = apply_base(base, x, expected_weight)
    assert rel_err(outer(x), expected) < TOL
    assert rel_err(outer.effective_weight(), expected_weight) < TOL
    # merge both (inner first), then remove in reverse order: bit-exact
    inner.merge()
    outer.merge()
    assert rel_err(base.weight, expected_weight) < TOL
    assert rel_err(outer(x), expected) < TOL
    outer.unmerge()
    inner.unmerge()
    assert torch.equal(base.weight, original)
    # disabling the outer one leaves base + inner
    outer.enabled = False
    inner_only = apply_base(base, x, w + 0.7 * inner_v.expected_scale * reference_delta(inner_v.algo, inner.tensors(), w.shape))
    assert rel_err(outer(x), inner_only) < TOL


# ----- 10. errors --------------------------------------------------------------------------------------
BAD_TENSORS = [
    ("lora_in_mismatch", nn.Linear(64, 96), "lora", {"lora_down.weight": (4, 65), "lora_up.weight": (96, 4)}),
    ("lora_rank_mismatch", nn.Linear(64, 96), "lora", {"lora_down.weight": (4, 64), "lora_up.weight": (96, 5)}),
    # same number of elements as the weight (192·32 = 96·64): only a shape check, not a reshape, catches it
    ("lora_reshapeable", nn.Linear(64, 96), "lora", {"lora_down.weight": (4, 32), "lora_up.weight": (192, 4)}),
    ("lora_conv_kernel_missing", nn.Conv2d(64, 96, 3), "lora", {"lora_down.weight": (4, 64, 1, 1), "lora_up.weight": (96, 4, 1, 1)}),
    ("lora_conv_wrong_out", nn.Conv2d(64, 96, 1), "lora", {"lora_down.weight": (4, 64, 1, 1), "lora_up.weight": (95, 4, 1, 1)}),
    ("loha_in_mismatch", nn.Linear(64, 96), "loha",
     {"hada_w1_a": (96, 4), "hada_w1_b": (4, 63), "hada_w2_a": (96, 4), "hada_w2_b": (4, 63)}),
    ("loha_reshapeable", nn.Linear(64, 96), "loha",
     {"hada_w1_a": (192, 4), "hada_w1_b": (4, 32), "hada_w2_a": (192, 4), "hada_w2_b": (4, 32)}),
    ("lokr_w2_mismatch", nn.Linear(64, 96), "lokr", {"lokr_w1": (8, 8), "lokr_w2_a": (12, 4), "lokr_w2_b": (4, 9)}),
    ("lokr_w1_not_dividing", nn.Linear(64, 96), "lokr", {"lokr_w1": (7, 8), "lokr_w2": (12, 8)}),
    ("lokr_conv_flat_w2_wrong", nn.Conv2d(64, 96, 3), "lokr", {"lokr_w1": (8, 8), "lokr_w2_a": (12, 4), "lokr_w2_b": (4, 8)}),
]


@pytest.mark.parametrize("case", BAD_TENSORS, ids=lambda c: c[0])
def test_tensors_that_do_not_fit_raise_value_error_naming_the_module(case) -> None:
    torch.manual_seed(14)
    _, base, algo, shapes = case
    tensors = {k: torch.randn(s) for k, s in shapes.items()}
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0_proj_in"):
        LycoLayer(base, algo=algo, tensors=tensors, alpha=1.0, name="lora_unet_down_blocks_0_proj_in")


@pytest.mark.parametrize("shape", [(97, 1), (1, 65), (96, 64), (2, 96)])
def test_bad_dora_scale_raises_value_error_naming_the_module(shape) -> None:
    tensors = {"lora_down.weight": torch.randn(4, 64), "lora_up.weight": torch.randn(96, 4)}
    with pytest.raises(ValueError, match="te_mlp_fc1"):
        LycoLayer(nn.Linear(64, 96), algo="lora", tensors=tensors, alpha=1.0, dora_scale=torch.rand(shape), name="te_mlp_fc1")


def test_unknown_algorithm_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        LycoLayer.create(nn.Linear(8, 8), algo="lorax")
    for name in ("lora", "loha", "lokr"):
        assert name in str(info.value)
    with pytest.raises(ValueError) as info:
        LycoLayer(nn.Linear(8, 8), algo="glora", tensors={})
    assert "lokr" in str(info.value) and "glora" in str(info.value)


@pytest.mark.parametrize(
    "algo,options,valid",
    [("lora", {"factor": 4}, ["use_tucker"]), ("loha", {"decompose_both": True}, ["use_tucker"]),
     ("lokr", {"use_tuker": True}, ["factor", "decompose_both", "full_matrix", "use_tucker", "unbalanced_factorization"])],
)
def test_unknown_option_lists_valid_ones(algo: str, options: dict, valid: list) -> None:
    with pytest.raises(ValueError) as info:
        LycoLayer.create(nn.Linear(64, 96), algo=algo, options=options)
    message = str(info.value)
    assert all(name in message for name in valid), message
    assert next(iter(options)) in message


def test_bad_path_and_dora_axis_raise_value_error() -> None:
    with pytest.raises(ValueError, match="rebuild"):
        LycoLayer.create(nn.Linear(64, 96), path="fast")
    with pytest.raises(ValueError, match="output"):
        LycoLayer.create(nn.Linear(64, 96), dora=True, dora_axis="rows")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("variant_id", ["lora", "loha_tucker", "lokr_decompose_both_r2", "lora_dora_in"])
def test_merge_with_non_finite_tensor_raises_naming_the_module(variant_id: str, bad: float) -> None:
    torch.manual_seed(15)
    variant = VARIANT_BY_ID[variant_id]
    base = nn.Conv2d(64, 96, 3, stride=2, padding=1)
    layer = variant.create(base, name="lora_unet_mid_block_resnets_0_conv1")
    randomize(layer)
    original = base.weight.detach().clone()
    with torch.no_grad():
        next(iter(layer.adapter.values()))[0].view(-1)[0] = bad
    with pytest.raises(FloatingPointError, match="lora_unet_mid_block_resnets_0_conv1"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(base.weight, original)


def test_grouped_conv_and_unsupported_modules_are_rejected() -> None:
    with pytest.raises(ValueError, match="groups"):
        LycoLayer.create(nn.Conv2d(64, 96, 3, groups=2))
    with pytest.raises(TypeError):
        LycoLayer.create(nn.LayerNorm(64))


def test_stacked_merges_unmerge_in_any_order_bit_exactly():
    torch.manual_seed(7)
    base = nn.Linear(64, 96).requires_grad_(False)
    original = base.weight.detach().clone()
    inner = LycoLayer.create(base, algo="lora", rank=4, alpha=3, strength=0.7)
    outer = LycoLayer.create(inner, algo="loha", rank=4, alpha=2, dora=True, dora_axis="output", strength=0.6)
    for layer in (inner, outer):
        with torch.no_grad():
            for p in layer.adapter.values():
                p.normal_(0, 0.2)
    x = torch.randn(5, 64)
    with torch.no_grad():
        unfused = outer(x)
        inner.merge()
        torch.testing.assert_close(outer(x), unfused, rtol=1e-5, atol=1e-5)
        outer.merge()
        torch.testing.assert_close(outer(x), unfused, rtol=1e-5, atol=1e-5)
        inner.unmerge()  # not LIFO
        torch.testing.assert_close(outer(x), unfused, rtol=1e-5, atol=1e-5)
        outer.unmerge()
    assert torch.equal(base.weight, original)
    assert not inner.merged and not outer.merged
