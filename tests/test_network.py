"""Injection: module sets equal sd-scripts' own, exact removal, independence of networks, nesting, groups."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lyco import LycoLayer, LycoNetwork, ModuleOverride, NetworkConfig
from sd_configs import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SD15_UNET, SDXL_UNET, meta_text_encoder, meta_unet

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "sdscripts_lora_keys.json").read_text())


@pytest.fixture(scope="module")
def sd15_parts():
    return {"unet": meta_unet(SD15_UNET), "text_encoder": meta_text_encoder(CLIP_L_TEXT)}


@pytest.fixture(scope="module")
def sdxl_parts():
    return {
        "unet": meta_unet(SDXL_UNET),
        "text_encoder": meta_text_encoder(CLIP_L_TEXT),
        "text_encoder_2": meta_text_encoder(OPENCLIP_BIGG_TEXT, with_projection=True),
    }


def _key_shapes(network: LycoNetwork) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in network.adapter_state_dict().items()}


@pytest.mark.parametrize(
    "entry, conv_rank, modules, te_modules",
    [("sd15_default", None, 264, 72), ("sd15_conv", 4, 350, 72), ("sdxl_default", None, 986, 264), ("sdxl_conv", 4, 1052, 264)],
)
def test_keys_and_shapes_equal_sd_scripts(entry, conv_rank, modules, te_modules, sd15_parts, sdxl_parts):
    parts = sd15_parts if entry.startswith("sd15") else sdxl_parts
    with torch.device("meta"):
        network = LycoNetwork.create(parts, NetworkConfig(rank=4, conv_rank=conv_rank))
    try:
        assert len(network) == modules
        assert sum(1 for key in network.layers if key.startswith("lora_te")) == te_modules
        assert _key_shapes(network) == FIXTURE[entry]
    finally:
        network.remove()


@pytest.mark.parametrize(
    "preset, total, unet",
    [("attn-only", 176, 128), ("attn-mlp", 264, 192), ("full-lin", 302, 230), ("full", 354, 282),
     ("unet-transformer-only", 192, 192), ("unet-convblock-only", 88, 88)],
)
def test_preset_module_counts_on_sd15(preset, total, unet, sd15_parts):
    # Counts LyCORIS 3.3 reports on sd-scripts' SD1.5 UNet (FORMAT.md §6); attn-only counts the
    # diffusers `Attention` class, which LyCORIS's preset misses on diffusers UNets.
    with torch.device("meta"):
        network = LycoNetwork.create(sd15_parts, NetworkConfig(rank=4, preset=preset))
    try:
        assert len(network) == total
        assert sum(1 for _ in network.layers_of("unet")) == unet
    finally:
        network.remove()


def _tiny_parts(seed: int = 0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=4,
    )
    te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, bos_token_id=0, eos_token_id=2))
    unet.requires_grad_(False)
    te.requires_grad_(False)
    return {"unet": unet, "text_encoder": te}


def _outputs(parts):
    torch.manual_seed(123)
    x, ctx, ids = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        return parts["unet"](x, 10, ctx).sample, parts["text_encoder"](ids).last_hidden_state


def _randomize(network: LycoNetwork, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, std)


def _module_ids(parts):
    return {name: [(n, id(m)) for n, m in part.named_modules()] for name, part in parts.items()}


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_remove_restores_model_exactly(algo):
    parts = _tiny_parts()
    state = {name: {k: v.clone() for k, v in part.state_dict().items()} for name, part in parts.items()}
    structure = _module_ids(parts)
    before = _outputs(parts)
    network = LycoNetwork.create(parts, NetworkConfig(algo=algo, rank=4, alpha=3, preset="full"))
    _randomize(network)
    network.set_strength(0.8)
    during = _outputs(parts)
    assert not torch.allclose(during[0], before[0])
    network.merge()
    network.remove()
    assert _module_ids(parts) == structure
    for name, part in parts.items():
        after_state = part.state_dict()
        assert after_state.keys() == state[name].keys()
        assert all(torch.equal(after_state[k], state[name][k]) for k in after_state)
    after = _outputs(parts)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_two_networks_with_different_presets_do_not_interfere():
    parts = _tiny_parts()
    base = _outputs(parts)
    attn = LycoNetwork.create(parts, NetworkConfig(rank=4, preset="attn-only"))
    conv = LycoNetwork.create(parts, NetworkConfig(algo="loha", rank=4, preset="unet-convblock-only"))
    assert set(attn.layers).isdisjoint(conv.layers)
    assert all("to_" in key or "proj" in key for key in attn.layers)
    _randomize(attn)
    only_attn = None
    with torch.no_grad():
        conv.set_strength(0.0)
        only_attn = _outputs(parts)
        conv.set_strength(1.0)
    _randomize(conv)
    attn.remove()
    only_conv = _outputs(parts)
    conv.remove()
    assert not torch.allclose(only_attn[0], base[0]) and not torch.allclose(only_conv[0], base[0])
    assert all(torch.equal(a, b) for a, b in zip(_outputs(parts), base))
    # the preset objects are values: creating networks changed nothing
    from lyco import PRESETS

    assert PRESETS["attn-only"].unet_classes == ("Attention",)


def test_nested_adapters_add_and_remove_in_any_order():
    parts = _tiny_parts()
    linear = parts["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    weight = linear.weight.detach().clone()
    first = LycoNetwork.create(parts, NetworkConfig(rank=2, preset="attn-only"))
    second = LycoNetwork.create(parts, NetworkConfig(algo="lokr", rank=2, alpha=1, preset="attn-only", path="bypass"))
    _randomize(first)
    _randomize(second)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    outer = parts["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert outer is second.layers[key] and outer.base is first.layers[key] and outer.innermost is linear
    x = torch.randn(3, 32)
    expected = nn.functional.linear(
        x, weight + first.layers[key].contribution().detach() + second.layers[key].contribution().detach(), linear.bias
    )
    with torch.no_grad():
        torch.testing.assert_close(outer(x), expected, rtol=1e-5, atol=1e-6)
        outer.path = "rebuild"
        torch.testing.assert_close(outer(x), expected, rtol=1e-5, atol=1e-6)
    first.remove()  # the inner one first
    assert parts["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base is linear
    second.remove()
    assert parts["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q is linear


def test_only_adapter_parameters_receive_gradients():
    parts = _tiny_parts()
    network = LycoNetwork.create(parts, NetworkConfig(algo="lokr", rank=4, preset="full", factor=4))
    _randomize(network)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    parts["unet"](x, 10, ctx).sample.square().mean().backward()
    unet_layers = dict(network.layers_of("unet"))
    assert unet_layers and all(p.grad is not None for layer in unet_layers.values() for p in layer.adapter.values())
    assert all(p.grad is None for p in parts["unet"].parameters() if not any(p is q for q in network.parameters()))


def test_state_dict_holds_only_adapter_tensors():
    parts = _tiny_parts()
    network = LycoNetwork.create(parts, NetworkConfig(rank=4))
    n_model = sum(p.numel() for part in parts.values() for p in part.parameters())
    n_net = sum(p.numel() for p in network.parameters())
    assert 0 < n_net < n_model / 4
    assert set(network.state_dict()) == {f"adapters.{k}.{n}" for k, layer in network.layers.items() for n in layer.adapter.keys()}


def test_param_groups_split_parts_and_loraplus_halves():
    parts = _tiny_parts()
    network = LycoNetwork.create(parts, NetworkConfig(rank=4))
    plain = network.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in plain] == [("unet", 1e-4), ("text_encoder", 5e-5)]
    groups = {g["name"]: g for g in network.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5, loraplus_ratio=16)}
    assert groups["unet.up"]["lr"] == pytest.approx(1.6e-3) and groups["text_encoder.up"]["lr"] == pytest.approx(8e-4)
    ups = {id(p) for p in groups["unet.up"]["params"]}
    unet_layers = dict(network.layers_of("unet"))
    assert ups == {id(layer.adapter["lora_up_weight"]) for layer in unet_layers.values()}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(network.parameters()))
    frozen_te = network.param_groups(unet_lr=1e-4, text_encoder_lr=0.0)
    assert [g["name"] for g in frozen_te] == ["unet"]


def test_overrides_include_exclude_and_conv_rank():
    parts = _tiny_parts()
    config = NetworkConfig(
        rank=4, alpha=2, conv_rank=2, conv_alpha=1, preset="full",
        exclude=(r"^text_encoder\.",), include=(r"unet\.conv_norm_out$",),
        overrides=(ModuleOverride({"algo": "lokr", "rank": 8}, pattern=r"attn2\.to_[kv]$"),
                   ModuleOverride({"algo": "loha"}, classes=("Downsample2D",))),
    )
    network = LycoNetwork.create(parts, config)
    layers = network.layers
    assert not any(k.startswith("lora_te") for k in layers)
    kv = [layer for k, layer in layers.items() if k.endswith(("attn2_to_k", "attn2_to_v"))]
    assert kv and all(layer.algo.NAME == "lokr" for layer in kv)
    assert layers["lora_unet_down_blocks_0_downsamplers_0_conv"].algo.NAME == "loha"
    conv1 = layers["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv1.rank == 2 and float(conv1.alpha) == 1.0
    q = layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert q.rank == 4 and q.scale == 0.5
    assert all(not k.endswith("conv_norm_out") for k in layers)  # GroupNorm is not adaptable: include adds nothing


def test_bad_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preset 'attn'.*attn-mlp"):
        NetworkConfig(preset="attn")
    with pytest.raises(ValueError, match="unknown algorithm 'lorax'"):
        NetworkConfig(algo="lorax")
    with pytest.raises(ValueError, match="cannot be overridden per module"):
        NetworkConfig(overrides=(ModuleOverride({"preset": "full"}, pattern="x"),))
    parts = _tiny_parts()
    with pytest.raises(ValueError, match="matches no module"):
        LycoNetwork.create(parts, NetworkConfig(preset="attn-only", exclude=(".",)))


def test_create_does_not_touch_model_weights():
    parts = _tiny_parts()
    before = _outputs(parts)
    network = LycoNetwork.create(parts, NetworkConfig(algo="loha", rank=4, preset="full", dora=True))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(parts), before))
    assert isinstance(next(iter(network.layers.values())), LycoLayer)
