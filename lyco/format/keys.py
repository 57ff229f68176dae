"""Splitting file keys into (module key, parameter suffix), for every key form of FORMAT.md §1.

Kohya / LyCORIS keys are `<module key without dots>.<suffix>`. diffusers / PEFT keys are dotted module
paths with a known ending (`unet.down_blocks.0...to_q.lora_A.weight`); their suffixes are normalised
to the kohya names so one code path handles both.
"""
from __future__ import annotations

import re

# Dotted endings used by diffusers / PEFT, mapped to the kohya suffix they mean.
_DOTTED_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "lora_down.weight"),
    (".lora_B.default.weight", "lora_up.weight"),
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora_magnitude_vector.default", "dora_scale"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".alpha", "alpha"),
)
# Old diffusers attention-processor LoRA: `unet...attn1.processor.to_q_lora.down.weight` (UNet) and
# `text_encoder...self_attn.to_q_lora.down.weight` (text encoder, diffusers' DIFFUSERS_OLD form).
_OLD_ATTENTION = re.compile(r"^(?P<module>.+?)\.(?P<processor>processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<half>down|up)\.weight$")
_OLD_UNET_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TEXT_TARGETS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
DOTTED_PARTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")


def is_dotted(key: str) -> bool:
    return key.startswith(DOTTED_PARTS)


def split_key(key: str) -> tuple[str, str] | None:
    """(module key, normalised suffix), or None when the key has no recognisable suffix."""
    if is_dotted(key):
        old = _OLD_ATTENTION.match(key)
        if old:
            return _old_attention_module(old), f"lora_{old['half']}.weight"
        for ending, suffix in _DOTTED_SUFFIXES:
            if key.endswith(ending):
                return key[: -len(ending)], suffix
        return None
    module, dot, suffix = key.partition(".")
    if not dot or not suffix:
        return None
    return module, suffix


def _old_attention_module(match: re.Match[str]) -> str:
    targets = _OLD_UNET_TARGETS if match["processor"] or match["module"].startswith("unet.") else _OLD_TEXT_TARGETS
    return f"{match['module']}.{targets[match['proj']]}"
