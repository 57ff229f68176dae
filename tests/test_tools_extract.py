"""lyco-extract: ΔW of known rank is recovered; dynamic ranks follow the spectrum; min_diff and clamping."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lyco import load_network
from lyco.format import load_adapter_file
from lyco.tools._common import write_adapter
from lyco.tools.extract import extract_adapter
from tiny_models import clone_parts, tiny_sd1, tiny_sdxl

LINEAR = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
CONV = ("unet", "down_blocks.0.resnets.0.conv1")


def low_rank_delta(shape, spectrum, seed):
    gen = torch.Generator().manual_seed(seed)
    out_f, in_flat = shape[0], int(torch.tensor(shape[1:]).prod())
    u, _ = torch.linalg.qr(torch.randn(out_f, len(spectrum), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_flat, len(spectrum), generator=gen, dtype=torch.float64))
    return ((u * torch.tensor(spectrum, dtype=torch.float64)) @ v.t()).reshape(shape).float()


def add_rank_r_deltas(parts, rank, *, seed=0):
    """tuned = base + ΔW with rank(ΔW) = rank in every Linear / Conv2d; returns {(part, path): ΔW}."""
    deltas = {}
    with torch.no_grad():
        for part, root in parts.items():
            for index, (path, module) in enumerate(root.named_modules()):
                if isinstance(module, (nn.Linear, nn.Conv2d)) and min(module.weight.shape[0], module.weight[0].numel()) > rank:
                    gen = torch.Generator().manual_seed(seed + index)
                    spectrum = (torch.rand(rank, generator=gen) * 0.2 + 0.05).tolist()
                    delta = low_rank_delta(tuple(module.weight.shape), spectrum, seed + index)
                    module.weight.add_(delta)
                    deltas[(part, path)] = delta
    return deltas


def contributions(parts, path):
    """{(part, path): what the adapter file adds to each layer} via the core loader."""
    loaded = load_network(parts, path)
    try:
        out = {}
        for key, layer in loaded.network.layers.items():
            slot = loaded.network.slot(key)
            out[(slot.part, slot.path)] = layer.contribution().detach()
        return out
    finally:
        loaded.network.remove()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_extraction_at_rank_at_least_r_reconstructs_the_difference(family, tmp_path):
    base = tiny_sd1() if family == "sd1" else tiny_sdxl()
    tuned = clone_parts(base)
    deltas = add_rank_r_deltas(tuned, 3)
    result = extract_adapter(base, tuned, rank=4, conv_rank=3, preset="full")
    assert result.family == family
    path = write_adapter(tmp_path / "x.safetensors", result.tensors, result.metadata)
    got = contributions(base, path)
    assert len(got) == len(result.extracted) > 50
    for target, contribution in got.items():
        delta = deltas[target]
        error = torch.linalg.norm(contribution - delta) / torch.linalg.norm(delta)
        assert error < 1e-4, f"{target}: relative error {error:.2e}"
    assert all(layer.fro_retained == pytest.approx(1.0, abs=1e-5) and layer.rank <= 4 for layer in result.extracted)
    keys = load_adapter_file(path).modules
    if family == "sdxl":  # SGM UNet names and lora_te1/lora_te2 like sd-scripts
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    conv1 = next(k for k in keys if k.endswith(("_conv1", "_in_layers_2")))
    assert keys[conv1].tensors["lora_down.weight"].shape[2:] == (3, 3)
    assert result.metadata["ss_network_module"] == "networks.lora"
    assert json.loads(result.metadata["lyco_history"])[-1]["tool"] == "extract"


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd1()


def tuned_with_spectrum(base, spectrum, *, small=None):
    tuned = clone_parts(base)
    with torch.no_grad():
        for index, (part, path) in enumerate((LINEAR, CONV)):
            weight = tuned[part].get_submodule(path).weight
            weight.add_(low_rank_delta(tuple(weight.shape), spectrum, index))
        if small is not None:
            tuned["text_encoder"].get_submodule("encoder.layers.0.mlp.fc1").weight.add_(small)
    return tuned


@pytest.mark.parametrize("method, param, expected", [("sv_ratio", 4.0, 3), ("sv_fro", 0.99, 3), ("sv_cumulative", 0.5, 1)])
def test_dynamic_methods_pick_the_expected_ranks(sd1, method, param, expected):
    tuned = tuned_with_spectrum(sd1, [8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    result = extract_adapter(sd1, tuned, rank=32, conv_rank=32, method=method, param=param)
    ranks = {layer.key: layer.rank for layer in result.extracted}
    assert ranks == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": expected,
                     "lora_unet_down_blocks_0_resnets_0_conv1": expected}
    assert result.metadata["ss_network_dim"] == "Dynamic"


def test_fixed_rank_reports_the_retained_norm_and_conv_rank_is_separate(sd1):
    tuned = tuned_with_spectrum(sd1, [8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    result = extract_adapter(sd1, tuned, rank=2, conv_rank=1)
    layers = {layer.key: layer for layer in result.extracted}
    linear = layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    conv = layers["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (linear.rank, conv.rank) == (2, 1)
    total = (64 + 16 + 4 + 1 + 0.25 + 0.0625) ** 0.5
    assert linear.fro_retained == pytest.approx(80 ** 0.5 / total, rel=1e-4)
    assert conv.energy_retained == pytest.approx(64 / total ** 2, rel=1e-4)


def test_min_diff_skips_layers_that_barely_changed(sd1):
    tuned = tuned_with_spectrum(sd1, [8.0, 4.0], small=torch.full((64, 32), 0.005))
    loose = extract_adapter(sd1, tuned, rank=4)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in {layer.key for layer in loose.extracted}
    strict = extract_adapter(sd1, tuned, rank=4, min_diff=0.01)
    skipped = {layer.key: layer for layer in strict.layers if layer.skipped}
    assert skipped["lora_te_text_model_encoder_layers_0_mlp_fc1"].max_diff == pytest.approx(0.005, rel=1e-4)
    # without a conv rank the ResNet convs are not targeted (sd-scripts: no --conv_dim, no 3x3 layers)
    assert [layer.key for layer in strict.extracted] == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert "skipped" in strict.summary()
    with pytest.raises(ValueError, match="do not differ"):
        extract_adapter(sd1, clone_parts(sd1), rank=4)


def test_clamp_quantile_clips_the_factors(sd1):
    tuned = tuned_with_spectrum(sd1, [8.0, 4.0, 2.0])
    exact = extract_adapter(sd1, tuned, rank=3)
    clamped = extract_adapter(sd1, tuned, rank=3, clamp_quantile=0.5)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    values = torch.cat([clamped.tensors[f"{key}.lora_up.weight"].flatten(), clamped.tensors[f"{key}.lora_down.weight"].flatten()])
    exact_values = torch.cat([exact.tensors[f"{key}.lora_up.weight"].flatten(), exact.tensors[f"{key}.lora_down.weight"].flatten()])
    assert values.abs().max() < exact_values.abs().max()
    assert values.abs().max() == pytest.approx(float(exact_values.abs().quantile(0.5)), rel=1e-5)


def test_cli_extracts_from_two_model_folders(tmp_path, capsys):
    from pipelines.models import load_pipeline
    from pipelines.tools_cli import extract_main

    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        weight = pipe.unet.get_submodule(LINEAR[1]).weight
        weight.add_(low_rank_delta(tuple(weight.shape), [0.5, 0.25], 0))
    pipe.save_pretrained(str(tmp_path / "tuned"))
    out = tmp_path / "diff.safetensors"
    argv = ["--base", "builtin:tiny-sd", "--tuned", str(tmp_path / "tuned"), "--rank", "8", "--dynamic-method", "sv_ratio",
            "--dynamic-param", "100", "-o", str(out), "--verbose", "--no-progress"]
    assert extract_main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 layers extracted" in printed and "skipped" in printed
    adapter = load_adapter_file(out)
    assert list(adapter.modules) == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert adapter.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].rank == 2
    assert adapter.metadata["ss_base_model_version"] == "sd_v1" and adapter.metadata["modelspec.title"] == "diff"
    assert extract_main(argv) == 1 and "already exists" in capsys.readouterr().err
