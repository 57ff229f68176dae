"""ΔW of lyco against peft's LoHa / LoKr `get_delta_weight` for the layouts peft shares with LyCORIS.

peft builds the layer with random tensors (init_weights=False); the same tensors are loaded into a
LycoLayer by their file suffixes (peft's parameter names are the LyCORIS key suffixes).

Covered: LoHa Linear / Conv 1x1 / Conv 3x3 (flattened kernel) / Conv 3x3 Tucker (peft use_effective_conv2d);
LoKr Linear and Conv with factor -1 and 4, decompose_both, Conv 3x3 Tucker, and both factors full.
Not covered, because peft has no such case:
- LoKr unbalanced_factorization and full_matrix (no peft options; peft only makes w2 full when r >= max/2);
- LoKr factors larger than √dim (peft's factorization returns (factor, dim/factor) unsorted, e.g.
  64 with factor 16 -> (16, 4), where LyCORIS and lyco use (4, 16));
- DoRA and rsLoRA (peft's LoHa/LoKr have neither); LoRA/LoCon (peft LoRA uses other key names);
- Conv1d (lyco adapts Linear and Conv2d only).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_algos import make_input, rel_err  # noqa: E402

from lyco.layer import LycoLayer  # noqa: E402

peft = pytest.importorskip("peft")
from peft.tuners.loha import layer as peft_loha  # noqa: E402
from peft.tuners.lokr import layer as peft_lokr  # noqa: E402

TOL = 1e-5
ALPHA = 3.0


BASES = {
    "linear": lambda: nn.Linear(64, 96),
    "conv1x1": lambda: nn.Conv2d(64, 96, 1),
    "conv3x3s2": lambda: nn.Conv2d(64, 96, 3, stride=2, padding=1),
}

# (id, algo, layer, rank, peft config kwargs, lyco create options, both factors full)
CASES = [
    ("loha-linear", "loha", "linear", 4, {}, {}, False),
    ("loha-conv1x1", "loha", "conv1x1", 4, {}, {}, False),
    ("loha-conv1x1-tucker_ignored", "loha", "conv1x1", 4, {"use_effective_conv2d": True}, {"use_tucker": True}, False),
    ("loha-conv3x3", "loha", "conv3x3s2", 4, {}, {}, False),
    ("loha-conv3x3-tucker", "loha", "conv3x3s2", 4, {"use_effective_conv2d": True}, {"use_tucker": True}, False),
    ("lokr-linear", "lokr", "linear", 4, {}, {}, False),
    ("lokr-linear-f4", "lokr", "linear", 4, {"decompose_factor": 4}, {"factor": 4}, False),
    ("lokr-linear-decompose_both_r2", "lokr", "linear", 2, {"decompose_both": True}, {"decompose_both": True}, False),
    ("lokr-linear-both_full", "lokr", "linear", 6, {}, {}, True),
    ("lokr-conv1x1", "lokr", "conv1x1", 4, {}, {}, False),
    ("lokr-conv3x3", "lokr", "conv3x3s2", 4, {}, {}, False),
    ("lokr-conv3x3-f4", "lokr", "conv3x3s2", 4, {"decompose_factor": 4}, {"factor": 4}, False),
    ("lokr-conv3x3-decompose_both_r2", "lokr", "conv3x3s2", 2, {"decompose_both": True}, {"decompose_both": True}, False),
    ("lokr-conv3x3-tucker", "lokr", "conv3x3s2", 4, {"use_effective_conv2d": True}, {"use_tucker": True}, False),
    ("lokr-conv3x3-both_full", "lokr", "conv3x3s2", 6, {}, {}, True),
]


def peft_layer(algo: str, base: nn.Module, rank: int, config_kwargs: dict):
    if algo == "loha":
        config = peft.LoHaConfig(r=rank, alpha=ALPHA, init_weights=False, **config_kwargs)
        cls = peft_loha.Linear if isinstance(base, nn.Linear) else peft_loha.Conv2d
    else:
        config = peft.LoKrConfig(r=rank, alpha=ALPHA, init_weights=False, **config_kwargs)
        cls = peft_lokr.Linear if isinstance(base, nn.Linear) else peft_lokr.Conv2d
    return cls(base, "default", config=config, r=rank, alpha=ALPHA)


def peft_tensors(layer) -> dict:
    """The adapter tensors by name, after setting them to random values of a size that matters."""
    with torch.no_grad():
        for name in layer.adapter_layer_names:
            if "default" in getattr(layer, name):
                param = getattr(layer, name)["default"]
                param.copy_(torch.randn_like(param) * 0.3)
    return {
        name: getattr(layer, name)["default"].detach().clone()
        for name in layer.adapter_layer_names
        if "default" in getattr(layer, name)
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_delta_weight_matches_peft(case) -> None:
    torch.manual_seed(31)
    _, algo, layer_id, rank, config_kwargs, options, both_full = case
    base = BASES[layer_id]()
    theirs = peft_layer(algo, copy.deepcopy(base), rank, config_kwargs)
    tensors = peft_tensors(theirs)

    # peft's layout is the one lyco creates with the matching options
    created = LycoLayer.create(copy.deepcopy(base), algo=algo, rank=rank, alpha=ALPHA, options=options)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {k: tuple(t.shape) for k, t in created.tensors().items()}

    ours = LycoLayer(base, algo=algo, tensors=tensors, alpha=ALPHA, strength=1.0, path="rebuild")
    with torch.no_grad():
        peft_delta = theirs.get_delta_weight("default")
        assert peft_delta.abs().max() > 0
        if both_full:
            # peft scales by alpha/r even with both LoKr factors full; LyCORIS, A1111, ComfyUI and lyco use 1
            assert theirs.scaling["default"] == pytest.approx(ALPHA / rank)
            assert ours.scale == 1.0
            assert rel_err(ours.delta_weight(), peft_delta / theirs.scaling["default"]) < TOL
            return
        assert ours.scale == pytest.approx(theirs.scaling["default"])
        assert rel_err(ours.delta_weight() * ours.scale, peft_delta) < TOL
        x = make_input(layer_id)
        expected = theirs(x)
        assert rel_err(expected, base(x)) > 1e-3
        assert rel_err(ours(x), expected) < TOL
        if algo == "lokr":
            ours.path = "bypass"
            assert rel_err(ours(x), expected) < TOL
