"""lycoris-lora 4.1.3 interop, both directions, compared on forward outputs (never on LyCORIS's merge,
which applies (alpha/r)^2 for LoHa/LoKr; FORMAT.md §8).

lyco -> LyCORIS: `lycoris.create_lycoris_from_weights` (the standalone wrapper) on the same diffusers /
transformers modules. Its kohya loader fails on every SD1 UNet (`duplicated lora name:
lora_unet_time_embedding_linear_1`) and names text encoders by their transformers-5 paths, so the
file's keys are re-prefixed to `lycoris_` + module path: for SD1 a pure prefix swap, for SDXL after
diffusers' own SGM -> diffusers block mapping.

LyCORIS cannot reload some files lyco writes (Tucker LoKr: `AttributeError: 'LokrModule' object has
no attribute 'lokr_w2_a'`; input-axis DoRA: `RuntimeError: output with shape [32, 1, 1, 1] doesn't
match the broadcast shape [32, 32, 1, 1]`; LoKr with unbalanced_factorization: its loader re-derives
the factorization and gets `The size of tensor a (4) must match the size of tensor b (8)`). Those are
checked against LyCORIS's module classes built with the right options, and against explicit formulas.

LyCORIS -> lyco: networks built by `create_lycoris` (wrapper, `lycoris_` keys) and by
`lycoris.kohya.create_network` (kohya keys) with random weights, saved with their `save_weights`.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lyco import LycoLayer, LycoNetwork, NetworkConfig, load_network, save_network
from tiny_models import clone_parts, model_outputs, outputs_differ, randomize, tiny_parts

lycoris = pytest.importorskip("lycoris")
from lycoris import create_lycoris, create_lycoris_from_weights  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

TOL = dict(rtol=1e-4, atol=2e-5)
logging.getLogger("lycoris").setLevel(logging.ERROR)


def _assert_close(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _sgm_to_diffusers_keys(tensors, unet_config):
    """diffusers' own SGM -> diffusers UNet block renaming (independent of lyco.naming)."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet_config)
    # it renumbers blocks but keeps the SGM block names; diffusers' _convert_unet_lora_key renames them next
    names = (("lora_unet_input_blocks_", "lora_unet_down_blocks_"), ("lora_unet_middle_block_", "lora_unet_mid_block_"),
             ("lora_unet_output_blocks_", "lora_unet_up_blocks_"))
    renamed = {}
    for key, value in mapped.items():
        for old, new in names:
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    return renamed


# ----- lyco -> LyCORIS -----------------------------------------------------------------------------

