"""Every key form of FORMAT.md §1 reaches the right module of a real (tiny) diffusers/transformers model.

Each case writes a one-module file in one key form, loads it, and checks which module got the
adapter and that ΔW is up @ down (so down/up, A/B were not swapped) with the right scale.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lyco import LycoLayer, load_network
from lyco.format import parse_adapter
from lyco.format.keys import split_key
from tiny_models import tiny_sd1, tiny_sdxl

RANK = 3


@pytest.fixture(scope="module")
def models():
    return {"sd1": tiny_sd1(), "sdxl": tiny_sdxl()}


def _lora_pair(module: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = module.weight
    if weight.dim() == 4:
        down = torch.randn(RANK, weight.shape[1], *weight.shape[2:], generator=gen)
        up = torch.randn(weight.shape[0], RANK, 1, 1, generator=gen)
    else:
        down = torch.randn(RANK, weight.shape[1], generator=gen)
        up = torch.randn(weight.shape[0], RANK, generator=gen)
    return down, up


def _expected_delta(down: torch.Tensor, up: torch.Tensor, shape) -> torch.Tensor:
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _load_one(parts, tensors, *, expect_part: str, expect_path: str):
    """Load, check the single adapter sits at parts[expect_part].<expect_path>, return (layer, network)."""
    result = load_network(parts, parse_adapter(tensors, source="case"))
    network = result.network
    try:
        assert result.skipped_keys == [] and result.problems == []
        assert len(network) == 1
        (key, layer), = network.layers.items()
        slot = network.slot(key)
        assert (slot.part, slot.path) == (expect_part, expect_path)
        assert parts[expect_part].get_submodule(expect_path) is layer
    except BaseException:
        network.remove()  # the model fixture is shared: leave it clean for the next case
        raise
    return layer, network


# (family, module key, part, module path as named_modules() yields it)
KOHYA_CASES = [
    # SD1/SD2 kohya, diffusers-style UNet names
    ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sd1", "lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in"),
    ("sd1", "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj", "unet", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("sd1", "lora_unet_up_blocks_1_resnets_2_conv1", "unet", "up_blocks.1.resnets.2.conv1"),
    ("sd1", "lora_unet_down_blocks_0_downsamplers_0_conv", "unet", "down_blocks.0.downsamplers.0.conv"),
    ("sd1", "lora_unet_mid_block_resnets_1_time_emb_proj", "unet", "mid_block.resnets.1.time_emb_proj"),
    ("sd1", "lora_unet_time_embedding_linear_1", "unet", "time_embedding.linear_1"),
    # SD1 files in LDM names (A1111 / ComfyUI read them too)
    ("sd1", "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("sd1", "lora_unet_output_blocks_3_0_skip_connection", "unet", "up_blocks.1.resnets.0.conv_shortcut"),
    ("sd1", "lora_unet_output_blocks_2_1_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    # text encoder (transformers 5 CLIPTextModel has no .text_model child; keys keep text_model_)
    ("sd1", "lora_te_text_model_encoder_layers_1_mlp_fc1", "text_encoder", "encoder.layers.1.mlp.fc1"),
    ("sd1", "lora_te1_text_model_encoder_layers_0_self_attn_out_proj", "text_encoder", "encoder.layers.0.self_attn.out_proj"),
    # LyCORIS standalone wrapper: diffusers paths
    ("sd1", "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"),
    ("sd1", "lycoris_up_blocks_0_resnets_2_conv_shortcut", "unet", "up_blocks.0.resnets.2.conv_shortcut"),
    # SDXL kohya, SGM names (what sd-scripts writes)
    ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("sdxl", "lora_unet_input_blocks_5_1_proj_in", "unet", "down_blocks.1.attentions.1.proj_in"),
    ("sdxl", "lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),
    ("sdxl", "lora_unet_input_blocks_4_0_skip_connection", "unet", "down_blocks.1.resnets.0.conv_shortcut"),
    ("sdxl", "lora_unet_input_blocks_3_0_op", "unet", "down_blocks.0.downsamplers.0.conv"),
    ("sdxl", "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_v", "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"),
    ("sdxl", "lora_unet_middle_block_2_emb_layers_1", "unet", "mid_block.resnets.1.time_emb_proj"),
    ("sdxl", "lora_unet_output_blocks_1_1_transformer_blocks_1_ff_net_2", "unet", "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2"),
    ("sdxl", "lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    ("sdxl", "lora_unet_output_blocks_3_0_skip_connection", "unet", "up_blocks.1.resnets.0.conv_shortcut"),
    ("sdxl", "lora_unet_output_blocks_5_0_out_layers_3", "unet", "up_blocks.1.resnets.2.conv2"),
    ("sdxl", "lora_unet_input_blocks_0_0", "unet", "conv_in"),
    ("sdxl", "lora_unet_out_2", "unet", "conv_out"),
    ("sdxl", "lora_unet_time_embed_0", "unet", "time_embedding.linear_1"),
    ("sdxl", "lora_unet_label_emb_0_2", "unet", "add_embedding.linear_2"),
    # SDXL kohya, diffusers-style names (diffusers-based trainers)
    ("sdxl", "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0", "unet", "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("sdxl", "lora_unet_up_blocks_0_upsamplers_0_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    # SDXL text encoders
    ("sdxl", "lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "text_encoder", "encoder.layers.1.self_attn.q_proj"),
    ("sdxl", "lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
    ("sdxl", "lora_te2_text_projection", "text_encoder_2", "text_projection"),
]


@pytest.mark.parametrize("family, key, part, path", KOHYA_CASES, ids=[f"{c[0]}:{c[1]}" for c in KOHYA_CASES])
def test_kohya_and_lycoris_keys(models, family, key, part, path):
    parts = models[family]
    base = parts[part].get_submodule(path)
    down, up = _lora_pair(base)
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.5)}
    layer, network = _load_one(parts, tensors, expect_part=part, expect_path=path)
    try:
        assert layer.innermost is base
        assert layer.scale == pytest.approx(1.5 / RANK)
        torch.testing.assert_close(layer.delta_weight(), _expected_delta(down, up, base.weight.shape))
    finally:
        network.remove()
    assert parts[part].get_submodule(path) is base


# (family, module prefix in the file, suffix form, part, path)
DOTTED_CASES = [
    ("sd1", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", "peft", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"),
    ("sd1", "unet.down_blocks.0.attentions.0.proj_in", "peft", "unet", "down_blocks.0.attentions.0.proj_in"),
    ("sd1", "unet.up_blocks.1.resnets.0.conv1", "peft_default", "unet", "up_blocks.1.resnets.0.conv1"),
    # diffusers writes transformers-5 text-encoder paths without text_model.; older files have it
    ("sd1", "text_encoder.encoder.layers.0.self_attn.k_proj", "peft", "text_encoder", "encoder.layers.0.self_attn.k_proj"),
    ("sd1", "text_encoder.text_model.encoder.layers.1.self_attn.k_proj", "peft", "text_encoder", "encoder.layers.1.self_attn.k_proj"),
    ("sd1", "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "diffusers", "unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("sd1", "unet.down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2", "diffusers", "unet", "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"),
    ("sd1", "text_encoder.text_model.encoder.layers.1.mlp.fc2", "linear_layer", "text_encoder", "encoder.layers.1.mlp.fc2"),
    ("sd1", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "linear_layer", "text_encoder", "encoder.layers.0.self_attn.q_proj"),
    ("sdxl", "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_q", "peft", "unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_q"),
    ("sdxl", "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj", "peft", "text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj"),
    ("sdxl", "text_encoder.encoder.layers.1.mlp.fc1", "peft", "text_encoder", "encoder.layers.1.mlp.fc1"),
]
_SUFFIXES = {
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "peft_default": (".lora_A.default.weight", ".lora_B.default.weight"),
    "diffusers": (".lora.down.weight", ".lora.up.weight"),
    "linear_layer": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
}


@pytest.mark.parametrize("family, module, form, part, path", DOTTED_CASES, ids=[f"{c[0]}:{c[1]}:{c[2]}" for c in DOTTED_CASES])
def test_diffusers_and_peft_keys(models, family, module, form, part, path):
    parts = models[family]
    base = parts[part].get_submodule(path)
    down, up = _lora_pair(base, seed=1)
    a, b = _SUFFIXES[form]
    layer, network = _load_one(parts, {module + a: down, module + b: up}, expect_part=part, expect_path=path)
    try:
        assert layer.scale == 1.0  # no alpha and no lora_adapter_metadata: diffusers uses alpha = r
        torch.testing.assert_close(layer.delta_weight(), _expected_delta(down, up, base.weight.shape))
    finally:
        network.remove()


@pytest.mark.parametrize(
    "processor, target",
    [("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")],
)
def test_old_diffusers_attention_processor_keys(models, processor, target):
    parts = models["sd1"]
    block = "down_blocks.0.attentions.1.transformer_blocks.0.attn2"
    base = parts["unet"].get_submodule(f"{block}.{target}")
    down, up = _lora_pair(base, seed=2)
    prefix = f"unet.{block}.processor.{processor}"
    tensors = {f"{prefix}.down.weight": down, f"{prefix}.up.weight": up}
    layer, network = _load_one(parts, tensors, expect_part="unet", expect_path=f"{block}.{target}")
    try:
        torch.testing.assert_close(layer.delta_weight(), _expected_delta(down, up, base.weight.shape))
    finally:
        network.remove()


@pytest.mark.parametrize("old, target", [("to_q_lora", "q_proj"), ("to_out_lora", "out_proj")])
def test_old_diffusers_text_encoder_attention_keys(models, old, target):
    """diffusers' DIFFUSERS_OLD text-encoder form: `...self_attn.to_q_lora.down.weight` means q_proj."""
    parts = models["sd1"]
    base = parts["text_encoder"].get_submodule(f"encoder.layers.1.self_attn.{target}")
    down, up = _lora_pair(base, seed=9)
    prefix = f"text_encoder.text_model.encoder.layers.1.self_attn.{old}"
    tensors = {f"{prefix}.down.weight": down, f"{prefix}.up.weight": up}
    layer, network = _load_one(parts, tensors, expect_part="text_encoder", expect_path=f"encoder.layers.1.self_attn.{target}")
    network.remove()


