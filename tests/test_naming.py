"""lyco.naming against sd-scripts' real key lists, diffusers' own SGM converter and meta-device models."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from lyco.naming import (
    FAMILIES,
    KeyTable,
    UNetLayout,
    adaptable_modules,
    build_key_table,
    canonical_text_encoder_path,
    dotted_prefixes,
    file_key,
    key_aliases,
    module_key,
    part_prefix,
    unet_diffusers_to_sgm,
    unet_sgm_to_diffusers,
)
from lyco.format.detect import detect_family_from_keys, detect_family_from_shapes
from lyco.tools.convert import SD_LAYOUT, SDXL_LAYOUT
from sd_configs import (
    CLIP_L_TEXT,
    OPENCLIP_BIGG_TEXT,
    OPENCLIP_H_TEXT,
    SD15_UNET,
    SDXL_UNET,
    meta_text_encoder,
    meta_unet,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "sdscripts_lora_keys.json").read_text())
FIXTURE_FAMILY = {"sd15_default": "sd1", "sd15_conv": "sd1", "sdxl_default": "sdxl", "sdxl_conv": "sdxl"}
FIXTURE_MODULE_COUNT = {"sd15_default": 264, "sd15_conv": 350, "sdxl_default": 986, "sdxl_conv": 1052}


@pytest.fixture(scope="module")
def sd15_parts() -> dict[str, nn.Module]:
    return {"unet": meta_unet(SD15_UNET), "text_encoder": meta_text_encoder(CLIP_L_TEXT)}


@pytest.fixture(scope="module")
def sdxl_parts() -> dict[str, nn.Module]:
    return {
        "unet": meta_unet(SDXL_UNET),
        "text_encoder": meta_text_encoder(CLIP_L_TEXT),
        "text_encoder_2": meta_text_encoder(OPENCLIP_BIGG_TEXT, with_projection=True),
    }


@pytest.fixture(scope="module")
def parts_by_family(sd15_parts, sdxl_parts) -> dict[str, dict[str, nn.Module]]:
    return {"sd1": sd15_parts, "sdxl": sdxl_parts}


@pytest.fixture(scope="module")
def tables(parts_by_family) -> dict[str, KeyTable]:
    return {family: build_key_table(parts, family=family) for family, parts in parts_by_family.items()}


def _fixture_modules(entry: str) -> dict[str, dict[str, tuple[int, ...]]]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in FIXTURE[entry].items():
        module, param = key.split(".", 1)
        modules.setdefault(module, {})[param] = tuple(shape)
    return modules


def _implied_weight_shape(params: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    down, up = params["lora_down.weight"], params["lora_up.weight"]
    return (up[0], *down[1:])


# ----- sd-scripts keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", sorted(FIXTURE_FAMILY))
def test_every_sdscripts_key_resolves_to_a_module_of_the_implied_shape(entry, parts_by_family, tables):
    family = FIXTURE_FAMILY[entry]
    parts, table = parts_by_family[family], tables[family]
    modules = _fixture_modules(entry)
    assert len(modules) == FIXTURE_MODULE_COUNT[entry]
    layout = UNetLayout.from_unet(parts["unet"])
    for key, params in modules.items():
        assert set(params) == {"lora_down.weight", "lora_up.weight", "alpha"}
        found = table.lookup(key)
        assert found is not None, key
        part, path = found
        module = parts[part].get_submodule(path)
        assert isinstance(module, (nn.Linear, nn.Conv2d)), key
        assert tuple(module.weight.shape) == _implied_weight_shape(params), key
        assert table.written[(part, path)] == key
        assert file_key(part, path, family=family, layout=layout) == key


@pytest.mark.parametrize("entry", sorted(FIXTURE_FAMILY))
def test_family_and_scheme_of_sdscripts_files(entry):
    keys = FIXTURE[entry]
    expected = FIXTURE_FAMILY[entry]
    family, scheme = detect_family_from_keys(keys)
    # SD1 and SD2 files have the same kohya keys unless TE layers 12-22 appear: keys alone say None.
    assert family == ("sdxl" if expected == "sdxl" else None)
    assert scheme == ("kohya-sgm" if expected == "sdxl" else "kohya-diffusers")
    assert detect_family_from_shapes({k: tuple(v) for k, v in keys.items()}) == expected


# ----- SGM <-> diffusers ---------------------------------------------------------------------------


def test_layouts_of_the_real_unets(sd15_parts, sdxl_parts):
    """The layouts lyco's file tools assume when no model is at hand are those of the real UNets."""
    assert UNetLayout.from_unet(sd15_parts["unet"]) == SD_LAYOUT == UNetLayout(
        layers_per_block=2,
        down_has_attentions=(True, True, True, False),
        up_has_attentions=(False, True, True, True),
        down_has_downsampler=(True, True, True, False),
        up_has_upsampler=(True, True, True, False),
    )
    assert UNetLayout.from_unet(sdxl_parts["unet"]) == SDXL_LAYOUT == UNetLayout(
        layers_per_block=2,
        down_has_attentions=(False, True, True),
        up_has_attentions=(True, True, False),
        down_has_downsampler=(True, True, False),
        up_has_upsampler=(True, True, False),
    )


