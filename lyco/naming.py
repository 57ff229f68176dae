"""Module path <-> adapter file key: the only place lyco names modules (FORMAT.md §1, §8).

A file key is `prefix + "_" + dotted_path.replace(".", "_")`. Underscores inside module names
make keys impossible to parse back, so readers never parse: `build_key_table` applies the naming
rules to the model's own `named_modules()` and looks keys up.

Which path goes into a key depends on the family (FORMAT.md §8):
- SD1/SD2 UNet: diffusers paths (`lora_unet_down_blocks_1_attentions_0_proj_in`);
- SDXL UNet: SGM/LDM paths (`lora_unet_input_blocks_4_1_proj_in`), which need a `UNetLayout`;
- text encoders: the `text_model.` form, even for transformers-5 `CLIPTextModel`, which no
  longer has a `text_model` child.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

FAMILIES = ("sd1", "sd2", "sdxl")
PARTS = ("unet", "text_encoder", "text_encoder_2")
SCHEMES = ("kohya-diffusers", "kohya-sgm", "lycoris", "diffusers-peft", "mixed", "unknown")

UNET_PREFIX = "lora_unet"
# LyCORIS standalone wrapper prefix (ComfyUI: "simpletuner lycoris format"). It carries diffusers
# UNet paths; no reader maps a lycoris_ form for text encoders, so lyco accepts none.
LYCORIS_PREFIX = "lycoris"
TEXT_MODEL = "text_model"
# Children a CLIPTextModelWithProjection keeps beside (not inside) its text_model.
_TEXT_ENCODER_TOP_LEVEL = ("text_projection",)

ModuleFilter = Callable[[str, nn.Module], bool]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}; expected one of {PARTS}")


# ----- UNet layout ----------------------------------------------------------------------------------


def _child_count(block: nn.Module | None, name: str) -> int:
    children = getattr(block, name, None)
    return len(children) if children is not None else 0


def _uniform(counts: Iterable[int], what: str) -> int:
    distinct = set(counts)
    if len(distinct) != 1:
        raise ValueError(f"UNet has {what} counts {sorted(distinct)}; an SGM layout needs one value")
    return distinct.pop()


def _attention_flags(blocks: list[nn.Module], resnets_per_block: int, side: str) -> tuple[bool, ...]:
    flags = []
    for index, block in enumerate(blocks):
        attentions = _child_count(block, "attentions")
        if attentions not in (0, resnets_per_block):
            raise ValueError(
                f"{side}_blocks.{index} has {attentions} attentions for {resnets_per_block} resnets; "
                "an SGM layout pairs them one to one"
            )
        flags.append(attentions > 0)
    return tuple(flags)


@dataclass(frozen=True)
class UNetLayout:
    """The block structure that fixes the diffusers <-> SGM/LDM UNet index arithmetic (§1.4)."""

    layers_per_block: int
    down_has_attentions: tuple[bool, ...]
    up_has_attentions: tuple[bool, ...]
    down_has_downsampler: tuple[bool, ...]
    up_has_upsampler: tuple[bool, ...]
    mid_has_attentions: bool = True

    def __post_init__(self) -> None:
        levels = len(self.down_has_attentions)
        lengths = {len(self.up_has_attentions), len(self.down_has_downsampler), len(self.up_has_upsampler)}
        if lengths != {levels} or self.layers_per_block < 1:
            raise ValueError(f"inconsistent UNetLayout: {self}")

    @property
    def levels(self) -> int:
        return len(self.down_has_attentions)

    @classmethod
    def from_unet(cls, unet: nn.Module) -> UNetLayout:
        """Read the layout of a diffusers-style UNet2DConditionModel (duck-typed on its blocks)."""
        down_blocks = list(getattr(unet, "down_blocks", ()))
        up_blocks = list(getattr(unet, "up_blocks", ()))
        if not down_blocks or len(down_blocks) != len(up_blocks):
            raise ValueError("not a diffusers-style UNet: needs down_blocks and as many up_blocks")
        resnets = _uniform((_child_count(b, "resnets") for b in down_blocks), "down-block resnet")
        up_resnets = _uniform((_child_count(b, "resnets") for b in up_blocks), "up-block resnet")
        if up_resnets != resnets + 1:
            raise ValueError(f"up blocks have {up_resnets} resnets, expected layers_per_block + 1 = {resnets + 1}")
        return cls(
            layers_per_block=resnets,
            down_has_attentions=_attention_flags(down_blocks, resnets, "down"),
            up_has_attentions=_attention_flags(up_blocks, up_resnets, "up"),
            down_has_downsampler=tuple(_child_count(b, "downsamplers") > 0 for b in down_blocks),
            up_has_upsampler=tuple(_child_count(b, "upsamplers") > 0 for b in up_blocks),
            mid_has_attentions=_child_count(getattr(unet, "mid_block", None), "attentions") > 0,
        )


# ----- diffusers <-> SGM/LDM UNet paths -------------------------------------------------------------

_TOP_LEVEL_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_TOP_LEVEL_TO_DIFFUSERS = {sgm: diffusers for diffusers, sgm in _TOP_LEVEL_TO_SGM.items()}

_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_TO_DIFFUSERS = {sgm: diffusers for diffusers, sgm in _RESNET_TO_SGM.items()}
_DOWNSAMPLER_TO_SGM = {"conv": "op"}
_DOWNSAMPLER_TO_DIFFUSERS = {"op": "conv"}
_UPSAMPLER_NAMES = {"conv": "conv"}

Segments = list[str]


def _join(*pieces: str | Segments) -> str:
    flat: list[str] = []
    for piece in pieces:
        flat.extend(piece.split(".") if isinstance(piece, str) else piece)
    return ".".join(flat)


def _index(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _rename_head(rest: Segments, table: Mapping[str, str]) -> Segments | None:
    """Rename the first one or two components of `rest` by `table` (keys may be dotted pairs)."""
    if not rest:
        return []
    for width in (2, 1):
        head = ".".join(rest[:width])
        if len(rest) >= width and head in table:
            return table[head].split(".") + rest[width:]
    return None


def _member(parts: Segments) -> tuple[int, str, int, Segments] | None:
    """`<level>.<kind>.<index>.<rest...>` of down_blocks / up_blocks."""
    if len(parts) < 3:
        return None
    level, index = _index(parts[0]), _index(parts[2])
    if level is None or index is None:
        return None
    return level, parts[1], index, parts[3:]


def _down_to_sgm(parts: Segments, layout: UNetLayout) -> str | None:
    member = _member(parts)
    if member is None or member[0] >= layout.levels:
        return None
    level, kind, j, rest = member
    R = layout.layers_per_block
    block = f"input_blocks.{1 + (R + 1) * level + j}"
    if kind == "resnets" and j < R:
        renamed = _rename_head(rest, _RESNET_TO_SGM)
        return None if renamed is None else _join(block, "0", renamed)
    if kind == "attentions" and j < R and layout.down_has_attentions[level]:
        return _join(block, "1", rest)
    if kind == "downsamplers" and j == 0 and layout.down_has_downsampler[level]:
        renamed = _rename_head(rest, _DOWNSAMPLER_TO_SGM)
        return None if renamed is None else _join(f"input_blocks.{(R + 1) * (level + 1)}.0", renamed)
    return None


def _upsampler_slot(level: int, layout: UNetLayout) -> int:
    return 2 if layout.up_has_attentions[level] else 1


def _up_to_sgm(parts: Segments, layout: UNetLayout) -> str | None:
    member = _member(parts)
    if member is None or member[0] >= layout.levels:
        return None
    level, kind, j, rest = member
    R = layout.layers_per_block
    if kind == "resnets" and j <= R:
        renamed = _rename_head(rest, _RESNET_TO_SGM)
        return None if renamed is None else _join(f"output_blocks.{(R + 1) * level + j}.0", renamed)
    if kind == "attentions" and j <= R and layout.up_has_attentions[level]:
        return _join(f"output_blocks.{(R + 1) * level + j}.1", rest)
    if kind == "upsamplers" and j == 0 and layout.up_has_upsampler[level]:
        renamed = _rename_head(rest, _UPSAMPLER_NAMES)
        slot = _upsampler_slot(level, layout)
        return None if renamed is None else _join(f"output_blocks.{(R + 1) * level + R}.{slot}", renamed)
    return None


# Without a mid attention the LDM middle_block numbering is not established, so no mapping.
_MID_TO_SGM = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}
_MID_TO_DIFFUSERS = {sgm: kind_index for kind_index, sgm in _MID_TO_SGM.items()}


def _mid_to_sgm(parts: Segments, layout: UNetLayout) -> str | None:
    if len(parts) < 2 or not layout.mid_has_attentions or (parts[0], parts[1]) not in _MID_TO_SGM:
        return None
    rest = _rename_head(parts[2:], _RESNET_TO_SGM) if parts[0] == "resnets" else parts[2:]
    return None if rest is None else _join("middle_block", _MID_TO_SGM[(parts[0], parts[1])], rest)


def _diffusers_to_sgm_or_none(path: str, layout: UNetLayout) -> str | None:
    if path in _TOP_LEVEL_TO_SGM:
        return _TOP_LEVEL_TO_SGM[path]
    head, *parts = path.split(".")
    converters = {"down_blocks": _down_to_sgm, "mid_block": _mid_to_sgm, "up_blocks": _up_to_sgm}
    return converters[head](parts, layout) if head in converters else None


def unet_diffusers_to_sgm(path: str, layout: UNetLayout) -> str:
    """diffusers UNet module path -> SGM/LDM path (FORMAT.md §1.4).

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`
    -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`. Raises ValueError for paths with no
    SGM form (whole down/up blocks, shared activations, blocks the layout does not have).
    """
    sgm = _diffusers_to_sgm_or_none(path, layout)
    if sgm is None:
        raise ValueError(f"UNet module {path!r} has no SGM/LDM name in this layout")
    return sgm


def _sgm_member(parts: Segments) -> tuple[int, int, Segments] | None:
    """`<block>.<slot>.<rest...>` of input_blocks / output_blocks."""
    if len(parts) < 2:
        return None
    block, slot = _index(parts[0]), _index(parts[1])
    return None if block is None or slot is None else (block, slot, parts[2:])


def _input_to_diffusers(parts: Segments, layout: UNetLayout) -> str | None:
    member = _sgm_member(parts)
    if member is None or member[0] == 0:
        return None
    R = layout.layers_per_block
    level, j = divmod(member[0] - 1, R + 1)
    slot, rest = member[1], member[2]
    if level >= layout.levels:
        return None
    if j < R and slot == 0:
        renamed = _rename_head(rest, _RESNET_TO_DIFFUSERS)
        return None if renamed is None else _join(f"down_blocks.{level}.resnets.{j}", renamed)
    if j < R and slot == 1 and layout.down_has_attentions[level]:
        return _join(f"down_blocks.{level}.attentions.{j}", rest)
    if j == R and slot == 0 and layout.down_has_downsampler[level]:
        renamed = _rename_head(rest, _DOWNSAMPLER_TO_DIFFUSERS)
        return None if renamed is None else _join(f"down_blocks.{level}.downsamplers.0", renamed)
    return None


def _output_to_diffusers(parts: Segments, layout: UNetLayout) -> str | None:
    member = _sgm_member(parts)
    if member is None:
        return None
    R = layout.layers_per_block
    level, j = divmod(member[0], R + 1)
    slot, rest = member[1], member[2]
    if level >= layout.levels:
        return None
    if slot == 0:
        renamed = _rename_head(rest, _RESNET_TO_DIFFUSERS)
        return None if renamed is None else _join(f"up_blocks.{level}.resnets.{j}", renamed)
    if slot == 1 and layout.up_has_attentions[level]:
        return _join(f"up_blocks.{level}.attentions.{j}", rest)
    if j == R and slot == _upsampler_slot(level, layout) and layout.up_has_upsampler[level]:
        renamed = _rename_head(rest, _UPSAMPLER_NAMES)
        return None if renamed is None else _join(f"up_blocks.{level}.upsamplers.0", renamed)
    return None


def _middle_to_diffusers(parts: Segments, layout: UNetLayout) -> str | None:
    if not parts or not layout.mid_has_attentions or parts[0] not in _MID_TO_DIFFUSERS:
        return None
    kind, index = _MID_TO_DIFFUSERS[parts[0]]
    rest = _rename_head(parts[1:], _RESNET_TO_DIFFUSERS) if kind == "resnets" else parts[1:]
    return None if rest is None else _join("mid_block", kind, index, rest)


def _sgm_to_diffusers_or_none(path: str, layout: UNetLayout) -> str | None:
    if path in _TOP_LEVEL_TO_DIFFUSERS:
        return _TOP_LEVEL_TO_DIFFUSERS[path]
    head, *parts = path.split(".")
    converters = {
        "input_blocks": _input_to_diffusers,
        "middle_block": _middle_to_diffusers,
        "output_blocks": _output_to_diffusers,
    }
    return converters[head](parts, layout) if head in converters else None


def unet_sgm_to_diffusers(path: str, layout: UNetLayout) -> str:
    """SGM/LDM UNet module path -> diffusers path; the exact inverse of `unet_diffusers_to_sgm`."""
    diffusers = _sgm_to_diffusers_or_none(path, layout)
    if diffusers is None:
        raise ValueError(f"SGM/LDM UNet path {path!r} does not name a diffusers module in this layout")
    return diffusers


# ----- keys -------------------------------------------------------------------------------------------


def canonical_text_encoder_path(path: str) -> str:
    """The CLIP text-encoder path in the `text_model.` form that file keys use.

    transformers 5 `CLIPTextModel` yields `encoder.layers.0.mlp.fc1`; files (and
    `CLIPTextModelWithProjection`) say `text_model.encoder.layers.0.mlp.fc1`.
    """
    if not path or path == TEXT_MODEL or path.startswith(TEXT_MODEL + "."):
        return path
    if path.split(".", 1)[0] in _TEXT_ENCODER_TOP_LEVEL:
        return path
    return f"{TEXT_MODEL}.{path}"


def module_key(prefix: str, dotted_path: str) -> str:
    """`prefix + "_" + dotted_path` with every dot replaced by an underscore (FORMAT.md §1.1)."""
    return f"{prefix}_{dotted_path.replace('.', '_')}"


def part_prefix(part: str, family: str) -> str:
    """The key prefix lyco writes for a model part: lora_unet, lora_te (SD1/SD2), lora_te1/lora_te2 (SDXL)."""
    _check_part(part)
    _check_family(family)
    if part == "unet":
        return UNET_PREFIX
    if part == "text_encoder":
        return "lora_te1" if family == "sdxl" else "lora_te"
    if family == "sdxl":
        return "lora_te2"
    raise ValueError(f"family {family!r} has no text_encoder_2")


def _sdxl_layout_required(layout: UNetLayout | None) -> UNetLayout:
    if layout is None:
        raise ValueError("SDXL UNet keys use SGM names: pass layout=UNetLayout.from_unet(unet)")
    return layout


def file_key(part: str, path: str, *, family: str, layout: UNetLayout | None = None) -> str:
    """The module key lyco writes for `path` (as the model's named_modules() yields it), §8."""
    prefix = part_prefix(part, family)
    if part != "unet":
        return module_key(prefix, canonical_text_encoder_path(path))
    if family == "sdxl":
        return module_key(prefix, unet_diffusers_to_sgm(path, _sdxl_layout_required(layout)))
    return module_key(prefix, path)


def _reader_text_encoder_prefixes(part: str) -> tuple[str, ...]:
    # ComfyUI maps both lora_te_ and lora_te1_ to the first CLIP of SD1, SD2 and SDXL.
    return ("lora_te", "lora_te1") if part == "text_encoder" else ("lora_te2",)


def key_aliases(part: str, path: str, *, family: str, layout: UNetLayout | None = None) -> tuple[str, ...]:
    """Every underscored module key a reader may meet for this module; the written key first."""
    written = file_key(part, path, family=family, layout=layout)
    if part == "unet":
        sgm = _diffusers_to_sgm_or_none(path, layout) if layout is not None else None
        candidates = [written, module_key(UNET_PREFIX, path)]
        candidates += [module_key(UNET_PREFIX, sgm)] if sgm is not None else []
        candidates.append(module_key(LYCORIS_PREFIX, path))
    else:
        # Writers that derive names from transformers-5 CLIPTextModel (diffusers' convert_state_dict_to_kohya,
        # LyCORIS's kohya network) drop the `text_model_` part: accept both forms.
        stripped = canonical_text_encoder_path(path).removeprefix("text_model.")
        forms = (canonical_text_encoder_path(path), stripped)
        candidates = [written] + [module_key(p, form) for p in _reader_text_encoder_prefixes(part) for form in forms]
    return tuple(dict.fromkeys(candidates))


def dotted_prefixes(part: str) -> tuple[str, ...]:
    """The diffusers/PEFT dotted module prefixes of a part (`unet.`, `text_encoder.`, `text_encoder_2.`)."""
    _check_part(part)
    return (f"{part}.",)


def _dotted_aliases(part: str, path: str) -> tuple[str, ...]:
    paths = (path,) if part == "unet" else (canonical_text_encoder_path(path), path)
    return tuple(dict.fromkeys(prefix + p for prefix in dotted_prefixes(part) for p in paths))


# ----- key table ------------------------------------------------------------------------------------


def is_lyco_wrapper(module: nn.Module) -> bool:
    """An adapter wrapper: class attribute `is_lyco_wrapper = True` and a `base` child module."""
    return getattr(type(module), "is_lyco_wrapper", False) is True and isinstance(
        getattr(module, "base", None), nn.Module
    )


def innermost_module(module: nn.Module) -> nn.Module:
    """The frozen layer under any number of nested adapter wrappers."""
    while is_lyco_wrapper(module):
        module = module.base
    return module


def is_linear_or_conv(path: str, module: nn.Module) -> bool:
    """The default module filter: nn.Linear and nn.Conv2d (including their subclasses)."""
    return isinstance(module, (nn.Linear, nn.Conv2d))


def adaptable_modules(
    model: nn.Module, module_filter: ModuleFilter = is_linear_or_conv
) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for each module the filter accepts; a wrapper stands for its innermost base.

    The filter sees the innermost base; the yielded module and path are the wrapper's, and a
    wrapper's descendants are never yielded.
    """
    wrapper_prefix: str | None = None
    for path, module in model.named_modules():
        if wrapper_prefix is not None and path.startswith(wrapper_prefix):
            continue
        wrapper_prefix = None
        if not path:
            continue
        if is_lyco_wrapper(module):
            wrapper_prefix = path + "."
        if module_filter(path, innermost_module(module)):
            yield path, module


@dataclass(frozen=True)
class KeyTable:
    """Module keys of one model. `by_key` maps every alias (underscored keys and dotted
    diffusers/PEFT paths) to (part, path as named_modules() yields it); `written` gives the key
    lyco writes for each (part, path)."""

    by_key: Mapping[str, tuple[str, str]]
    written: Mapping[tuple[str, str], str]

    def lookup(self, module_key: str) -> tuple[str, str] | None:
        return self.by_key.get(module_key)


def _layout_for(part: str, model: nn.Module, family: str) -> UNetLayout | None:
    if part != "unet":
        return None
    if family == "sdxl":
        return UNetLayout.from_unet(model)
    try:
        return UNetLayout.from_unet(model)  # only for the LDM-named aliases SD1/SD2 files may use
    except ValueError:
        return None


def _register(by_key: dict[str, tuple[str, str]], alias: str, target: tuple[str, str]) -> None:
    existing = by_key.setdefault(alias, target)
    if existing != target:
        raise ValueError(f"key {alias!r} would name both {existing} and {target}")


def build_key_table(
    parts: Mapping[str, nn.Module], *, family: str, module_filter: ModuleFilter | None = None
) -> KeyTable:
    """Key table for a model given as {part: module}; registers nn.Linear / nn.Conv2d by default."""
    _check_family(family)
    by_key: dict[str, tuple[str, str]] = {}
    written: dict[tuple[str, str], str] = {}
    for part, model in parts.items():
        part_prefix(part, family)
        layout = _layout_for(part, model, family)
        for path, _ in adaptable_modules(model, module_filter or is_linear_or_conv):
            aliases = key_aliases(part, path, family=family, layout=layout)
            written[(part, path)] = aliases[0]
            for alias in aliases + _dotted_aliases(part, path):
                _register(by_key, alias, (part, path))
    return KeyTable(by_key=MappingProxyType(by_key), written=MappingProxyType(written))
