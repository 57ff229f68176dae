"""SD1 / SD2 / SDXL differences in one place: text conditioning, pooled embeddings, added time ids.

The conditioning matches what the diffusers pipelines compute at generation time:
SD1/SD2 use the last hidden state (or, with clip_skip N > 1, hidden_states[-N] through the final
layer norm); SDXL concatenates the penultimate hidden states of both encoders, pools from the second
and conditions on (original size, crop top-left, target size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn


@dataclass
class Conditioning:
    hidden: Tensor  # (B, 77, D)
    pooled: Tensor | None = None  # (B, P), SDXL only

    def select(self, index: Sequence[int] | slice) -> "Conditioning":
        return Conditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def stack(items: Sequence["Conditioning"]) -> "Conditioning":
        pooled = None if items[0].pooled is None else torch.stack([c.pooled for c in items])
        return Conditioning(torch.stack([c.hidden for c in items]), pooled)


class Family:
    """SD1 and SD2: one CLIP text encoder."""

    name = "sd1"
    te_parts: tuple[str, ...] = ("text_encoder",)

    def __init__(self, pipe: Any, *, clip_skip: int = 1) -> None:
        self.tokenizers = [pipe.tokenizer]
        self.clip_skip = clip_skip

    def tokenize(self, captions: Sequence[str]) -> list[Tensor]:
        return [tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in self.tokenizers]

    def encode(self, token_ids: Sequence[Tensor], encoders: Mapping[str, nn.Module]) -> Conditioning:
        encoder = encoders["text_encoder"]
        ids = token_ids[0].to(_device(encoder))
        if self.clip_skip == 1:
            return Conditioning(encoder(ids)[0])
        out = encoder(ids, output_hidden_states=True)
        return Conditioning(_final_layer_norm(encoder)(out.hidden_states[-self.clip_skip]))

    def unet_kwargs(self, cond: Conditioning, batch: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": cond.hidden.to(dtype)}


class SD2Family(Family):
    name = "sd2"


class SDXLFamily(Family):
    name = "sdxl"
    te_parts = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe: Any, *, clip_skip: int = 1) -> None:
        super().__init__(pipe, clip_skip=clip_skip)
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]

    def encode(self, token_ids: Sequence[Tensor], encoders: Mapping[str, nn.Module]) -> Conditioning:
        hidden, pooled = [], None
        for ids, part in zip(token_ids, self.te_parts):
            encoder = encoders[part]
            out = encoder(ids.to(_device(encoder)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def unet_kwargs(self, cond: Conditioning, batch: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        time_ids = torch.tensor([list(o) + list(c) + list(t) for o, c, t in zip(batch["original_sizes"], batch["crops"], batch["target_sizes"])],
                                dtype=dtype, device=cond.hidden.device)
        return {"encoder_hidden_states": cond.hidden.to(dtype),
                "added_cond_kwargs": {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}}


FAMILIES = {"sd1": Family, "sd2": SD2Family, "sdxl": SDXLFamily}


def family_for(name: str, pipe: Any, *, clip_skip: int = 1) -> Family:
    return FAMILIES[name](pipe, clip_skip=clip_skip)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _final_layer_norm(encoder: nn.Module) -> nn.Module:
    inner = getattr(encoder, "module", encoder)  # DDP-wrapped
    return inner.final_layer_norm if hasattr(inner, "final_layer_norm") else inner.text_model.final_layer_norm
