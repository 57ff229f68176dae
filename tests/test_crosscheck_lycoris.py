"""Forward outputs of lyco against lycoris-lora 4.1.3 modules holding the very same tensors.

For every variant the LyCORIS module (LoConModule / LohaModule / LokrModule) is built on a deep copy of the
same base layer with matching options, our tensors (+ alpha, + dora_scale) are loaded with a strict
load_state_dict, and `apply_to()` routes the copy's forward through LyCORIS. Forward outputs are compared,
in LyCORIS' bypass and non-bypass modes, with lyco's bypass (where it has one) and rebuild paths.

Not compared: LyCORIS merge / get_diff_weight (they apply (α/r)² for LoHa/LoKr, a known LyCORIS bug), and
DoRA at strength != 1 (LyCORIS uses V·(m(d/‖V‖ − 1) + 1), lyco the A1111/ComfyUI W + m(W'(1) − W)).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_algos import LAYERS, STRENGTH, VARIANTS, Variant, has_bypass, make_input, randomize, rel_err  # noqa: E402

lycoris_locon = pytest.importorskip("lycoris.modules.locon")
lycoris_loha = pytest.importorskip("lycoris.modules.loha")
lycoris_lokr = pytest.importorskip("lycoris.modules.lokr")

TOL = 1e-5


def lycoris_module(variant: Variant, base: nn.Module, *, multiplier: float, bypass: bool):
    cls = {
        "lora": lycoris_locon.LoConModule,
        "loha": lycoris_loha.LohaModule,
        "lokr": lycoris_lokr.LokrModule,
    }[variant.algo]
    kwargs = dict(
        multiplier=multiplier,
        lora_dim=variant.rank,
        alpha=variant.alpha,
        use_tucker=bool(variant.options.get("use_tucker", False)),
        weight_decompose=variant.dora is not None,
        wd_on_out=variant.dora == "output",
        bypass_mode=bypass,
        rs_lora=variant.rs_lora,
    )
    if variant.algo == "lokr":
        kwargs.update(
            factor=variant.options.get("factor", -1),
            decompose_both=bool(variant.options.get("decompose_both", False)),
            full_matrix=bool(variant.options.get("full_matrix", False)),
            unbalanced_factorization=bool(variant.options.get("unbalanced_factorization", False)),
        )
    return cls("lyco_crosscheck", base, **kwargs)


# LyCORIS' bypass forward ignores weight_decompose (LoConModule/LokrModule.forward go straight to
# bypass_forward, LohaModule too), so DoRA is compared against its non-bypass mode only.
CASES = [
    (v, mode)
    for v in VARIANTS
    for mode in (["bypass", "rebuild"] if v.dora is None else ["rebuild"])
]


@pytest.mark.parametrize("layer_id", list(LAYERS))
@pytest.mark.parametrize("variant,lycoris_mode", CASES, ids=[f"{v.id}-lycoris_{m}" for v, m in CASES])
def test_forward_matches_lycoris(variant: Variant, lycoris_mode: str, layer_id: str) -> None:
    torch.manual_seed(21)
    strength = 1.0 if variant.dora else STRENGTH
    base = LAYERS[layer_id]()
    theirs_base = copy.deepcopy(base)
    layer = variant.create(base, strength=strength)
    randomize(layer)
    module = lycoris_module(variant, theirs_base, multiplier=strength, bypass=lycoris_mode == "bypass")

    # same file layout: LyCORIS' own state dict has exactly our keys and shapes, and the same stored alpha
    ours = {k: t.detach().clone() for k, t in layer.tensors().items()}
    ours["alpha"] = layer.alpha.detach().clone()
    if layer.dora_scale is not None:
        ours["dora_scale"] = layer.dora_scale.detach().clone()
    theirs = module.state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert float(theirs["alpha"]) == pytest.approx(float(layer.alpha), rel=1e-6)
    assert module.scale == pytest.approx(layer.scale, rel=1e-6)

    module.load_state_dict(ours, strict=True)
    module.apply_to()
    x = make_input(layer_id)
    with torch.no_grad():
        expected = theirs_base(x)
        assert rel_err(expected, base(x)) > 1e-3, "the adapter must change the output"
        for path in (["bypass"] if has_bypass(variant) else []) + ["rebuild"]:
            layer.path = path
            assert rel_err(layer(x), expected) < TOL, path
