"""Per-block adapter weights in the AUTOMATIC1111 "LoRA Block Weight" (lbw) convention.

Source: hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py (read 2026-11):

* block ids ``BLOCKID26`` = BASE, IN00..IN11, M00, OUT00..OUT11 (SD1/SD2, every block);
  ``BLOCKID17`` = BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11 (SD1/SD2, the blocks
  that hold attention); ``BLOCKID12`` = BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05 (SDXL);
  ``BLOCKID20`` = BASE, IN00..IN08, M00, OUT00..OUT08 (SDXL, every block).
* ``to26()``: a 17/12/20-value list is spread over the 26 ids and every id it does not name gets
  **0** (so with 17 values, LoCon modules in IN00/IN03/IN06/IN09-IN11/OUT00-OUT02 are switched off;
  use the 26/20-value form to weight them).
* ``ratiodealer()``: a module's block is found from its LDM/SGM key (``input_blocks_N_`` -> INnn,
  ``middle_block_`` -> M00, ``output_blocks_N_`` -> OUTnn); text-encoder modules are BASE; modules
  in no block (time embedding, conv_norm_out/conv_out, SDXL label embedding) keep weight 1.
* The block weight multiplies the tag's te (BASE) or unet (all other blocks) multiplier.
* ``DEF_WEIGHT_PRESET``: NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5 (17 values).
  lbw ships no SDXL presets; lyco adds ALL, NONE, ALL0.5, INALL, MIDALL (BASE + M00) and OUTALL
  for every form, derived from the block ids.

lyco finds a UNet module's block through lyco.naming's diffusers -> SGM mapping (FORMAT.md §1.4),
so diffusers-named and SGM-named files get the same block for the same module.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

from torch import nn

from lyco import naming
from lyco.blocks import FORMS, TEXT_ENCODER_BLOCK, block_of_unet_path

# lbw DEF_WEIGHT_PRESET (17 values, SD1/SD2).
LBW_PRESETS_17: Mapping[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}

BlockWeightSpec = Union[str, Sequence[float]]


class BlockWeightError(ValueError):
    """Block weights that do not fit the model; the message lists the accepted forms."""


def _derived_preset(name: str, ids: tuple[str, ...]) -> tuple[float, ...] | None:
    if name == "ALL":
        return (1.0,) * len(ids)
    if name == "NONE":
        return (0.0,) * len(ids)
    if name == "ALL0.5":
        return (0.5,) * len(ids)
    prefix = {"INALL": "IN", "MIDALL": "M", "OUTALL": "OUT"}.get(name)
    if prefix is None:
        return None
    return tuple(1.0 if block == "BASE" or block.startswith(prefix) else 0.0 for block in ids)


def preset_names(family: str) -> list[str]:
    """Presets usable with a family (17-value lbw presets only for SD1/SD2)."""
    derived = ["ALL", "NONE", "ALL0.5", "INALL", "MIDALL", "OUTALL"]
    return sorted(set(derived) | (set(LBW_PRESETS_17) if family in ("sd1", "sd2") else set()))


def _check_family(family: str) -> Mapping[int, tuple[str, ...]]:
    if family not in FORMS:
        raise BlockWeightError(f"unknown model family {family!r}; expected one of {sorted(FORMS)}")
    return FORMS[family]


def _describe_forms(family: str) -> str:
    forms = FORMS[family]
    return " or ".join(f"{n} values ({','.join(ids)})" for n, ids in forms.items())


def resolve(spec: BlockWeightSpec, *, family: str, presets: Mapping[str, Sequence[float]] | None = None) -> dict[str, float]:
    """Block id -> weight for every block of the family, from a preset name, a comma list or numbers.

    Ids the given form does not name get 0 (lbw `to26`). Raises BlockWeightError naming the accepted
    forms and presets when the spec does not fit the family."""
    forms = _check_family(family)
    values = _values(spec, family=family, presets=presets)
    ids = forms.get(len(values))
    if ids is None:
        raise BlockWeightError(
            f"{len(values)} block weights do not fit a {family} model; give {_describe_forms(family)}, "
            f"or a preset: {', '.join(preset_names(family))}"
        )
    full = max(forms, key=int)
    weights = {block: 0.0 for block in forms[full]}
    weights.update(zip(ids, values))
    return weights


def _values(spec: BlockWeightSpec, *, family: str, presets: Mapping[str, Sequence[float]] | None) -> tuple[float, ...]:
    if isinstance(spec, str):
        text = spec.strip()
        if "," not in text:
            return _preset(text, family=family, presets=presets)
        items = [item.strip() for item in text.split(",")]
    else:
        items = list(spec)
    values: list[float] = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise BlockWeightError(
                f"block weight {item!r} is not a number (lbw's random R/U/X values are not supported: "
                "they would make images irreproducible)"
            ) from None
        if not math.isfinite(value):
            raise BlockWeightError(f"block weight {item!r} is not finite")
        values.append(value)
    return tuple(values)


def _preset(name: str, *, family: str, presets: Mapping[str, Sequence[float]] | None) -> tuple[float, ...]:
    if presets and name in presets:
        return _values(list(presets[name]), family=family, presets=None)
    if family in ("sd1", "sd2") and name in LBW_PRESETS_17:
        return tuple(float(v) for v in LBW_PRESETS_17[name])
    forms = FORMS[family]
    derived = _derived_preset(name, forms[min(forms, key=int)])
    if derived is not None:
        return derived
    known = sorted(set(preset_names(family)) | set(presets or {}))
    raise BlockWeightError(f"unknown block-weight preset {name!r} for a {family} model; choose one of {', '.join(known)}")


def block_of(part: str, path: str, *, layout: naming.UNetLayout | None) -> str | None:
    """The lbw block of a module given as (model part, module path); text encoders are BASE."""
    if part != "unet":
        return TEXT_ENCODER_BLOCK
    if layout is None:
        return None
    return block_of_unet_path(path, layout)


def unet_layout(unet: nn.Module) -> naming.UNetLayout | None:
    """The SGM layout of a diffusers UNet, or None when it has no SGM form (then no block weights apply)."""
    try:
        return naming.UNetLayout.from_unet(unet)
    except ValueError:
        return None


def multiplier(weights: Mapping[str, float] | None, block: str | None) -> float:
    """The factor a module in `block` gets; 1 without block weights or outside every block (lbw)."""
    if weights is None or block is None:
        return 1.0
    return float(weights.get(block, 0.0))


def format_values(spec: BlockWeightSpec) -> str:
    """A spec as it is written in a prompt tag: the preset name, or comma-separated numbers."""
    if isinstance(spec, str):
        return spec.strip()
    return ",".join(f"{float(v):g}" for v in spec)
