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
# Old diffusers attention-processor LoRA: `...attn1.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
DOTTED_PARTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")


def is_dotted(key: str) -> bool:
    return key.startswith(DOTTED_PARTS)


def split_key(key: str) -> tuple[str, str] | None:
    """(module key, normalised suffix), or None when the key has no recognisable suffix."""
    if is_dotted(key):
        for ending, suffix in _DOTTED_SUFFIXES:
            if key.endswith(ending):
                module = key[: -len(ending)]
                return _processor_module(module), suffix
        return None
    module, dot, suffix = key.partition(".")
    if not dot or not suffix:
        return None
    return module, suffix


def _processor_module(module: str) -> str:
    match = _PROCESSOR.search(module)
    if not match:
        return module
    target = "to_out.0" if match.group(1) == "to_out" else match.group(1)
    return module[: match.start()] + "." + target
