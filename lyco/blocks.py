"""Block ids of the LoRA Block Weight convention (hako-mikan/sd-webui-lora-block-weight), shared by
merge-time weights (lyco.tools.blocks) and generation-time weights (pipelines.block_weights).

`BASE` is the text encoders; `INnn` / `M00` / `OUTnn` are the SGM/LDM `input_blocks.N`,
`middle_block` and `output_blocks.N` (IN00 is conv_in). SD1/SD2 have IN00..IN11 and OUT00..OUT11,
SDXL IN00..IN08 and OUT00..OUT08. A UNet module is placed through lyco.naming's diffusers -> SGM
mapping, so diffusers-named and SGM-named files get the same block for the same module.
"""
from __future__ import annotations

from collections.abc import Mapping

from . import naming

TEXT_ENCODER_BLOCK = "BASE"

BLOCK_IDS_26: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
# the SD1/SD2 blocks that hold attention
BLOCK_IDS_17: tuple[str, ...] = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
BLOCK_IDS_12: tuple[str, ...] = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
BLOCK_IDS_20: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))

# The ids a vector of each length names, per family.
FORMS: Mapping[str, Mapping[int, tuple[str, ...]]] = {
    "sd1": {17: BLOCK_IDS_17, 26: BLOCK_IDS_26},
    "sd2": {17: BLOCK_IDS_17, 26: BLOCK_IDS_26},
    "sdxl": {12: BLOCK_IDS_12, 20: BLOCK_IDS_20},
}
BLOCK_VECTORS: Mapping[int, tuple[str, ...]] = {n: ids for forms in FORMS.values() for n, ids in forms.items()}


def block_of_unet_path(path: str, layout: naming.UNetLayout) -> str | None:
    """The block id (INnn, M00, OUTnn) of a diffusers UNet module path; None outside the blocks
    (time/label embedding, conv_norm_out, conv_out) or for a path the layout cannot place."""
    try:
        sgm = naming.unet_diffusers_to_sgm(path, layout)
    except ValueError:
        return None
    head, _, rest = sgm.partition(".")
    index = rest.split(".", 1)[0]
    if head == "input_blocks" and index.isdigit():
        return f"IN{int(index):02d}"
    if head == "middle_block":
        return "M00"
    if head == "output_blocks" and index.isdigit():
        return f"OUT{int(index):02d}"
    return None
