"""SD2 (v-prediction) and SDXL tiny models train a few steps and save files with the right key scheme;
the family conditioning matches what the diffusers pipelines compute at generation time."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lyco import load_network
from pipelines.models import load_pipeline
from trainers.family import family_for
from trainers.loop import train

from train_utils import tiny_config


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _keys_and_metadata(path):
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys()), handle.metadata()


def test_sd2_v_prediction_trains_and_saves_sd2_keys(tmp_path):
    config = tiny_config(tmp_path, "training.max_train_steps=3", "training.zero_terminal_snr=true", "training.min_snr_gamma=5.0",
                         "network.conv_rank=2", model="builtin:tiny-sd2")
    result = train(config)
    keys, metadata = _keys_and_metadata(result.adapter)
    assert metadata["ss_v2"] == "True" and metadata["modelspec.prediction_type"] == "v"
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_zero_terminal_snr"] == "True"
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.") for k in keys)  # diffusers-style UNet names
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)  # conv_rank targets ResNets
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    pipe = load_pipeline("builtin:tiny-sd2")
    loaded = load_network({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, result.adapter)
    assert len(loaded.network) * 3 == len(keys)


def test_sdxl_trains_both_text_encoders_and_saves_sgm_keys(tmp_path):
    config = tiny_config(tmp_path, "training.max_train_steps=3", "dataset.flip_aug=true", "optimizer.text_encoder_lr=5e-4",
                         model="builtin:tiny-sdxl")
    result = train(config)
    keys, metadata = _keys_and_metadata(result.adapter)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.") for k in keys)  # SGM names
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in keys)
    progress = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines()]
    assert [p["lr"] for p in progress if p["event"] == "step"][0] == {"unet": 1e-3, "text_encoder": 5e-4, "text_encoder_2": 5e-4}
    pipe = load_pipeline("builtin:tiny-sdxl")
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    assert len(load_network(parts, result.adapter).network) * 3 == len(keys)


def test_sdxl_unet_only_with_cached_text_encoder_outputs(tmp_path):
    config = tiny_config(tmp_path, "training.max_train_steps=2", "network.train_text_encoder=false",
                         "dataset.cache_text_encoder_outputs=true", model="builtin:tiny-sdxl")
    keys, _ = _keys_and_metadata(train(config).adapter)
    assert keys and all(k.startswith("lora_unet_") for k in keys)


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_conditioning_matches_the_pipeline(model):
    pipe = load_pipeline(model)
    family = family_for("sdxl" if "xl" in model else "sd1", pipe)
    encoders = {p: getattr(pipe, p) for p in family.te_parts}
    with torch.no_grad():
        cond = family.encode(family.tokenize(["a photo of sks"]), encoders)
        if "xl" in model:
            embeds, _, pooled, _ = pipe.encode_prompt("a photo of sks", do_classifier_free_guidance=False)
            torch.testing.assert_close(cond.pooled, pooled)
            batch = {"original_sizes": [(64, 96)], "crops": [(0, 16)], "target_sizes": [(64, 64)]}
            time_ids = family.unet_kwargs(cond, batch, torch.float32)["added_cond_kwargs"]["time_ids"]
            expected = pipe._get_add_time_ids((64, 96), (0, 16), (64, 64), dtype=torch.float32,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            torch.testing.assert_close(time_ids, expected)
        else:
            embeds, _ = pipe.encode_prompt("a photo of sks", "cpu", 1, False)
    torch.testing.assert_close(cond.hidden, embeds)


def test_clip_skip_uses_the_penultimate_layer_through_the_final_norm():
    # diffusers' own clip_skip path reads `text_encoder.text_model`, which transformers 5 removed, so the
    # reference is computed here as diffusers does it: hidden_states[-(skip + 1)] -> final_layer_norm.
    pipe = load_pipeline("builtin:tiny-sd")
    family = family_for("sd1", pipe, clip_skip=2)
    ids = family.tokenize(["sks"])
    with torch.no_grad():
        cond = family.encode(ids, {"text_encoder": pipe.text_encoder})
        out = pipe.text_encoder(ids[0], output_hidden_states=True)
        expected = pipe.text_encoder.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(cond.hidden, expected)
    assert not torch.allclose(cond.hidden, out.last_hidden_state)
