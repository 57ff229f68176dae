"""Configs of the real SD1.5 / SD2.x / SDXL UNets and text encoders, written out (no hub access).

Build them on the meta device for fast structural tests: `meta_unet(SD15_UNET)`.
"""
from __future__ import annotations

from typing import Any

import torch

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# SD2.x (768-v): OpenCLIP-H conditioning, linear proj_in/proj_out.
SD2_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# CLIP ViT-L/14 text model: SD1.x text encoder and SDXL text_encoder.
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# OpenCLIP ViT-H text tower in HF layout with the last layer dropped (SD2.x uses 23 of 24 layers).
OPENCLIP_H_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

# OpenCLIP ViT-bigG text tower: SDXL text_encoder_2 (CLIPTextModelWithProjection).
OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def meta_unet(config: dict[str, Any]) -> torch.nn.Module:
    """A diffusers UNet2DConditionModel with this config, allocated on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def meta_text_encoder(config: dict[str, Any], *, with_projection: bool = False) -> torch.nn.Module:
    """A transformers CLIPTextModel (or CLIPTextModelWithProjection) on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        return model_class(CLIPTextConfig(**config))
