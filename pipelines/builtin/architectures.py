"""Architectures of the builtin tiny models, built from the real diffusers/transformers classes.

All three generate 64x64 images through an 8x-downsampling `AutoencoderKL` (4 levels, like
SD's VAE) into 4x8x8 latents, and keep the block layout of the family they stand for, so
module names (and therefore adapter key names) have the same shape as the real models':

* tiny-sd   (SD1.x): UNet down = 3 x CrossAttnDownBlock2D + DownBlock2D, up mirrored,
  layers_per_block=2, conv proj_in/proj_out (use_linear_projection=False), CLIP text encoder
  with quick_gelu, epsilon prediction.
* tiny-sd2  (SD2.x): the SD1 layout with use_linear_projection=True, per-level head counts,
  an OpenCLIP-like text encoder (hidden_act="gelu", pad token "!"), v-prediction.
* tiny-sdxl (SDXL): 3 levels (DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D),
  layers_per_block=2, transformer depth (1, 2, 2), addition_embed_type="text_time",
  CLIPTextModel + CLIPTextModelWithProjection whose hidden sizes add up to cross_attention_dim.

`python -m pipelines.builtin.architectures --out DIR tiny-sd2 tiny-sdxl` writes the fixed-seed
random-initialised folders (the shipped tiny-sd2 / tiny-sdxl were written this way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.builtin.tokenizer import BOS, EOS, build_vocab, write_tokenizer
from pipelines.synthetic import IMAGE_SIZE, vocabulary_words

BUILTIN_NAMES: tuple[str, ...] = ("tiny-sd", "tiny-sd2", "tiny-sdxl")
LATENT_SIZE = IMAGE_SIZE // 8
DEFAULT_SEED = 1234

Pipeline = Union[StableDiffusionPipeline, StableDiffusionXLPipeline]


def _token_ids(pad_token: str) -> dict[str, int]:
    vocab, _ = build_vocab(vocabulary_words())
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[pad_token],
    }


def vae_config(family: str) -> dict[str, Any]:
    """SD's VAE layout (4 levels, 8x downsampling); narrower for the random-weight models."""
    channels = (8, 16, 32, 64) if family == "tiny-sd" else (8, 16, 16, 16)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        # 2 groups: with one channel per group, GroupNorm erases the colour of flat regions.
        norm_num_groups=2 if family == "tiny-sd" else channels[0],
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        force_upcast=False,
    )


def text_encoder_config(family: str) -> dict[str, Any]:
    """Text encoder shapes: CLIP-L-like for sd1, OpenCLIP-like (gelu, pad "!") for sd2."""
    if family == "tiny-sd":
        return dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
            **_token_ids(EOS),
        )
    if family == "tiny-sd2":
        return dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=64,
            **_token_ids("!"),
        )
    raise ValueError(f"no single text encoder config for {family!r}")


def sdxl_text_encoder_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    first = dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, **_token_ids(EOS),
    )
    second = dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, **_token_ids("!"),
    )
    return first, second


def unet_config(family: str) -> dict[str, Any]:
    if family == "tiny-sd":
        return dict(
            sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 64, 64, 64), layers_per_block=2,
            # As in SD1's config, attention_head_dim is (historically) the number of heads.
            attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8,
            use_linear_projection=False,
        )
    if family == "tiny-sd2":
        return dict(
            sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(8, 16, 16, 16), layers_per_block=2,
            attention_head_dim=(2, 2, 4, 4), cross_attention_dim=64, norm_num_groups=8,
            use_linear_projection=True, upcast_attention=False,
        )
    if family == "tiny-sdxl":
        first, second = sdxl_text_encoder_configs()
        time_dim = 8
        return dict(
            sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 16), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 2, 4),
            cross_attention_dim=first["hidden_size"] + second["hidden_size"], norm_num_groups=8,
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=second["projection_dim"] + 6 * time_dim,
        )
    raise ValueError(f"unknown builtin model {family!r}; known: {', '.join(BUILTIN_NAMES)}")


def scheduler_for(family: str) -> Union[DDIMScheduler, EulerDiscreteScheduler]:
    if family == "tiny-sd":
        # A cosine schedule reaches (near) zero signal at t=T even on tiny 8x8 latents, so the
        # model cannot read the colour out of the starting noise and must follow the prompt.
        return DDIMScheduler(
            beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        )
    if family == "tiny-sd2":
        return DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        )
    if family == "tiny-sdxl":
        return EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
        )
    raise ValueError(f"unknown builtin model {family!r}; known: {', '.join(BUILTIN_NAMES)}")


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(tmp, pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(tmp)


def build_pipeline(family: str, *, seed: int = DEFAULT_SEED) -> Pipeline:
    """A randomly initialised (from `seed`) pipeline of the builtin `family`."""
    unet_kwargs = unet_config(family)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(family))
    unet = UNet2DConditionModel(**unet_kwargs)
    if family == "tiny-sdxl":
        first, second = sdxl_text_encoder_configs()
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**first)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**second)),
            tokenizer=_tokenizer(EOS),
            tokenizer_2=_tokenizer("!"),
            unet=unet,
            scheduler=scheduler_for(family),
            force_zeros_for_empty_prompt=True,
        )
    pad = EOS if family == "tiny-sd" else "!"
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_encoder_config(family))),
        tokenizer=_tokenizer(pad),
        unet=unet,
        scheduler=scheduler_for(family),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: Pipeline, out_dir: Union[str, os.PathLike], *, pad_token: str | None = None) -> Path:
    """Save `pipe` in diffusers folder layout (safetensors), replacing `out_dir` atomically.

    The tokenizer folders are rewritten by `write_tokenizer` so they hold exactly the
    generated vocab.json / merges.txt and configs, whatever the tokenizer class saves.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(pipe, name, None)
            if tokenizer is not None:
                shutil.rmtree(staging / name)
                write_tokenizer(staging / name, pad_token=pad_token or str(tokenizer.pad_token))
        _drop_volatile_fields(staging)
        backup = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
        os.replace(staging, out)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _drop_volatile_fields(folder: Path) -> None:
    """Remove library-version stamps from configs so regenerated folders diff cleanly."""
    for config in folder.rglob("*.json"):
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_diffusers_version" in data:
            data.pop("_diffusers_version")
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write fixed-seed random builtin tiny pipelines.")
    parser.add_argument("families", nargs="+", choices=BUILTIN_NAMES)
    parser.add_argument("--out", required=True, help="parent folder; each model goes to OUT/<name>")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    for family in args.families:
        path = save_pipeline(build_pipeline(family, seed=args.seed), Path(args.out) / family)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
