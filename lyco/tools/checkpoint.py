"""Diffusers component state dicts -> one original-layout (LDM / SGM) single-file checkpoint, the form
A1111, ComfyUI and diffusers' `from_single_file` read. Pure tensor renaming, no diffusers import.

Layout (the inverse of diffusers 0.42 `loaders/single_file_utils.py`: convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint):

| component | prefix | names |
|---|---|---|
| UNet | `model.diffusion_model.` | SGM/LDM paths (lyco.naming.unet_diffusers_to_sgm) |
| VAE | `first_stage_model.` | `encoder.down.{i}.block.{j}`, `mid.block_{1,2}`, `mid.attn_1.{q,k,v,proj_out,norm}` (1x1 convs), `decoder.up.{n-1-i}` |
| SD1 CLIP-L | `cond_stage_model.transformer.` | HF CLIP names in the `text_model.` form |
| SD2 OpenCLIP-H | `cond_stage_model.model.` | OpenCLIP names, q/k/v stacked in `attn.in_proj_weight` |
| SDXL CLIP-L / bigG | `conditioner.embedders.0.transformer.` / `conditioner.embedders.1.model.` | as SD1 / as SD2, plus `text_projection` (transposed) |
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from .. import naming
from ..naming import UNetLayout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {
    ("sd1", "text_encoder"): ("cond_stage_model.transformer.", "clip"),
    ("sd2", "text_encoder"): ("cond_stage_model.model.", "openclip"),
    ("sdxl", "text_encoder"): ("conditioner.embedders.0.transformer.", "clip"),
    ("sdxl", "text_encoder_2"): ("conditioner.embedders.1.model.", "openclip"),
}


def single_file_state_dict(
    components: Mapping[str, Mapping[str, Tensor]], *, family: str, layout: UNetLayout, vae_levels: int | None = None
) -> dict[str, Tensor]:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]: state_dict} -> single-file tensors."""
    out: dict[str, Tensor] = {}
    out.update(unet_to_ldm(components["unet"], layout))
    if "vae" in components:
        out.update(vae_to_ldm(components["vae"], levels=vae_levels))
    for part in ("text_encoder", "text_encoder_2"):
        if part not in components:
            continue
        try:
            prefix, kind = CLIP_PREFIXES[(family, part)]
        except KeyError:
            raise ValueError(f"a {family} checkpoint has no {part}") from None
        converted = clip_to_ldm(components[part]) if kind == "clip" else open_clip_to_ldm(components[part])
        out.update({prefix + k: v for k, v in converted.items()})
    return out


def _split_param(key: str) -> tuple[str, str]:
    path, _, param = key.rpartition(".")
    return path, param


def unet_to_ldm(state: Mapping[str, Tensor], layout: UNetLayout) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        path, param = _split_param(key)
        out[f"{UNET_PREFIX}{naming.unet_diffusers_to_sgm(path, layout)}.{param}"] = value
    return out


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}


def vae_to_ldm(state: Mapping[str, Tensor], *, levels: int | None = None) -> dict[str, Tensor]:
    levels = levels or 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        side, _, rest = key.partition(".")
        renamed = _vae_path(side, rest, levels)
        if renamed is None:
            raise ValueError(f"VAE parameter {key!r} has no LDM name")
        if ".mid.attn_1." in renamed and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # the LDM attention uses 1x1 convs
        out[VAE_PREFIX + renamed] = value
    return out


def _vae_path(side: str, rest: str, levels: int) -> str | None:
    if side in ("quant_conv", "post_quant_conv"):
        return f"{side}.{rest}"
    head, _, param = rest.rpartition(".")
    if head in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{side}.{_VAE_TOP.get(head, head)}.{param}"
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", head)
    if match:
        kind, level, member, index, name = match.groups()
        level = int(level) if kind == "down_blocks" else levels - 1 - int(level)
        block = f"{'down' if kind == 'down_blocks' else 'up'}.{level}"
        if member == "resnets":
            return f"{side}.{block}.block.{index}.{_VAE_RESNET.get(name, name)}.{param}"
        return f"{side}.{block}.{'downsample' if member == 'downsamplers' else 'upsample'}.{name}.{param}"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", head)
    if match:
        member, index, name = match.groups()
        if member == "resnets":
            return f"{side}.mid.block_{int(index) + 1}.{_VAE_RESNET.get(name, name)}.{param}"
        return f"{side}.mid.attn_1.{_VAE_ATTENTION.get(name, name)}.{param}"
    return None


def clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel keys in the `text_model.` form (transformers 5 drops it in CLIPTextModel)."""
    return {naming.canonical_text_encoder_path(k): v for k, v in state.items() if not k.endswith("position_ids")}


_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIP text model -> OpenCLIP text tower names (q/k/v stacked into in_proj)."""
    canonical = {naming.canonical_text_encoder_path(k): v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, Tensor] = {}
    stacked: dict[str, dict[str, Tensor]] = {}
    for key, value in canonical.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        match = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match is None:
            raise ValueError(f"text encoder parameter {key!r} has no OpenCLIP name")
        layer, name, param = match.groups()
        qkv = re.match(r"self_attn\.([qkv])_proj$", name)
        if qkv:
            stacked.setdefault(f"transformer.resblocks.{layer}.attn.in_proj_{param}", {})[qkv.group(1)] = value
            continue
        if name not in _OPEN_CLIP_LAYER:
            raise ValueError(f"text encoder parameter {key!r} has no OpenCLIP name")
        out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[name]}.{param}"] = value
    for key, pieces in stacked.items():
        if set(pieces) != {"q", "k", "v"}:
            raise ValueError(f"{key}: q, k and v projections are all needed, got {sorted(pieces)}")
        out[key] = torch.cat([pieces["q"], pieces["k"], pieces["v"]], dim=0)
    return out
