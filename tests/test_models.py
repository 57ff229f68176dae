"""Base-model loading: builtin tiny models offline, family/prediction detection, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.builtin import BUILTIN_DIR
from pipelines.models import (
    ModelLoadError,
    builtin_names,
    describe_pipeline,
    load_pipeline,
    resolve_model_path,
)
from pipelines.synthetic import vocabulary_words

REPO = Path(__file__).resolve().parents[1]

OFFLINE_SCRIPT = r"""
import sys
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
root = sys.argv[1]
for name, cls in [("tiny-sd", StableDiffusionPipeline), ("tiny-sd2", StableDiffusionPipeline),
                  ("tiny-sdxl", StableDiffusionXLPipeline)]:
    pipe = cls.from_pretrained(f"{root}/{name}", local_files_only=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    print(name, type(pipe).__name__, image.size)
"""


def test_builtins_load_with_plain_diffusers_and_network_disabled(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(BUILTIN_DIR)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines == [
        "tiny-sd StableDiffusionPipeline (64, 64)",
        "tiny-sd2 StableDiffusionPipeline (64, 64)",
        "tiny-sdxl StableDiffusionXLPipeline (64, 64)",
    ]


@pytest.fixture(scope="module")
def builtins():
    return {name: load_pipeline(name) for name in builtin_names()}


def test_family_and_prediction_detection(builtins):
    info = {name: describe_pipeline(pipe) for name, pipe in builtins.items()}
    assert (info["builtin:tiny-sd"].family, info["builtin:tiny-sd"].prediction_type) == ("sd1", "epsilon")
    assert (info["builtin:tiny-sd2"].family, info["builtin:tiny-sd2"].prediction_type) == ("sd2", "v_prediction")
    assert (info["builtin:tiny-sdxl"].family, info["builtin:tiny-sdxl"].prediction_type) == ("sdxl", "epsilon")
    for item in info.values():
        assert item.resolution == 64 and item.vae_scale_factor == 8 and item.layers_per_block == 2


def test_tiny_sd_has_sd1_layout(builtins):
    pipe = builtins["builtin:tiny-sd"]
    info = describe_pipeline(pipe)
    assert info.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(pipe.unet.config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert not info.use_linear_projection
    assert pipe.text_encoder.config.hidden_act == "quick_gelu"
    names = {n for n, _ in pipe.unet.named_modules()}
    assert "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k" in names
    assert "down_blocks.3.resnets.1.conv2" in names and "up_blocks.3.attentions.2.proj_out" in names
    # transformers 5: CLIPTextModel modules start at encoder.layers.N
    assert "encoder.layers.0.self_attn.q_proj" in {n for n, _ in pipe.text_encoder.named_modules()}


def test_tiny_sd2_has_sd2_traits(builtins):
    pipe = builtins["builtin:tiny-sd2"]
    assert pipe.unet.config.use_linear_projection
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.tokenizer.pad_token == "!"
    assert pipe.unet.down_blocks[0].attentions[0].proj_in.__class__.__name__ == "Linear"


def test_tiny_sdxl_has_sdxl_layout(builtins):
    pipe = builtins["builtin:tiny-sdxl"]
    config = pipe.unet.config
    assert tuple(config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(config.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert config.addition_embed_type == "text_time" and config.layers_per_block == 2
    assert config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert config.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * config.addition_time_embed_dim
    )
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    names = {n for n, _ in pipe.unet.named_modules()}
    assert "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_q" in names
    assert "text_model.encoder.layers.0.mlp.fc1" in {n for n, _ in pipe.text_encoder_2.named_modules()}


def test_tokenizers_keep_dataset_words_whole(builtins):
    for pipe in builtins.values():
        for tokenizer in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)):
            if tokenizer is None:
                continue
            assert tokenizer.model_max_length == 77
            for word in vocabulary_words():
                assert len(tokenizer(word).input_ids) == 3, word


def test_bundled_weights_are_small():
    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    sizes = {name: size(BUILTIN_DIR / name) for name in ("tiny-sd", "tiny-sd2", "tiny-sdxl")}
    assert sizes["tiny-sd"] <= 25 * 2**20
    assert sum(sizes.values()) < 35 * 2**20


def test_load_options_dtype_and_local_folder(tmp_path):
    pipe = load_pipeline(str(BUILTIN_DIR / "tiny-sd2"), dtype=torch.float64)
    assert pipe.unet.dtype == torch.float64
    assert describe_pipeline(pipe).family == "sd2"


def test_resolve_model_path_forms(tmp_path):
    assert resolve_model_path("builtin:tiny-sdxl") == BUILTIN_DIR / "tiny-sdxl"
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"
    assert resolve_model_path(tmp_path) == tmp_path


def test_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="builtin:tiny-sd, builtin:tiny-sd2"):
        load_pipeline("builtin:tiny-sd3")
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=f"{missing}.*does not exist"):
        load_pipeline(str(missing))
    with pytest.raises(ModelLoadError, match=r"missing\.safetensors does not exist"):
        load_pipeline(str(tmp_path / "missing.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"{empty} has no model_index.json"):
        load_pipeline(str(empty))
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_pipeline(str(text))


def test_single_file_needs_config_dir_offline(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(checkpoint))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=f"{checkpoint}.*config_dir"):
        load_pipeline(str(checkpoint))
    with pytest.raises(ModelLoadError, match="config_dir .* must be a local diffusers folder"):
        load_pipeline(str(checkpoint), config_dir="org/repo")
    with pytest.raises(ModelLoadError, match=f"could not load single-file checkpoint {checkpoint}"):
        load_pipeline(str(checkpoint), config_dir="builtin:tiny-sd")


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        load_pipeline(str(tmp_path))
