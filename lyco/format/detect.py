"""Which family (sd1/sd2/sdxl) and naming scheme wrote an adapter file, from its keys or shapes alone
(FORMAT.md §1, §8): used when no model is at hand (inspect, convert, resize) and to check a file
against the model it is loaded into."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..naming import FAMILIES, LYCORIS_PREFIX, PARTS

_SDXL = frozenset({"sdxl"})
_SD1_OR_SD2 = frozenset({"sd1", "sd2"})
_SD2 = frozenset({"sd2"})

# Patterns over keys with every "." turned into "_". Each names the families whose real
# architecture (or whose writers, for the lora_te* prefixes: sd-scripts lora.py:871-875) can
# produce such a key.
_FAMILY_MARKERS: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = tuple(
    (re.compile(pattern), families)
    for pattern, families in (
        (r"^lora_te[12]_", _SDXL),
        (r"^text_encoder_2_", _SDXL),
        (r"^lora_te_", _SD1_OR_SD2),
        # SD2's OpenCLIP-H text encoder has 23 layers, CLIP-L 12.
        (r"^(lora_te|text_encoder)_(text_model_)?encoder_layers_(1[2-9]|2[0-2])_", _SD2),
        # SD1/SD2: 4 levels, attention in levels 0-2 down and 1-3 up, one transformer block each.
        (r"_(down|up)_blocks_3_", _SD1_OR_SD2),
        (r"_down_blocks_0_attentions_", _SD1_OR_SD2),
        (r"_up_blocks_2_attentions_", _SD1_OR_SD2),
        (r"_(input|output)_blocks_(9|10|11)_", _SD1_OR_SD2),
        (r"_input_blocks_[12]_1_", _SD1_OR_SD2),
        (r"_output_blocks_[6-8]_1_", _SD1_OR_SD2),
        # SDXL: 3 levels, attention in levels 1-2 down and 0-1 up, 2 or 10 transformer blocks.
        (r"_up_blocks_0_attentions_", _SDXL),
        (r"_output_blocks_[0-2]_1_(proj_|norm|transformer_blocks_)", _SDXL),
        (r"_transformer_blocks_[1-9]", _SDXL),
        (r"_(label_emb|add_embedding)_", _SDXL),
    )
)

_DIFFUSERS_UNET_HEADS = (
    "down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding_", "add_embedding_",
)
_SGM_UNET_HEADS = ("input_blocks_", "middle_block_", "output_blocks_", "out_", "time_embed_", "label_emb_")
_KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_TEXT = "kohya-text-encoder"  # neutral between kohya-diffusers and kohya-sgm


def _narrow(candidates: frozenset[str], keys: Iterable[str]) -> frozenset[str]:
    for key in keys:
        normalized = key.replace(".", "_")
        for pattern, families in _FAMILY_MARKERS:
            if pattern.search(normalized):
                candidates &= families
    return candidates


def _single(candidates: frozenset[str]) -> str | None:
    return next(iter(candidates)) if len(candidates) == 1 else None


def _scheme_of(key: str) -> str | None:
    module = key.split(".", 1)[0]
    if module.startswith(LYCORIS_PREFIX + "_"):
        return "lycoris"
    if module in PARTS:
        return "diffusers-peft"
    if module.startswith(_KOHYA_TEXT_PREFIXES):
        return _KOHYA_TEXT
    for prefix in ("lora_unet_", "oft_unet_"):
        if module.startswith(prefix):
            body = module[len(prefix):]
            if body.startswith(_SGM_UNET_HEADS):
                return "kohya-sgm"
            return "kohya-diffusers" if body.startswith(_DIFFUSERS_UNET_HEADS) else None
    return None


def _combine_schemes(schemes: set[str], family: str | None) -> str:
    unet_schemes = schemes - {_KOHYA_TEXT}
    if not schemes:
        return "unknown"
    if len(unet_schemes) > 1 or (_KOHYA_TEXT in schemes and unet_schemes & {"lycoris", "diffusers-peft"}):
        return "mixed"
    if unet_schemes:
        return next(iter(unet_schemes))
    # Text-encoder keys alone read the same in both kohya schemes: report what sd-scripts writes.
    return "kohya-sgm" if family == "sdxl" else "kohya-diffusers"


def detect_family_from_keys(keys: Iterable[str]) -> tuple[str | None, str]:
    """(family, naming scheme) from a file's tensor keys.

    The family is None when the keys do not decide it. Keys can tell SDXL from SD1/SD2 and spot
    SD2 by its text-encoder layers 12-22, but an SD1.x file and an SD2.x file that touches only
    the first 12 text-encoder layers or only the UNet have the same keys: use
    `detect_family_from_shapes` to separate them. The scheme is one of `SCHEMES`; "unknown" means
    no key had a recognised prefix.
    """
    keys = list(keys)
    family = _single(_narrow(frozenset(FAMILIES), keys))
    schemes = {scheme for scheme in map(_scheme_of, keys) if scheme is not None}
    return family, _combine_schemes(schemes, family)


# Parameter suffixes whose shapes reveal a Linear layer's input width.
_WIDTH_SUFFIXES = (
    "lora_down.weight", "lora_A.weight", "hada_w1_b", "lokr_w1", "lokr_w1_b", "lokr_w2", "lokr_w2_b", "diff"
)


def _param_shapes_by_module(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        for suffix in _WIDTH_SUFFIXES:
            if key.endswith("." + suffix):
                modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = tuple(shape)
    return modules


def _input_width(params: Mapping[str, tuple[int, ...]]) -> int | None:
    for suffix in ("lora_down.weight", "lora_A.weight", "hada_w1_b", "diff"):
        if suffix in params and len(params[suffix]) == 2:
            return params[suffix][1]
    w1 = params.get("lokr_w1") or params.get("lokr_w1_b")
    w2 = params.get("lokr_w2") or params.get("lokr_w2_b")
    if w1 is not None and w2 is not None and len(w1) == len(w2) == 2:
        return w1[1] * w2[1]
    return None


# (module pattern over the "_"-normalised module key, {input width: families}).
_WIDTH_MARKERS: tuple[tuple[re.Pattern[str], Mapping[int, frozenset[str]]], ...] = (
    (
        re.compile(r"^(lora_te1?|text_encoder)_.*(self_attn_[qkv]_proj|mlp_fc1)$"),
        {768: frozenset({"sd1", "sdxl"}), 1024: _SD2, 1280: _SDXL},
    ),
    (
        re.compile(r"attn2_to_[kv]$"),  # cross-attention input = text embedding width
        {768: frozenset({"sd1"}), 1024: _SD2, 2048: _SDXL},
    ),
)


def detect_family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Family from a file's tensor keys and shapes (key -> shape); None if undecidable or inconsistent.

    Adds width evidence to the key markers: text-encoder hidden size (768 CLIP-L, 1024 OpenCLIP-H,
    1280 bigG) and UNet cross-attention input (768 SD1, 1024 SD2, 2048 SDXL).
    """
    candidates = _narrow(frozenset(FAMILIES), shapes)
    for module, params in _param_shapes_by_module(shapes).items():
        width = _input_width(params)
        normalized = module.replace(".", "_")
        for pattern, families_by_width in _WIDTH_MARKERS:
            if width is not None and pattern.search(normalized):
                candidates &= families_by_width.get(width, frozenset())
    return _single(candidates)