SD15_SGM_EXAMPLES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "mid_block.resnets.1.norm2": "middle_block.2.out_layers.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
    "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "down_blocks.1.resnets.0": "input_blocks.4.0",
}

SDXL_SGM_EXAMPLES = {
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


@pytest.mark.parametrize(
    ("family", "diffusers_path", "sgm_path"),
    [("sd1", d, s) for d, s in SD15_SGM_EXAMPLES.items()] + [("sdxl", d, s) for d, s in SDXL_SGM_EXAMPLES.items()],
)
def test_sgm_examples_from_the_spec(family, diffusers_path, sgm_path, parts_by_family):
    layout = UNetLayout.from_unet(parts_by_family[family]["unet"])
    assert unet_diffusers_to_sgm(diffusers_path, layout) == sgm_path
    assert unet_sgm_to_diffusers(sgm_path, layout) == diffusers_path


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_linear_and_conv_round_trips_through_sgm(family, parts_by_family):
    unet = parts_by_family[family]["unet"]
    layout = UNetLayout.from_unet(unet)
    paths = [path for path, _ in adaptable_modules(unet)]
    sgm_paths = [unet_diffusers_to_sgm(path, layout) for path in paths]
    assert len(set(sgm_paths)) == len(paths)
    assert [unet_sgm_to_diffusers(sgm, layout) for sgm in sgm_paths] == paths


@pytest.mark.parametrize(
    ("family", "path"),
    [
        ("sd1", "down_blocks.1"),
        ("sd1", "down_blocks.0.resnets.0.nonlinearity"),
        ("sd1", "down_blocks.3.attentions.0.proj_in"),
        ("sd1", "down_blocks.3.downsamplers.0.conv"),
        ("sd1", "up_blocks.3.upsamplers.0.conv"),
        ("sd1", "down_blocks.0.resnets.2.conv1"),
        ("sdxl", "down_blocks.3.resnets.0.conv1"),
        ("sdxl", "time_proj"),
        ("sdxl", "mid_block.resnets.2.conv1"),
        ("sdxl", "text_model.encoder.layers.0.mlp.fc1"),
    ],
)
def test_diffusers_paths_without_sgm_form_raise(family, path, parts_by_family):
    layout = UNetLayout.from_unet(parts_by_family[family]["unet"])
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        unet_diffusers_to_sgm(path, layout)


@pytest.mark.parametrize(
    ("family", "path"),
    [
        ("sd1", "input_blocks.12.0.in_layers.2"),
        ("sd1", "input_blocks.10.1.proj_in"),
        ("sd1", "input_blocks.4.0.in_layers.1"),
        ("sd1", "output_blocks.2.2.conv"),
        ("sd1", "middle_block.3"),
        ("sdxl", "input_blocks.1.1.proj_in"),
        ("sdxl", "input_blocks.9.0.op"),
        ("sdxl", "output_blocks.8.2.conv"),
        ("sdxl", "output_blocks.2.3.conv"),
        ("sdxl", "label_emb.0.1"),
    ],
)
def test_sgm_paths_without_diffusers_module_raise(family, path, parts_by_family):
    layout = UNetLayout.from_unet(parts_by_family[family]["unet"])
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        unet_sgm_to_diffusers(path, layout)


def _diffusers_module_path_of(sgm_key_state_dict: dict[str, str]) -> dict[str, str]:
    """diffusers' own conversion: kohya SGM lora_down keys -> module paths (values carried through)."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    remapped = _maybe_map_sgm_blocks_to_diffusers(dict(sgm_key_state_dict), SimpleNamespace(layers_per_block=2))
    converted = {}
    for key, carried in remapped.items():
        (peft_key,) = convert_unet_state_dict_to_peft({_convert_unet_lora_key(key): None})
        converted[carried] = peft_key.removesuffix(".lora_A.weight")
    return converted


def test_sdxl_sgm_names_agree_with_diffusers_converter(sdxl_parts):
    unet = sdxl_parts["unet"]
    layout = UNetLayout.from_unet(unet)
    sgm_paths = {path: unet_diffusers_to_sgm(path, layout) for path, _ in adaptable_modules(unet)}
    lora_down_keys = {module_key("lora_unet", sgm) + ".lora_down.weight": sgm for sgm in sgm_paths.values()}
    fixture_unet_keys = {
        key for entry in ("sdxl_default", "sdxl_conv") for key in FIXTURE[entry]
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight")
    }
    assert fixture_unet_keys <= set(lora_down_keys)

    oracle = _diffusers_module_path_of(lora_down_keys)
    assert len(oracle) == len(sgm_paths)
    for sgm, diffusers_path in oracle.items():
        assert isinstance(unet.get_submodule(diffusers_path), (nn.Linear, nn.Conv2d))
        assert unet_sgm_to_diffusers(sgm, layout) == diffusers_path


# ----- text encoders ---------------------------------------------------------------------------------


def test_transformers5_clip_paths_get_text_model_keys():
    plain = meta_text_encoder({**CLIP_L_TEXT, "num_hidden_layers": 1})
    projected = meta_text_encoder({**OPENCLIP_BIGG_TEXT, "num_hidden_layers": 1}, with_projection=True)
    plain_paths = {path for path, _ in adaptable_modules(plain)}
    assert "encoder.layers.0.self_attn.q_proj" in plain_paths  # transformers 5: no text_model child
    assert "text_model.encoder.layers.0.self_attn.q_proj" in {path for path, _ in adaptable_modules(projected)}

    table = build_key_table({"text_encoder": plain, "text_encoder_2": projected}, family="sdxl")
    q_proj = "text_model_encoder_layers_0_self_attn_q_proj"
    assert table.lookup(f"lora_te1_{q_proj}") == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert table.lookup(f"lora_te_{q_proj}") == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert table.lookup(f"lora_te2_{q_proj}") == ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj")
    assert table.lookup("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == (
        "text_encoder",
        "encoder.layers.0.self_attn.q_proj",
    )
    assert table.lookup("text_encoder_2.text_model.encoder.layers.0.mlp.fc2") == (
        "text_encoder_2",
        "text_model.encoder.layers.0.mlp.fc2",
    )
    assert table.lookup("lora_te2_text_projection") == ("text_encoder_2", "text_projection")
    # transformers-5-derived keys without `text_model_` (diffusers' kohya conversion writes them) are read too
    assert table.lookup("lora_te_encoder_layers_0_self_attn_q_proj") == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert table.written[("text_encoder", "encoder.layers.0.self_attn.q_proj")] == f"lora_te1_{q_proj}"

    for with_projection in (False, True):
        model = meta_text_encoder({**CLIP_L_TEXT, "num_hidden_layers": 1}, with_projection=with_projection)
        written = build_key_table({"text_encoder": model}, family="sd1").written
        assert f"lora_te_{q_proj}" in written.values()


def test_canonical_text_encoder_path():
    assert canonical_text_encoder_path("encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert canonical_text_encoder_path("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert canonical_text_encoder_path("final_layer_norm") == "text_model.final_layer_norm"
    assert canonical_text_encoder_path("text_projection") == "text_projection"


# ----- prefixes, aliases, tables ---------------------------------------------------------------------


def test_part_prefixes():
    assert [part_prefix("unet", f) for f in FAMILIES] == ["lora_unet"] * 3
    assert [part_prefix("text_encoder", f) for f in FAMILIES] == ["lora_te", "lora_te", "lora_te1"]
    assert part_prefix("text_encoder_2", "sdxl") == "lora_te2"
    for part, family in [("text_encoder_2", "sd1"), ("vae", "sd1"), ("unet", "sd3")]:
        with pytest.raises(ValueError, match="text_encoder_2|vae|sd3"):
            part_prefix(part, family)
    assert dotted_prefixes("text_encoder_2") == ("text_encoder_2.",)
    proj_in = "down_blocks.0.attentions.0.proj_in"
    assert module_key("lora_unet", proj_in) == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_sdxl_unet_key_needs_a_layout():
    with pytest.raises(ValueError, match="layout"):
        file_key("unet", "conv_in", family="sdxl")


def test_key_aliases(parts_by_family):
    sd1_layout = UNetLayout.from_unet(parts_by_family["sd1"]["unet"])
    sdxl_layout = UNetLayout.from_unet(parts_by_family["sdxl"]["unet"])
    path = "down_blocks.1.attentions.0.proj_in"
    assert key_aliases("unet", path, family="sd1", layout=sd1_layout) == (
        "lora_unet_down_blocks_1_attentions_0_proj_in",
        "lora_unet_input_blocks_4_1_proj_in",
        "lycoris_down_blocks_1_attentions_0_proj_in",
    )
    assert key_aliases("unet", path, family="sd1") == (
        "lora_unet_down_blocks_1_attentions_0_proj_in",
        "lycoris_down_blocks_1_attentions_0_proj_in",
    )
    assert key_aliases("unet", path, family="sdxl", layout=sdxl_layout) == (
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_down_blocks_1_attentions_0_proj_in",
        "lycoris_down_blocks_1_attentions_0_proj_in",
    )
    fc1 = "encoder.layers.3.mlp.fc1"
    assert key_aliases("text_encoder", fc1, family="sd2") == (
        "lora_te_text_model_encoder_layers_3_mlp_fc1",
        "lora_te_encoder_layers_3_mlp_fc1",
        "lora_te1_text_model_encoder_layers_3_mlp_fc1",
        "lora_te1_encoder_layers_3_mlp_fc1",
    )
    assert key_aliases("text_encoder", fc1, family="sdxl") == (
        "lora_te1_text_model_encoder_layers_3_mlp_fc1",
        "lora_te_text_model_encoder_layers_3_mlp_fc1",
        "lora_te_encoder_layers_3_mlp_fc1",
        "lora_te1_encoder_layers_3_mlp_fc1",
    )
    assert key_aliases("text_encoder_2", fc1, family="sdxl") == (
        "lora_te2_text_model_encoder_layers_3_mlp_fc1",
        "lora_te2_encoder_layers_3_mlp_fc1",
    )


def test_tables_resolve_every_reader_form(tables):
    upsampler = ("unet", "up_blocks.0.upsamplers.0.conv")
    assert tables["sdxl"].written[upsampler] == "lora_unet_output_blocks_2_2_conv"
    for key in (
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lycoris_up_blocks_0_upsamplers_0_conv",
        "unet.up_blocks.0.upsamplers.0.conv",
    ):
        assert tables["sdxl"].lookup(key) == upsampler
    assert tables["sd1"].written[upsampler] == "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert tables["sd1"].lookup("lora_unet_output_blocks_2_1_conv") == upsampler  # LDM-named SD1 files
    assert tables["sd1"].lookup("lora_te1_text_model_encoder_layers_11_mlp_fc2") == (
        "text_encoder",
        "encoder.layers.11.mlp.fc2",
    )
    assert tables["sd1"].lookup("lora_te_text_model_encoder_layers_12_mlp_fc2") is None
    assert tables["sd1"].lookup("lora_unet_down_blocks_1_resnets_0_norm1") is None  # norms not registered


class _Wrapper(nn.Module):
    is_lyco_wrapper = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.extra = nn.Linear(2, 2)


class _NotAWrapper(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base


def test_wrapped_layers_stand_for_their_innermost_base():
    text_model = nn.Module()
    text_model.q_proj = _Wrapper(_Wrapper(nn.Linear(4, 4)))
    text_model.k_proj = _NotAWrapper(nn.Linear(4, 4))
    text_model.norm = _Wrapper(nn.LayerNorm(4))
    seen: list[tuple[str, type]] = []

    def record(path: str, module: nn.Module) -> bool:
        seen.append((path, type(module)))
        return isinstance(module, nn.Linear)

    table = build_key_table({"text_encoder": text_model}, family="sd1", module_filter=record)
    assert dict(table.written) == {
        ("text_encoder", "q_proj"): "lora_te_text_model_q_proj",
        ("text_encoder", "k_proj.base"): "lora_te_text_model_k_proj_base",
    }
    assert ("q_proj", nn.Linear) in seen and ("norm", nn.LayerNorm) in seen
    assert not any(path.startswith(("q_proj.", "norm.")) for path, _ in seen)


# ----- detection on synthetic key sets ---------------------------------------------------------------


def test_scheme_detection_of_other_writers():
    sd15_unet = [k for k in FIXTURE["sd15_default"] if k.startswith("lora_unet_")]
    lycoris = [k.replace("lora_unet_", "lycoris_", 1) for k in sd15_unet]
    assert detect_family_from_keys(lycoris) == (None, "lycoris")
    peft = [
        "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    assert detect_family_from_keys(peft) == ("sdxl", "diffusers-peft")
    assert detect_family_from_keys(sd15_unet + lycoris)[1] == "mixed"
    sdxl_unet = [k for k in FIXTURE["sdxl_default"] if k.startswith("lora_unet_")]
    sdxl_diffusers_named = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.alpha"]
    assert detect_family_from_keys(sdxl_unet + sdxl_diffusers_named) == ("sdxl", "mixed")
    assert detect_family_from_keys(["bundle_emb.foo.string_to_param.*"]) == (None, "unknown")
    te_only = [k for k in FIXTURE["sdxl_default"] if k.startswith("lora_te")]
    assert detect_family_from_keys(te_only) == ("sdxl", "kohya-sgm")


def test_sd2_is_told_apart_by_layer_count_or_width():
    sd2_te = meta_text_encoder(OPENCLIP_H_TEXT)
    table = build_key_table({"text_encoder": sd2_te}, family="sd2")
    keys = [f"{key}.lora_down.weight" for key in table.written.values()]
    assert detect_family_from_keys(keys)[0] == "sd2"
    first_layers = {
        f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj.lora_down.weight": (4, 1024) for p in "qkv"
    }
    assert detect_family_from_keys(first_layers)[0] is None
    assert detect_family_from_shapes(first_layers) == "sd2"
    unet_only = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024)}
    assert detect_family_from_shapes(unet_only) == "sd2"
    lokr = {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w1": (32, 32),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w2_b": (4, 24),
    }
    assert detect_family_from_shapes(lokr) == "sd1"
    contradictory = {**first_layers, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)}
    assert detect_family_from_shapes(contradictory) is None
