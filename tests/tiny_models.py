"""Tiny SD1-like and SDXL-like models for fast tests (random weights, fixed seeds, CPU, < 1 s to build).

They use the real diffusers / transformers classes, so module names, classes (Transformer2DModel,
ResnetBlock2D, CLIPAttention, ...) and the SD1 / SDXL block layouts match the real models; only
the widths and depths are small.

- `tiny_sd1()`: {"unet", "text_encoder"}: 2 levels (cross-attention down block, plain down block),
  1x1-conv proj_in/proj_out like SD1.x, transformers-5 `CLIPTextModel` (no `.text_model` child).
- `tiny_sdxl()`: {"unet", "text_encoder", "text_encoder_2"}: plain first level then cross-attention
  like SDXL, linear proj_in, 2 transformer blocks in the second level, text_time additional
  conditioning, `CLIPTextModel` + `CLIPTextModelWithProjection` of different widths.

`model_outputs(parts)` runs every part on fixed inputs and returns {name: tensor}.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import Tensor, nn

TE_VOCAB = 1000
SEQ_LEN = 7
SD1_CONTEXT = 32
SDXL_TE1_WIDTH, SDXL_TE2_WIDTH = 32, 48
SDXL_CONTEXT = SDXL_TE1_WIDTH + SDXL_TE2_WIDTH
SDXL_TE2_PROJECTION = 16
SDXL_TIME_EMBED = 8


def _text_config(hidden: int, *, projection_dim: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TE_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        projection_dim=projection_dim, hidden_act="quick_gelu",
    )


def sd1_unet_config() -> dict:
    return dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2, cross_attention_dim=SD1_CONTEXT, norm_num_groups=8, attention_head_dim=4,
    )


def sdxl_unet_config() -> dict:
    return dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, transformer_layers_per_block=(1, 2), cross_attention_dim=SDXL_CONTEXT, norm_num_groups=8,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=SDXL_TE2_PROJECTION + 6 * SDXL_TIME_EMBED,
    )


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def tiny_sd1(seed: int = 0) -> dict[str, nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**sd1_unet_config())
        text_encoder = CLIPTextModel(_text_config(SD1_CONTEXT))
    return {"unet": _frozen(unet), "text_encoder": _frozen(text_encoder)}


def tiny_sdxl(seed: int = 0) -> dict[str, nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**sdxl_unet_config())
        text_encoder = CLIPTextModel(_text_config(SDXL_TE1_WIDTH))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(SDXL_TE2_WIDTH, projection_dim=SDXL_TE2_PROJECTION))
    return {"unet": _frozen(unet), "text_encoder": _frozen(text_encoder), "text_encoder_2": _frozen(text_encoder_2)}


def tiny_parts(family: str, seed: int = 0) -> dict[str, nn.Module]:
    return tiny_sdxl(seed) if family == "sdxl" else tiny_sd1(seed)


def clone_parts(parts: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Deep copies (same weights) for loading the same adapter into a second, independent model."""
    return {name: copy.deepcopy(module) for name, module in parts.items()}


def model_inputs(parts: Mapping[str, nn.Module], seed: int = 123, batch: int = 2) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    unet = parts["unet"]
    config = unet.config
    inputs: dict[str, object] = {
        "sample": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=gen),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 5, config.cross_attention_dim, generator=gen),
        "input_ids": torch.randint(3, TE_VOCAB, (batch, SEQ_LEN), generator=gen),
    }
    if getattr(config, "addition_embed_type", None) == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, SDXL_TE2_PROJECTION, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


@torch.no_grad()
def model_outputs(parts: Mapping[str, nn.Module], seed: int = 123) -> dict[str, Tensor]:
    """Outputs of every part on fixed inputs: 'unet', 'text_encoder', 'text_encoder_2' (+ '_pooled')."""
    inputs = model_inputs(parts, seed)
    out: dict[str, Tensor] = {}
    kwargs = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}
    out["unet"] = parts["unet"](inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], **kwargs).sample
    ids = inputs["input_ids"]
    if "text_encoder" in parts:
        out["text_encoder"] = parts["text_encoder"](ids).last_hidden_state
    if "text_encoder_2" in parts:
        result = parts["text_encoder_2"](ids)
        out["text_encoder_2"] = result.last_hidden_state
        out["text_encoder_2_pooled"] = result.text_embeds
    return out


def assert_outputs_close(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def outputs_differ(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, atol: float = 1e-4) -> dict[str, bool]:
    return {name: not torch.allclose(a[name], b[name], atol=atol) for name in a}


@torch.no_grad()
def randomize(parameters, *, std: float = 0.2, seed: int = 7) -> None:
    """Fill adapter parameters with random values so that every ΔW is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    for p in parameters:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def state_of(parts: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {name: {k: v.detach().clone() for k, v in part.state_dict().items()} for name, part in parts.items()}


def same_state(parts: Mapping[str, nn.Module], state: Mapping[str, Mapping[str, Tensor]]) -> bool:
    for name, part in parts.items():
        now = part.state_dict()
        if now.keys() != state[name].keys() or not all(torch.equal(now[k], state[name][k]) for k in now):
            return False
    return True


def structure_of(parts: Mapping[str, nn.Module]) -> dict[str, list[tuple[str, int]]]:
    return {name: [(n, id(m)) for n, m in part.named_modules()] for name, part in parts.items()}
