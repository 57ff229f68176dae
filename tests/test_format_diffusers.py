"""diffusers 0.42 interop, both directions, on tiny SD1-like and SDXL-like pipelines (fp32, 1e-4).

- lyco LoRA/LoCon files load with `pipe.load_lora_weights` and give the outputs of lyco's own loader;
- files diffusers writes (PEFT `lora_A`/`lora_B` with `lora_adapter_metadata`, incl. DoRA and rsLoRA;
  the older `.lora.down` / `lora_linear_layer` form; and kohya form via
  `diffusers.utils.convert_state_dict_to_kohya`) load in lyco with the outputs of the PEFT model.

diffusers cannot read LoHa / LoKr / LoCon-Tucker for SD1/SDXL and drops `dora_scale` (FORMAT.md §5),
so only plain LoRA/LoCon is checked in the lyco -> diffusers direction.
"""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from lyco import LycoNetwork, NetworkConfig, load_network, save_network
from tiny_models import clone_parts, model_outputs, outputs_differ, randomize, tiny_parts

TOL = dict(rtol=1e-4, atol=1e-4)


def _pipeline(family: str, parts):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=8, layers_per_block=1)
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                                         tokenizer=None, tokenizer_2=None, unet=parts["unet"], scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=parts["text_encoder"], tokenizer=None, unet=parts["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _assert_close(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


# ----- lyco -> diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_our_lora_locon_files_load_in_diffusers(family, tmp_path):
    # different alphas for linear and 3x3 conv modules exercise diffusers' alpha_pattern path
    config = NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=3)
    source = tiny_parts(family)
    base = clone_parts(source)
    network = LycoNetwork.create(source, config)
    randomize(network.parameters(), std=0.1)
    path = save_network(network, tmp_path / f"{family}.safetensors")
    assert any(t.dim() == 4 and t.shape[-1] == 3 for t in network.adapter_state_dict().values())  # real LoCon 3x3 present
    network.remove()

    ours = clone_parts(base)
    result = load_network(ours, path)
    expected = model_outputs(ours)
    result.network.remove()
    assert all(outputs_differ(expected, model_outputs(base)).values())

    theirs = clone_parts(base)
    pipe = _pipeline(family, theirs)
    pipe.load_lora_weights(str(path))
    _assert_close(model_outputs(theirs), expected)


# ----- diffusers -> lyco ---------------------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _peft_adapted(family: str, *, unet_alpha=2, te_alpha=3, rank=4, **lora_kwargs):
    """A tiny model with PEFT LoRA on UNet and text encoder(s), random adapter weights.
    Returns (peft model parts, untouched copy, {component: (peft state dict, config dict)})."""
    from peft import LoraConfig, get_peft_model_state_dict

    parts = tiny_parts(family)
    base = clone_parts(parts)
    unet_config = LoraConfig(r=rank, lora_alpha=unet_alpha, target_modules=UNET_TARGETS, **lora_kwargs,
                             rank_pattern={"conv2": 2} if unet_alpha != rank else {},
                             alpha_pattern={"conv2": 5} if unet_alpha != rank else {})
    parts["unet"].add_adapter(unet_config)
    for name in parts:
        if name.startswith("text_encoder"):
            parts[name].add_adapter(LoraConfig(r=rank, lora_alpha=te_alpha, target_modules=TE_TARGETS, **lora_kwargs))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for part in parts.values():
            for pname, p in part.named_parameters():
                if "lora_" in pname:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.15)
    layers = {name: (get_peft_model_state_dict(part), part.peft_config["default"].to_dict()) for name, part in parts.items()}
    return parts, base, layers


def _save_with_diffusers(family: str, layers, directory) -> str:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs = {"unet_lora_layers": layers["unet"][0], "text_encoder_lora_layers": layers["text_encoder"][0],
              "unet_lora_adapter_metadata": layers["unet"][1], "text_encoder_lora_adapter_metadata": layers["text_encoder"][1]}
    if family == "sdxl":
        kwargs.update(text_encoder_2_lora_layers=layers["text_encoder_2"][0], text_encoder_2_lora_adapter_metadata=layers["text_encoder_2"][1])
        StableDiffusionXLPipeline.save_lora_weights(str(directory), **kwargs)
    else:
        StableDiffusionPipeline.save_lora_weights(str(directory), **kwargs)
    return str(directory / "pytorch_lora_weights.safetensors")


def _load_in_lyco_and_compare(base, path, expected):
    assert all(outputs_differ(expected, model_outputs(base)).values())
    result = load_network(base, path)
    assert result.skipped_keys == [] and result.problems == []
    _assert_close(model_outputs(base), expected)
    dora_axes = {layer.dora_axis for layer in result.network.layers.values()}
    result.network.remove()
    return dora_axes


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_peft_files_load_in_lyco(family, tmp_path):
    parts, base, layers = _peft_adapted(family)
    expected = model_outputs(parts)
    path = _save_with_diffusers(family, layers, tmp_path)
    with safetensors.safe_open(path, "pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()
        assert any(".lora_A.weight" in k for k in handle.keys())
    _load_in_lyco_and_compare(base, path, expected)


@pytest.mark.parametrize("option", ["use_dora", "use_rslora"])
def test_diffusers_peft_dora_and_rslora_files(option, tmp_path):
    """DoRA: lora_magnitude_vector, (out,) for Linear and (1, out, 1, 1) for Conv2d, output axis.
    rsLoRA: scale alpha/sqrt(r), known only from lora_adapter_metadata."""
    parts, base, layers = _peft_adapted("sd1", **{option: True})
    expected = model_outputs(parts)
    path = _save_with_diffusers("sd1", layers, tmp_path)
    dora_axes = _load_in_lyco_and_compare(base, path, expected)
    assert dora_axes == ({"output"} if option == "use_dora" else {None})


def test_older_diffusers_format_loads_in_lyco(tmp_path):
    """`convert_state_dict_to_diffusers` form: UNet `to_q.lora.down.weight`, TE `q_proj.lora_linear_layer.down.weight`
    (no alphas in this format, so the PEFT model uses alpha = r)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    parts, base, layers = _peft_adapted("sd1", unet_alpha=4, te_alpha=4)
    expected = model_outputs(parts)
    tensors = {}
    for name, (state, _) in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in convert_state_dict_to_diffusers(state).items()})
    assert any(".lora.down.weight" in k for k in tensors) and any(".lora_linear_layer.down.weight" in k for k in tensors)
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    _load_in_lyco_and_compare(base, path, expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_kohya_conversion_loads_in_lyco(family, tmp_path):
    """PEFT -> kohya with diffusers' `convert_state_dict_to_kohya` (it writes alpha = r, so lora_alpha = r here).

    On transformers 5 the first text encoder has no `text_model.` child, so diffusers writes
    `lora_te1_encoder_layers_*`: KNOWN FAILING until lyco/naming.py maps those keys
    (see test_format_keys.py::test_transformers5_text_encoder_keys_without_text_model)."""
    from diffusers.utils import convert_state_dict_to_kohya

    parts, base, layers = _peft_adapted(family, unet_alpha=4, te_alpha=4)
    expected = model_outputs(parts)
    peft_state = {f"{name}.{k}": v for name, (state, _) in layers.items() for k, v in state.items()}
    tensors = convert_state_dict_to_kohya(peft_state)
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te1_") for k in tensors)
    path = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _load_in_lyco_and_compare(base, path, expected)
