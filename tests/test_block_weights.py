"""A1111 LoRA Block Weight convention: block ids per family, presets, lbw's to26 rule, module -> block mapping."""
from __future__ import annotations

import pytest

from lyco import blocks
from lyco.tools.convert import SD_LAYOUT, SDXL_LAYOUT  # checked against the real UNets in test_naming.py
from pipelines import block_weights as bw

@pytest.fixture(scope="module")
def sd15_layout():
    return SD_LAYOUT


@pytest.fixture(scope="module")
def sdxl_layout():
    return SDXL_LAYOUT


def test_block_id_lists_have_lbw_lengths():
    assert [len(ids) for ids in (blocks.BLOCK_IDS_12, blocks.BLOCK_IDS_17, blocks.BLOCK_IDS_20, blocks.BLOCK_IDS_26)] == [12, 17, 20, 26]
    assert blocks.BLOCK_IDS_17[:8] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00")
    assert blocks.BLOCK_IDS_12 == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
    assert set(blocks.BLOCK_IDS_17) <= set(blocks.BLOCK_IDS_26) and set(blocks.BLOCK_IDS_12) <= set(blocks.BLOCK_IDS_20)


def test_short_form_fills_the_missing_blocks_with_zero_like_lbw_to26():
    values = [0.5] + [float(i) for i in range(1, 17)]
    weights = bw.resolve(values, family="sd1")
    assert len(weights) == 26
    assert weights["BASE"] == 0.5 and weights["IN01"] == 1.0 and weights["M00"] == 7.0 and weights["OUT11"] == 16.0
    for missing in ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"):
        assert weights[missing] == 0.0


def test_full_forms_and_comma_strings():
    assert bw.resolve(",".join(["1"] * 26), family="sd2") == {block: 1.0 for block in blocks.BLOCK_IDS_26}
    xl = bw.resolve(" 1, 0,0,0,0, 2,0,0,0,0,0,0 ", family="sdxl")
    assert xl["M00"] == 2.0 and xl["IN00"] == 0.0 and len(xl) == 20
    assert bw.resolve([1] * 20, family="sdxl") == {block: 1.0 for block in blocks.BLOCK_IDS_20}


@pytest.mark.parametrize("name", sorted(bw.LBW_PRESETS_17))
def test_lbw_presets_resolve_for_sd1(name):
    weights = bw.resolve(name, family="sd1")
    assert [weights[b] for b in blocks.BLOCK_IDS_17] == [float(v) for v in bw.LBW_PRESETS_17[name]]


def test_presets_for_sdxl_and_unknown_preset_error():
    assert all(v == 1.0 for b, v in bw.resolve("ALL", family="sdxl").items() if b in blocks.BLOCK_IDS_12)
    out = bw.resolve("OUTALL", family="sdxl")
    assert out["BASE"] == 1.0 and out["IN04"] == 0.0 and out["M00"] == 0.0 and out["OUT05"] == 1.0
    with pytest.raises(bw.BlockWeightError, match="OUTS.*sdxl.*choose one of"):
        bw.resolve("OUTS", family="sdxl")
    assert bw.resolve("MINE", family="sdxl", presets={"MINE": [0.25] * 12})["M00"] == 0.25


@pytest.mark.parametrize(
    ("spec", "family", "message"),
    [
        ([1] * 12, "sd1", "12 block weights do not fit a sd1 model; give 17 values"),
        ([1] * 17, "sdxl", "17 block weights do not fit a sdxl model; give 12 values"),
        ("1,R,1", "sd1", "not a number"),
        ([1, float("nan")] + [1] * 15, "sd1", "not finite"),
        ("ALL", "sd3", "unknown model family"),
    ],
)
def test_errors_name_the_accepted_forms(spec, family, message):
    with pytest.raises(bw.BlockWeightError, match=message):
        bw.resolve(spec, family=family)


@pytest.mark.parametrize(
    ("path", "block"),
    [
        ("conv_in", "IN00"),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),
        ("down_blocks.0.resnets.1.conv1", "IN02"),
        ("down_blocks.0.downsamplers.0.conv", "IN03"),
        ("down_blocks.1.attentions.1.proj_in", "IN05"),
        ("down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2", "IN07"),
        ("down_blocks.3.resnets.1.conv2", "IN11"),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "M00"),
        ("mid_block.resnets.1.time_emb_proj", "M00"),
        ("up_blocks.0.resnets.2.conv1", "OUT02"),
        ("up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("up_blocks.1.attentions.0.proj_out", "OUT03"),
        ("up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0", "OUT11"),
        ("time_embedding.linear_1", None),
        ("conv_out", None),
    ],
)
def test_sd1_unet_modules_map_to_lbw_blocks(sd15_layout, path, block):
    assert bw.block_of("unet", path, layout=sd15_layout) == block


@pytest.mark.parametrize(
    ("path", "block"),
    [
        ("down_blocks.0.resnets.0.conv1", "IN01"),
        ("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", "IN04"),
        ("down_blocks.2.attentions.1.proj_in", "IN08"),
        ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", "M00"),
        ("up_blocks.0.attentions.0.proj_out", "OUT00"),
        ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v", "OUT05"),
        ("up_blocks.2.resnets.2.conv2", "OUT08"),
        ("add_embedding.linear_1", None),
    ],
)
def test_sdxl_unet_modules_map_to_lbw_blocks(sdxl_layout, path, block):
    assert bw.block_of("unet", path, layout=sdxl_layout) == block


def test_text_encoders_are_base_and_unmatched_modules_keep_weight_one(sd15_layout):
    assert bw.block_of("text_encoder", "encoder.layers.0.mlp.fc1", layout=None) == "BASE"
    assert bw.block_of("text_encoder_2", "text_model.encoder.layers.3.self_attn.q_proj", layout=None) == "BASE"
    weights = bw.resolve("NONE", family="sd1")
    assert bw.multiplier(weights, None) == 1.0
    assert bw.multiplier(weights, "IN01") == 0.0
    assert bw.multiplier(None, "IN01") == 1.0