WRITE_VARIANTS = {
    "lora": ("sd1", NetworkConfig(rank=4, alpha=2)),
    "locon": ("sd1", NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=1, preset="full")),
    "locon-tucker": ("sd1", NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=1, use_tucker=True, preset="full")),
    "loha": ("sd1", NetworkConfig(algo="loha", rank=4, alpha=2, conv_rank=2, conv_alpha=1)),
    "loha-tucker": ("sd1", NetworkConfig(algo="loha", rank=4, alpha=2, conv_rank=2, conv_alpha=1, use_tucker=True)),
    "lokr": ("sd1", NetworkConfig(algo="lokr", rank=4, alpha=2, conv_rank=2, conv_alpha=1)),
    "lokr-factor-decompose-both": ("sd1", NetworkConfig(algo="lokr", rank=1, alpha=2, factor=4, decompose_both=True)),
    "lokr-full-matrix": ("sd1", NetworkConfig(algo="lokr", rank=4, conv_rank=4, full_matrix=True)),
    "lokr-conv-full-w2": ("sd1", NetworkConfig(algo="lokr", rank=2, alpha=1, conv_rank=2, full_matrix=True)),
    "dora-output": ("sd1", NetworkConfig(rank=4, alpha=2, conv_rank=2, dora=True, dora_axis="output")),
    "loha-dora-output": ("sd1", NetworkConfig(algo="loha", rank=4, alpha=2, dora=True, dora_axis="output")),
    "lokr-dora-output": ("sd1", NetworkConfig(algo="lokr", rank=4, alpha=2, dora=True, dora_axis="output")),
    "sdxl-lora": ("sdxl", NetworkConfig(rank=4, alpha=2)),
    "sdxl-loha": ("sdxl", NetworkConfig(algo="loha", rank=4, alpha=2)),
}
_LYCORIS_PREFIXES = {  # file prefix -> module path prefix inside the part that the wrapper is given
    "sd1": {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_"},
}


@pytest.mark.parametrize("variant", sorted(WRITE_VARIANTS))
def test_our_files_load_in_lycoris(variant, tmp_path):
    family, config = WRITE_VARIANTS[variant]
    parts = tiny_parts(family)
    base = clone_parts(parts)
    network = LycoNetwork.create(parts, config)
    randomize(network.parameters(), std=0.2)
    expected = model_outputs(parts)
    path = save_network(network, tmp_path / f"{variant}.safetensors")
    network.remove()
    assert all(outputs_differ(expected, model_outputs(parts)).values())

    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    if family == "sdxl":
        tensors = _sgm_to_diffusers_keys(tensors, base["unet"].config)
    loaded = 0
    for part, prefix in _LYCORIS_PREFIXES[family].items():
        weights = {"lycoris_" + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        modules = {k.split(".")[0] for k in weights}
        assert modules, part
        lyc, _ = create_lycoris_from_weights(1.0, "", base[part], weights_sd=weights)
        assert len(lyc.loras) == len(modules), f"LyCORIS matched {len(lyc.loras)} of {len(modules)} {part} modules"
        lyc.apply_to()
        loaded += len(modules)
    assert loaded == len({k.split(".")[0] for k in tensors})
    _assert_close(model_outputs(base), expected)


def _lycoris_twin(layer: LycoLayer, **options) -> nn.Module:
    """A LyCORIS module of the right class on a copy of the layer's base, holding the layer's tensors."""
    base = _copy_base(layer.innermost)
    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[layer.algo.NAME]
    twin = cls("twin", base, 1.0, lora_dim=layer.rank or 1, alpha=float(layer.alpha), **options)
    state = {k: v.detach() for k, v in layer.tensors().items()}
    state["alpha"] = layer.alpha.detach()
    if layer.dora_scale is not None:
        state["dora_scale"] = layer.dora_scale.detach()
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if not k.startswith("org_")], missing
    return twin


def _copy_base(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


TWIN_CASES = {
    # (config, module path, LyCORIS constructor options)
    "lokr-tucker-conv": (NetworkConfig(algo="lokr", rank=2, alpha=1, conv_rank=2, use_tucker=True, factor=4),
                         "up_blocks.1.resnets.1.conv1", dict(use_tucker=True, factor=4)),
    "lokr-unbalanced": (NetworkConfig(algo="lokr", rank=2, alpha=1, factor=4, unbalanced_factorization=True),
                        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", dict(factor=4, unbalanced_factorization=True)),
    "lora-dora-input-linear": (NetworkConfig(rank=4, alpha=2, dora=True, dora_axis="input"),
                               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", dict(weight_decompose=True, wd_on_out=False)),
    "lora-dora-input-conv": (NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=2, dora=True, dora_axis="input"),
                             "up_blocks.1.resnets.0.conv1", dict(weight_decompose=True, wd_on_out=False)),
    "loha-dora-input": (NetworkConfig(algo="loha", rank=4, alpha=2, dora=True, dora_axis="input"),
                        "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2", dict(weight_decompose=True, wd_on_out=False)),
    "lokr-dora-input": (NetworkConfig(algo="lokr", rank=2, alpha=1, factor=4, dora=True, dora_axis="input"),
                        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", dict(factor=4, weight_decompose=True, wd_on_out=False)),
}


@pytest.mark.parametrize("case", sorted(TWIN_CASES))
def test_forms_lycoris_cannot_reload_match_its_module_classes(case):
    config, path, options = TWIN_CASES[case]
    parts = tiny_parts("sd1")
    network = LycoNetwork.create(parts, config)
    randomize(network.parameters(), std=0.2)
    layer = parts["unet"].get_submodule(path)
    assert isinstance(layer, LycoLayer)
    twin = _lycoris_twin(layer, **options)
    gen = torch.Generator().manual_seed(0)
    spec = layer.spec
    x = torch.randn(2, spec.in_features, 6, 6, generator=gen) if spec.is_conv else torch.randn(2, 5, spec.in_features, generator=gen)
    with torch.no_grad():
        expected = twin(x)
        assert not torch.allclose(expected, layer.innermost(x), atol=1e-3)
        torch.testing.assert_close(layer(x), expected, **TOL)
    network.remove()


def test_tucker_lokr_explicit_formula():
    """ΔW = (α/r) · kron(w1, einsum('ijkl,ip,jq->pqkl', t2, w2_a, w2_b)) with w1 unsqueezed to (l, m, 1, 1)."""
    parts = tiny_parts("sd1")
    network = LycoNetwork.create(parts, NetworkConfig(algo="lokr", rank=2, alpha=3, conv_rank=2, use_tucker=True, factor=4))
    randomize(network.parameters(), std=0.3)
    layer = parts["unet"].get_submodule("up_blocks.1.resnets.1.conv1")  # 64 -> 32, 3x3
    t = {k: v.detach() for k, v in layer.tensors().items()}
    assert set(t) == {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"} and t["lokr_w2_a"].shape == (2, 8)  # (r, out_k)
    w2 = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]).contiguous()  # kron needs contiguous
    expected = (3 / 2) * torch.kron(t["lokr_w1"][:, :, None, None], w2)
    assert expected.shape == layer.innermost.weight.shape
    torch.testing.assert_close(layer.contribution().detach(), expected, rtol=1e-5, atol=1e-6)
    network.remove()


@pytest.mark.parametrize("path", ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "up_blocks.1.resnets.0.conv1"])
def test_input_axis_dora_explicit_formula(path):
    """W' = dora_scale · V / ‖V‖ with V = W + (α/r)·ΔW and the norm per input column (over out, k, k)."""
    parts = tiny_parts("sd1")
    network = LycoNetwork.create(parts, NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=2, dora=True, dora_axis="input"))
    randomize(network.parameters(), std=0.3)
    layer = parts["unet"].get_submodule(path)
    weight = layer.innermost.weight.detach()
    t = {k: v.detach() for k, v in layer.tensors().items()}
    v = weight + (2 / 4 if weight.dim() == 2 else 2 / 2) * (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(weight.shape)
    norm = v.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    scale = layer.dora_scale.detach().reshape(-1)
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    expected = v * (scale / norm).reshape(shape) - weight
    torch.testing.assert_close(layer.contribution().detach(), expected, rtol=1e-5, atol=1e-6)
    network.remove()


# ----- LyCORIS -> lyco -----------------------------------------------------------------------------

READ_VARIANTS = {
    "lora": dict(algo="lora", preset="attn-mlp"),
    "locon": dict(algo="locon", preset="full", conv_dim=2, conv_alpha=1),
    "locon-tucker": dict(algo="locon", preset="full", conv_dim=2, conv_alpha=1, use_tucker=True),
    "rs-lora": dict(algo="lora", preset="attn-mlp", rs_lora=True),
    "loha": dict(algo="loha", preset="full", conv_dim=2, conv_alpha=1),
    "loha-tucker": dict(algo="loha", preset="full", conv_dim=2, conv_alpha=1, use_tucker=True),
    "lokr": dict(algo="lokr", preset="full", conv_dim=2, conv_alpha=1, factor=4),
    "lokr-tucker": dict(algo="lokr", preset="full", conv_dim=2, conv_alpha=1, use_tucker=True),
    "lokr-decompose-both": dict(algo="lokr", preset="full", linear_dim=1, factor=8, decompose_both=True),
    "lokr-full-matrix": dict(algo="lokr", preset="full", linear_dim=100000, full_matrix=True),
    "lokr-unbalanced": dict(algo="lokr", preset="attn-mlp", linear_dim=2, factor=4, unbalanced_factorization=True),
    "dora-output": dict(algo="lora", preset="full", dora_wd=True),
    "dora-input": dict(algo="lora", preset="full", dora_wd=True, wd_on_output=False),
    "loha-dora": dict(algo="loha", preset="attn-mlp", dora_wd=True),
    "lokr-dora": dict(algo="lokr", preset="attn-mlp", dora_wd=True),
}


@pytest.mark.parametrize("variant", sorted(READ_VARIANTS))
def test_lycoris_wrapper_files_load_in_lyco(variant, tmp_path):
    kwargs = {"linear_dim": 4, "linear_alpha": 2, **READ_VARIANTS[variant]}
    parts = tiny_parts("sd1")
    base = clone_parts(parts)
    lyc = create_lycoris(parts["unet"], 1.0, **kwargs)
    lyc.apply_to()
    randomize(lyc.parameters(), std=0.2)
    expected = model_outputs(parts)
    path = tmp_path / f"{variant}.safetensors"
    lyc.save_weights(str(path), torch.float32, None)
    assert all(outputs_differ({"unet": expected["unet"]}, {"unet": model_outputs(base)["unet"]}).values())
    result = load_network(base, path)
    assert result.skipped_keys == [] and len(result.network) == len(lyc.loras)
    _assert_close(model_outputs(base), expected)
    result.network.remove()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lycoris_kohya_files_load_in_lyco(family, tmp_path):
    """`lycoris.kohya.create_network` (the sd-scripts network module) with the attn-mlp preset (its
    default `full` preset fails on diffusers UNets: `duplicated lora name:
    lora_unet_time_embedding_linear_1`). Its text-encoder keys come from transformers-5 paths
    (`lora_te_encoder_layers_*`, `lora_te1_encoder_layers_*`): KNOWN FAILING until lyco/naming.py maps them
    (see test_format_keys.py::test_transformers5_text_encoder_keys_without_text_model)."""
    from lycoris.kohya import create_network

    parts = tiny_parts(family)
    base = clone_parts(parts)
    encoders = [parts["text_encoder"], parts["text_encoder_2"]] if family == "sdxl" else parts["text_encoder"]
    lyc = create_network(1.0, 4, 2, None, encoders, parts["unet"], algo="lokr", preset="attn-mlp", factor=4)
    lyc.apply_to(encoders, parts["unet"], True, True)
    randomize(lyc.parameters(), std=0.2)
    expected = model_outputs(parts)
    path = tmp_path / "kohya.safetensors"
    lyc.save_weights(str(path), torch.float32, {})
    result = load_network(base, path)
    assert result.skipped_keys == []
    _assert_close(model_outputs(base), expected)
    result.network.remove()