@pytest.mark.parametrize(
    "path, ending",
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", ".lora_magnitude_vector"),
        ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", ".lora_magnitude_vector.weight"),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", ".lora_magnitude_vector.default"),
        ("down_blocks.0.attentions.0.proj_in", ".lora_magnitude_vector"),  # square 1x1 conv: PEFT (1, out, 1, 1)
        ("up_blocks.1.resnets.1.conv1", ".lora_magnitude_vector"),  # 3x3 conv, out != in
    ],
)
def test_peft_magnitude_vector_is_output_axis_dora(models, path, ending):
    parts = models["sd1"]
    base = parts["unet"].get_submodule(path)
    weight = base.weight.detach()
    down, up = _lora_pair(base, seed=3)
    out = weight.shape[0]
    gen = torch.Generator().manual_seed(4)
    magnitude = torch.rand(out, generator=gen) + 0.5
    stored = magnitude.reshape(1, out, 1, 1) if weight.dim() == 4 else magnitude  # how PEFT stores it
    module = f"unet.{path}"
    tensors = {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up, module + ending: stored}
    layer, network = _load_one(parts, tensors, expect_part="unet", expect_path=path)
    try:
        assert layer.dora_axis == "output"
        combined = weight + _expected_delta(down, up, weight.shape)
        norms = combined.reshape(out, -1).norm(dim=1).reshape(out, *([1] * (weight.dim() - 1)))
        expected = combined * magnitude.reshape(norms.shape) / norms - weight
        torch.testing.assert_close(layer.contribution().detach(), expected, rtol=1e-5, atol=1e-5)
    finally:
        network.remove()


