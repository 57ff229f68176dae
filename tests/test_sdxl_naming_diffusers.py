"""On the real SDXL architecture (meta device), every key lyco writes for the attn-mlp preset and the
conv (conv_rank) preset goes through diffusers' own SGM -> diffusers conversion
(`StableDiffusionXLPipeline.lora_state_dict` = `_maybe_map_sgm_blocks_to_diffusers` +
`_convert_non_diffusers_lora_to_diffusers`, then the PEFT renames `load_lora_weights` applies) to an
existing module, the same module lyco attached it to, with no key left over:
986 / 1052 modules as sd-scripts writes (FORMAT.md §1.2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lyco import LycoNetwork, NetworkConfig
from sd_configs import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SDXL_UNET, meta_text_encoder, meta_unet


@pytest.fixture(scope="module")
def sdxl():
    return {
        "unet": meta_unet(SDXL_UNET),
        "text_encoder": meta_text_encoder(CLIP_L_TEXT),
        "text_encoder_2": meta_text_encoder(OPENCLIP_BIGG_TEXT, with_projection=True),
    }


def _diffusers_targets(state_dict: dict, parts) -> dict[tuple[str, str], torch.Tensor]:
    """(part, module path) -> the lora_down tensor, exactly as diffusers 0.42 would inject it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state_dict), unet_config=parts["unet"].config)
    assert len(alphas) == len(state_dict) // 3
    targets: dict[tuple[str, str], torch.Tensor] = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        sub = {k[len(part) + 1:]: v for k, v in converted.items() if k.startswith(part + ".")}
        if part == "unet":
            sub = convert_unet_state_dict_to_peft(sub)
        else:  # diffusers lora_base._load_lora_into_text_encoder
            sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
            if not hasattr(parts[part], "text_model"):
                sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
        for key, value in sub.items():
            if key.endswith(".lora_A.weight"):
                targets[(part, key[: -len(".lora_A.weight")])] = value
            else:
                assert key.endswith(".lora_B.weight"), key
    return targets


@pytest.mark.parametrize("conv_rank, modules, unet_modules", [(None, 986, 722), (4, 1052, 788)])
def test_every_written_key_converts_to_its_module(sdxl, conv_rank, modules, unet_modules):
    with torch.device("meta"):
        network = LycoNetwork.create(sdxl, NetworkConfig(rank=4, conv_rank=conv_rank))
    try:
        keys = list(network.layers)
        assert len(keys) == modules
        assert sum(1 for k in keys if k.startswith("lora_unet_")) == unet_modules
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_"))
                   for k in keys)  # SGM names, as sd-scripts writes SDXL
        # one tagged tensor per module, so each converted key can be traced back to the key lyco wrote
        state = {}
        for index, key in enumerate(keys):
            state[f"{key}.lora_down.weight"] = torch.tensor([float(index)])
            state[f"{key}.lora_up.weight"] = torch.zeros(1)
            state[f"{key}.alpha"] = torch.tensor(4.0)
        targets = _diffusers_targets(state, sdxl)
        assert len(targets) == modules  # nothing dropped, no two keys on one module
        for (part, path), tag in targets.items():
            module = sdxl[part].get_submodule(path)  # raises if diffusers names a module that does not exist
            key = keys[int(tag.item())]
            slot = network.slot(key)
            assert (slot.part, slot.path) == (part, path), f"{key}: diffusers -> {part}.{path}, lyco -> {slot.part}.{slot.path}"
            assert module is network.layers[key]  # the network is attached: the path holds lyco's wrapper
            assert isinstance(module.innermost, (nn.Linear, nn.Conv2d))
    finally:
        network.remove()
