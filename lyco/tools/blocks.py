"""Per-block weights for merging, in the block naming of the LoRA Block Weight extension
(hako-mikan/sd-webui-lora-block-weight; also used by sd-scripts' svd_merge_lora / LyCORIS tools).

Block ids: `BASE` (text encoders), `IN00`..`IN11` (SGM `input_blocks.N`; IN00 is conv_in), `M00`
(middle block), `OUT00`..`OUT11` (`output_blocks.N`); SDXL has IN00..IN08 and OUT00..OUT08. UNet
modules outside the blocks (time / label embedding, conv_norm_out, conv_out) always keep weight 1.

A weight spec is either
- a vector of 17 or 26 values (SD1/SD2) or 12 or 20 values (SDXL) in the extension's order, as a
  sequence or a comma-separated string; as in the extension (`to26`), every block the short forms do
  not name gets 0; or
- a mapping {block id or regex: weight} (or the string "IN04=0.5,M00=0"): a key that is not a block
  id is a regex searched in the module's qualified path (`unet.down_blocks.1.attentions.0...`) and in
  its file key; block ids first, then the last matching regex wins; modules no entry names keep 1.
Block ids and vectors: lyco.blocks, shared with pipelines/block_weights.py (generation-time weights).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..blocks import BLOCK_VECTORS, TEXT_ENCODER_BLOCK, block_of_unet_path
from ..naming import UNetLayout
from .convert import ModuleId, default_layout

_BLOCK_ID = re.compile(r"^(BASE|IN\d\d|M00|OUT\d\d)$")


def block_of(module: ModuleId, layout: UNetLayout) -> str | None:
    """The block id of a module (None for a UNet path the layout cannot place)."""
    if module.part != "unet":
        return TEXT_ENCODER_BLOCK
    return block_of_unet_path(module.path, layout)


@dataclass(frozen=True)
class BlockWeights:
    blocks: Mapping[str, float]
    patterns: tuple[tuple[str, float], ...] = ()
    unnamed: float = 1.0  # the weight of a block the spec does not name (0 for lbw vectors)

    def weight(self, module: ModuleId | None, key: str, *, family: str, layout: UNetLayout | None = None) -> float:
        value = 1.0
        if module is not None:
            block = block_of(module, layout or default_layout(family))
            value = self.blocks.get(block, self.unnamed) if block is not None else 1.0
        for pattern, weight in self.patterns:
            if (module is not None and re.search(pattern, module.qualified)) or re.search(pattern, key):
                value = weight
        return value


def parse_block_weights(spec: str | Mapping[str, float] | Sequence[float] | None, *, family: str | None = None) -> BlockWeights | None:
    """BlockWeights from a mapping, a vector of 12/17/20/26 numbers, or a string of either
    ("1,0,0.5,..." or "IN04=0.5,OUT.*attn2=0" style)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if "=" in text:
            pairs = [item.split("=", 1) for item in _split(text)]
            spec = {name.strip(): float(value) for name, value in pairs}
        else:
            spec = [float(v) for v in _split(text)]
    if isinstance(spec, Mapping):
        blocks = {k.upper(): float(v) for k, v in spec.items() if _BLOCK_ID.match(k.upper())}
        patterns = tuple((k, float(v)) for k, v in spec.items() if not _BLOCK_ID.match(k.upper()))
        for pattern, _ in patterns:
            re.compile(pattern)
        return BlockWeights(blocks, patterns)
    values = [float(v) for v in spec]
    names = BLOCK_VECTORS.get(len(values))
    if names is None:
        raise ValueError(f"a block-weight vector has 17 or 26 values (SD1/SD2) or 12 or 20 (SDXL), got {len(values)}")
    sdxl_vector = len(values) in (12, 20)
    if family is not None and (family == "sdxl") != sdxl_vector:
        raise ValueError(f"a {len(values)}-value block-weight vector is for {'SDXL' if sdxl_vector else 'SD1/SD2'}, but the model is {family}")
    return BlockWeights(dict(zip(names, values)), unnamed=0.0)


def _split(text: str) -> list[str]:
    # commas separate entries; a regex containing commas can be given through the Python API
    return [item for item in (part.strip() for part in text.split(",")) if item]