def test_missing_alpha_means_scale_one(models):
    parts = models["sd1"]
    key, path = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"
    base = parts["unet"].get_submodule(path)
    down, up = _lora_pair(base, seed=5)
    layer, network = _load_one(parts, {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, expect_part="unet", expect_path=path)
    try:
        assert layer.scale == 1.0
        torch.testing.assert_close(layer.contribution().detach(), _expected_delta(down, up, base.weight.shape))
    finally:
        network.remove()


def test_algorithm_is_detected_per_module(models):
    """One file: LoRA, LoCon-Tucker, LoHa, LoHa-Tucker, LoKr (two layouts); each module keeps its own algorithm."""
    parts = models["sd1"]
    gen = torch.Generator().manual_seed(6)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.1  # noqa: E731
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32 -> 32 linear
    conv = "lora_unet_up_blocks_1_resnets_1_conv1"  # 64 -> 32 3x3
    ff = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"  # 128 -> 32 linear
    conv2 = "lora_unet_down_blocks_1_resnets_0_conv2"  # 64 -> 64 3x3
    fc1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # 32 -> 64
    k = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"  # 32 -> 32
    tensors = {
        f"{q}.lora_down.weight": r(2, 32), f"{q}.lora_up.weight": r(32, 2), f"{q}.alpha": torch.tensor(1.0),
        f"{conv}.lora_down.weight": r(2, 64, 1, 1), f"{conv}.lora_mid.weight": r(2, 2, 3, 3), f"{conv}.lora_up.weight": r(32, 2, 1, 1),
        f"{ff}.hada_w1_a": r(32, 2), f"{ff}.hada_w1_b": r(2, 128), f"{ff}.hada_w2_a": r(32, 2), f"{ff}.hada_w2_b": r(2, 128),
        f"{conv2}.hada_w1_a": r(2, 64), f"{conv2}.hada_w1_b": r(2, 64), f"{conv2}.hada_t1": r(2, 2, 3, 3),
        f"{conv2}.hada_w2_a": r(2, 64), f"{conv2}.hada_w2_b": r(2, 64), f"{conv2}.hada_t2": r(2, 2, 3, 3), f"{conv2}.alpha": torch.tensor(1.0),
        f"{fc1}.lokr_w1": r(8, 4), f"{fc1}.lokr_w2_a": r(8, 2), f"{fc1}.lokr_w2_b": r(2, 8), f"{fc1}.alpha": torch.tensor(4.0),
        f"{k}.lokr_w1_a": r(4, 1), f"{k}.lokr_w1_b": r(1, 4), f"{k}.lokr_w2": r(8, 8),
    }
    result = load_network(parts, parse_adapter(tensors, source="mixed"))
    try:
        layers = result.network.layers
        written = {k_: layer for k_, layer in layers.items()}
        algos = {k_: layer.algo.NAME for k_, layer in written.items()}
        assert algos == {q: "lora", conv: "lora", ff: "loha", conv2: "loha", fc1: "lokr", k: "lokr"}
        assert set(written[conv].param_keys) == {"lora_down.weight", "lora_mid.weight", "lora_up.weight"}
        assert written[fc1].scale == pytest.approx(4.0 / 2)  # rank from lokr_w2_b
        assert written[k].scale == pytest.approx(1.0)  # no alpha => 1; rank from lokr_w1_b
        assert all(isinstance(parts[result.network.slot(k_).part].get_submodule(result.network.slot(k_).path), LycoLayer) for k_ in layers)
    finally:
        result.network.remove()


@pytest.mark.parametrize(
    "key, module, suffix",
    [
        ("lora_unet_a_b.lora_down.weight", "lora_unet_a_b", "lora_down.weight"),
        ("lora_te_x.alpha", "lora_te_x", "alpha"),
        ("lycoris_m.hada_w1_a", "lycoris_m", "hada_w1_a"),
        ("lora_unet_m.dora_scale", "lora_unet_m", "dora_scale"),
        ("unet.a.b.to_q.lora_A.weight", "unet.a.b.to_q", "lora_down.weight"),
        ("unet.a.b.to_q.lora_B.default.weight", "unet.a.b.to_q", "lora_up.weight"),
        ("text_encoder.a.q_proj.lora_linear_layer.up.weight", "text_encoder.a.q_proj", "lora_up.weight"),
        ("text_encoder_2.a.fc1.lora.down.weight", "text_encoder_2.a.fc1", "lora_down.weight"),
        ("unet.a.attn1.processor.to_out_lora.up.weight", "unet.a.attn1.to_out.0", "lora_up.weight"),
        ("unet.a.attn1.processor.to_k_lora.down.weight", "unet.a.attn1.to_k", "lora_down.weight"),
        ("text_encoder.t.self_attn.to_v_lora.down.weight", "text_encoder.t.self_attn.v_proj", "lora_down.weight"),
        ("unet.a.to_k.lora_magnitude_vector", "unet.a.to_k", "dora_scale"),
        ("unet.a.to_k.alpha", "unet.a.to_k", "alpha"),
    ],
)
def test_split_key_normalises_suffixes(key, module, suffix):
    assert split_key(key) == (module, suffix)


def test_split_key_rejects_keys_without_suffix():
    assert split_key("lora_unet_no_suffix") is None
    assert split_key("unet.a.b.weight") is None


@pytest.mark.parametrize(
    "family, key, part, path",
    [
        ("sd1", "lora_te_encoder_layers_0_self_attn_q_proj", "text_encoder", "encoder.layers.0.self_attn.q_proj"),
        ("sd1", "lora_te1_encoder_layers_1_mlp_fc1", "text_encoder", "encoder.layers.1.mlp.fc1"),
        ("sdxl", "lora_te1_encoder_layers_0_self_attn_v_proj", "text_encoder", "encoder.layers.0.self_attn.v_proj"),
    ],
)
def test_transformers5_text_encoder_keys_without_text_model(models, family, key, part, path):
    """Kohya-style keys derived from a transformers-5 CLIPTextModel (no `text_model.` child).

    diffusers' own `convert_state_dict_to_kohya` (PEFT -> kohya) and LyCORIS's kohya writer
    (`lycoris.kohya.create_network(...).save_weights`) emit exactly these on transformers 5.23
    (see test_format_diffusers / test_format_lycoris). KNOWN FAILING until lyco/naming.py
    `key_aliases` also registers the raw named_modules() path for text encoders."""
    parts = models[family]
    base = parts[part].get_submodule(path)
    down, up = _lora_pair(base, seed=8)
    layer, network = _load_one(parts, {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, expect_part=part, expect_path=path)
    network.remove()


def test_every_key_form_in_one_file(models):
    """kohya SGM + kohya diffusers-style + PEFT + lycoris_ + old diffusers in one SDXL file."""
    parts = models["sdxl"]
    cases = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_1_attn1_to_k.lora_down.weight": "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_k",
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "lycoris_mid_block_attentions_0_proj_out.lora_down.weight": "mid_block.attentions.0.proj_out",
        "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn1.processor.to_out_lora.down.weight": "up_blocks.0.attentions.1.transformer_blocks.1.attn1.to_out.0",
    }
    tensors = {}
    for down_key, path in cases.items():
        down, up = _lora_pair(parts["unet"].get_submodule(path))
        tensors[down_key] = down
        up_key = (down_key.replace("lora_down", "lora_up").replace("lora_A", "lora_B").replace("to_out_lora.down", "to_out_lora.up"))
        tensors[up_key] = up
    result = load_network(parts, parse_adapter(tensors, source="mixed-forms"))
    try:
        assert sorted(result.network.slot(k).path for k in result.network.layers) == sorted(cases.values())
    finally:
        result.network.remove()
