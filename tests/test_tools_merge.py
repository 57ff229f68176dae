"""lyco-merge: baked weights equal the unfused stack (LoRA + LoHa + LoKr + DoRA); concat of LoRAs is exact;
SVD merges are the truncated optimum of the summed ΔW; block weights; single-file / folder output."""
from __future__ import annotations

import json

import pytest
import torch

from lyco import LycoNetwork, NetworkConfig, load_network, save_network
from lyco.format import load_adapter_file
from lyco.layer import LycoLayer
from lyco.tools._common import write_adapter
from lyco.tools.blocks import block_of, parse_block_weights
from lyco.tools.convert import SD_LAYOUT, ModuleId, convert_file
from lyco.tools.merge import bake_adapters, merge_adapters
from tiny_models import clone_parts, model_outputs, randomize, structure_of, tiny_sd1, tiny_sdxl

MIX = [
    (dict(algo="lora", rank=4, alpha=3.0, conv_rank=2), 0.8),
    (dict(algo="loha", rank=3, alpha=5.0, conv_rank=2), -0.6),
    (dict(algo="lokr", rank=2, alpha=1.5, factor=4, conv_rank=2), 1.3),
    (dict(algo="lora", rank=2, alpha=1.0, dora=True, dora_axis="output"), 0.5),
]


def make_adapter(parts, path, *, seed, preset="full", **config):
    network = LycoNetwork.create(parts, NetworkConfig(preset=preset, **config))
    randomize(network.parameters(), std=0.1, seed=seed)
    if config.get("dora"):
        for layer in network.layers.values():  # magnitudes away from ||W|| so that DoRA matters
            layer.dora_scale.data.mul_(1.3)
    save_network(network, path)
    network.remove()
    return path


def stack_outputs(parts, adapters):
    """Outputs of the unfused stack: every adapter attached with load_network at its strength."""
    networks = []
    for path, strength in adapters:
        network = load_network(parts, path).network
        for part in parts:
            network.set_strength(strength.get(part, 1.0) if isinstance(strength, dict) else strength, part=part)
        networks.append(network)
    try:
        return model_outputs(parts)
    finally:
        for network in reversed(networks):
            network.remove()


def assert_close(actual, expected, *, rtol=1e-4, atol=2e-5):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family_mix(request, tmp_path_factory):
    parts = tiny_sd1() if request.param == "sd1" else tiny_sdxl()
    folder = tmp_path_factory.mktemp(request.param)
    adapters = [(make_adapter(parts, folder / f"a{i}.safetensors", seed=i, **config), strength) for i, (config, strength) in enumerate(MIX)]
    return request.param, parts, adapters


def test_baked_model_equals_the_unfused_stack(family_mix):
    family, parts, adapters = family_mix
    expected = stack_outputs(parts, adapters)
    baked = clone_parts(parts)
    structure = structure_of(baked)
    report = bake_adapters(baked, adapters)
    assert report.family == family and report.layers_changed > 0
    assert structure_of(baked) == structure  # every module object back in place, no wrapper left
    assert not any(isinstance(m, LycoLayer) for part in baked.values() for m in part.modules())
    assert_close(model_outputs(baked), expected)
    assert any(not torch.allclose(model_outputs(parts)[k], expected[k], atol=1e-3) for k in expected)


def test_svd_merge_at_full_rank_equals_the_stack_and_needs_the_base_for_dora(family_mix, tmp_path):
    _, parts, adapters = family_mix
    with pytest.raises(ValueError, match="DoRA"):
        merge_adapters(adapters, mode="svd", rank=1000)
    result = merge_adapters(adapters, mode="svd", rank=1000, base=parts)
    merged = write_adapter(tmp_path / "merged.safetensors", result.tensors, result.metadata)
    assert {e.algo for e in load_adapter_file(merged).modules.values()} == {"lora"}
    assert_close(stack_outputs(parts, [(merged, 1.0)]), stack_outputs(parts, adapters))


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd1()


def test_concat_merge_of_loras_is_exact(sd1, tmp_path):
    a = make_adapter(sd1, tmp_path / "a.safetensors", seed=1, algo="lora", rank=4, alpha=3.0, conv_rank=2)
    b = make_adapter(sd1, tmp_path / "b.safetensors", seed=2, algo="lora", rank=6, alpha=1.0, conv_rank=3)
    adapters = [(a, 0.7), (b, {"unet": -1.2, "text_encoder": 0.4})]
    result = merge_adapters(adapters, mode="concat")
    merged = write_adapter(tmp_path / "ab.safetensors", result.tensors, result.metadata)
    entries = load_adapter_file(merged).modules
    sources = [load_adapter_file(a).modules, load_adapter_file(b).modules]
    for key, entry in entries.items():
        assert entry.alpha == entry.rank  # scale 1: strengths and alpha/rank are folded into the up factors
        expected = 0.7 * _scaled(sources[0][key]) + (-1.2 if key.startswith("lora_unet") else 0.4) * _scaled(sources[1][key])
        torch.testing.assert_close(_scaled(entry), expected, rtol=1e-5, atol=1e-6)
    assert all(layer.rank in (10, 5) for layer in result.layers)
    assert_close(stack_outputs(sd1, [(merged, 1.0)]), stack_outputs(sd1, adapters), rtol=1e-5, atol=1e-6)
    assert entries[next(k for k in entries if "conv1" in k)].tensors["lora_down.weight"].shape[2:] == (3, 3)


def _scaled(entry):
    up, down = entry.tensors["lora_up.weight"].float().flatten(1), entry.tensors["lora_down.weight"].float().flatten(1)
    return entry.scale * up @ down


def test_concat_matches_modules_across_key_styles_and_refuses_other_algorithms(sd1, tmp_path):
    a = make_adapter(sd1, tmp_path / "a.safetensors", seed=1, algo="lora", rank=4, alpha=3.0)
    peft = convert_file(a, tmp_path / "a_peft.safetensors", to="diffusers", alpha="metadata")
    result = merge_adapters([(a, 0.5), (tmp_path / "a_peft.safetensors", 0.5)], mode="concat")
    assert len(result.layers) == len(load_adapter_file(a).modules) == len(peft.tensors) // 2
    assert all(layer.sources == 2 and layer.rank == 8 for layer in result.layers)
    merged = write_adapter(tmp_path / "m.safetensors", result.tensors, result.metadata)
    assert_close(stack_outputs(sd1, [(merged, 1.0)]), stack_outputs(sd1, [(a, 1.0)]), rtol=1e-5, atol=1e-6)
    loha = make_adapter(sd1, tmp_path / "h.safetensors", seed=3, algo="loha", rank=2)
    with pytest.raises(ValueError, match="mode='svd'"):
        merge_adapters([(a, 1.0), (loha, 1.0)], mode="concat")


def test_svd_merge_to_lower_rank_is_the_truncated_optimum_of_the_sum(sd1, tmp_path):
    a = make_adapter(sd1, tmp_path / "a.safetensors", seed=1, algo="lora", rank=4, alpha=3.0, preset="attn-mlp")
    h = make_adapter(sd1, tmp_path / "h.safetensors", seed=2, algo="loha", rank=3, alpha=2.0, preset="attn-mlp")
    full = merge_adapters([(a, 0.8), (h, 0.6)], mode="svd", rank=1000)
    low = merge_adapters([(a, 0.8), (h, 0.6)], mode="svd", rank=3)
    full_entries = _entries(full)
    for key, entry in _entries(low).items():
        target = _scaled(full_entries[key]).double()
        u, s, vh = torch.linalg.svd(target)
        optimum = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(_scaled(entry).double(), optimum, rtol=1e-4, atol=1e-5)
    assert max(layer.rank for layer in low.layers) == 3 and min(layer.fro_retained for layer in low.layers) < 1


def _entries(result):
    from lyco.format import parse_adapter

    return parse_adapter(result.tensors).modules


def test_block_weights():
    assert block_of(ModuleId("unet", "down_blocks.1.attentions.0.proj_in"), SD_LAYOUT) == "IN04"
    assert block_of(ModuleId("unet", "mid_block.resnets.1.conv1"), SD_LAYOUT) == "M00"
    assert block_of(ModuleId("unet", "up_blocks.3.attentions.2.proj_out"), SD_LAYOUT) == "OUT11"
    assert block_of(ModuleId("unet", "conv_in"), SD_LAYOUT) == "IN00"
    assert block_of(ModuleId("unet", "time_embedding.linear_1"), SD_LAYOUT) is None
    assert block_of(ModuleId("text_encoder", "text_model.encoder.layers.0.mlp.fc1"), SD_LAYOUT) == "BASE"
    vector = parse_block_weights(",".join(["0.5"] + ["1"] * 16), family="sd1")
    assert vector.blocks["BASE"] == 0.5 and vector.blocks["IN04"] == 1 and vector.unnamed == 0  # lbw: unnamed blocks get 0
    mapping = parse_block_weights("BASE=0,IN04=0.25,attn2=2")
    module = ModuleId("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    assert mapping.weight(module, "k", family="sd1") == 2 and mapping.weight(ModuleId("unet", "conv_in"), "k", family="sd1") == 1
    with pytest.raises(ValueError, match="SDXL"):
        parse_block_weights([1.0] * 12, family="sd1")


def test_block_weights_scale_parts_when_baking(sd1, tmp_path):
    a = make_adapter(sd1, tmp_path / "a.safetensors", seed=1, algo="lora", rank=4, alpha=3.0)
    baked = clone_parts(sd1)
    bake_adapters(baked, [(a, 0.9)], block_weights={"BASE": 0.0})
    expected = stack_outputs(sd1, [(a, {"unet": 0.9, "text_encoder": 0.0})])
    assert_close(model_outputs(baked), expected)


# ----- command line and saved checkpoints (builtin tiny models through pipelines.models) -------------


@torch.no_grad()
def pipeline_outputs(parts):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 600, (2, 7), generator=gen)
    hidden = parts["text_encoder"](ids).last_hidden_state
    config = parts["unet"].config
    sample = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    return {"text_encoder": hidden, "unet": parts["unet"](sample, torch.tensor([10, 700]), hidden).sample}


@pytest.fixture(scope="module")
def tiny_sd_pipe():
    from pipelines.models import load_pipeline

    return load_pipeline("builtin:tiny-sd")


def test_cli_bakes_into_a_single_file_and_a_diffusers_folder(tiny_sd_pipe, tmp_path, capsys):
    from pipelines.models import load_pipeline
    from pipelines.tools_cli import merge_main, pipeline_parts

    parts = pipeline_parts(tiny_sd_pipe)
    a = make_adapter(parts, tmp_path / "a.safetensors", seed=1, algo="lora", rank=4, alpha=3.0, conv_rank=2)
    h = make_adapter(parts, tmp_path / "h.safetensors", seed=2, algo="loha", rank=2, alpha=1.0, preset="attn-mlp")
    strengths = [(a, 0.8), (h, {"unet": -0.5, "text_encoder": 0.3})]
    networks = []
    for path, strength in strengths:
        network = load_network(parts, path).network
        for part in parts:
            network.set_strength(strength.get(part) if isinstance(strength, dict) else strength, part=part)
        networks.append(network)
    expected = pipeline_outputs(parts)
    for network in reversed(networks):
        network.remove()
    args = [f"{a}:0.8", f"{h}:-0.5:0.3", "--base", "builtin:tiny-sd", "--no-progress"]
    single = tmp_path / "baked.safetensors"
    assert merge_main(args + ["-o", str(single)]) == 0
    reloaded = pipeline_parts(load_pipeline(single, config_dir="builtin:tiny-sd"))
    assert_close(pipeline_outputs(reloaded), expected)
    from safetensors import safe_open

    with safe_open(str(single), "pt") as handle:
        history = json.loads(handle.metadata()["lyco_history"])
    assert history[0]["mode"] == "bake" and history[0]["strengths"][1] == {"unet": -0.5, "text_encoder": 0.3, "text_encoder_2": 0.3}
    folder = tmp_path / "baked"
    assert merge_main(args + ["-o", str(folder)]) == 0
    assert_close(pipeline_outputs(pipeline_parts(load_pipeline(folder))), expected)
    assert (folder / "lyco_history.json").is_file()
    assert merge_main(args + ["-o", str(folder)]) == 1 and "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "baked", "baked.safetensors", "h.safetensors"]


def test_cli_merges_adapters_into_one(sd1, tmp_path):
    from pipelines.tools_cli import merge_main

    a = make_adapter(sd1, tmp_path / "a.safetensors", seed=1, algo="lora", rank=4, alpha=3.0)
    b = make_adapter(sd1, tmp_path / "b.safetensors", seed=2, algo="lokr", rank=2, factor=4, preset="attn-mlp")
    out = tmp_path / "ab.safetensors"
    assert merge_main([str(a), f"{b}:0.5", "--mode", "svd", "--rank", "1000", "-o", str(out), "--no-progress"]) == 0
    merged = load_adapter_file(out)
    assert merged.metadata["modelspec.title"] == "ab" and json.loads(merged.metadata["lyco_history"])[-1]["mode"] == "svd"
    assert_close(stack_outputs(sd1, [(out, 1.0)]), stack_outputs(sd1, [(a, 1.0), (b, 0.5)]))


def test_single_file_openclip_layout_round_trips_through_diffusers(tmp_path):
    """SD2: the text encoder is written in OpenCLIP form (q/k/v stacked) and read back by from_single_file."""
    from pipelines.models import describe_pipeline, load_pipeline
    from safetensors.torch import save_file

    from lyco.naming import UNetLayout
    from lyco.tools.checkpoint import single_file_state_dict

    pipe = load_pipeline("builtin:tiny-sd2")
    components = {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}
    tensors = single_file_state_dict(components, family=describe_pipeline(pipe).family, layout=UNetLayout.from_unet(pipe.unet))
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") for k in tensors)
    save_file(tensors, str(tmp_path / "sd2.safetensors"))
    reloaded = load_pipeline(tmp_path / "sd2.safetensors", config_dir="builtin:tiny-sd2")
    for name, state in components.items():
        again = getattr(reloaded, name).state_dict()
        assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state), name


def test_single_file_sdxl_layout_matches_the_diffusers_converters():
    """SDXL UNet and bigG text encoder: diffusers' own single-file converters give back every tensor."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    from lyco.naming import UNetLayout
    from lyco.tools.checkpoint import single_file_state_dict

    parts = tiny_sdxl()
    components = {name: module.state_dict() for name, module in parts.items()}
    tensors = single_file_state_dict(components, family="sdxl", layout=UNetLayout.from_unet(parts["unet"]))
    unet = convert_ldm_unet_checkpoint(tensors, dict(parts["unet"].config))
    assert unet.keys() == components["unet"].keys()
    assert all(torch.equal(unet[k], components["unet"][k]) for k in unet)
    te2 = convert_open_clip_checkpoint(parts["text_encoder_2"], tensors, prefix="conditioner.embedders.1.model.")
    expected = components["text_encoder_2"]
    assert te2.keys() == {k for k in expected if not k.endswith("position_ids")}
    assert all(torch.equal(te2[k], expected[k]) for k in te2)
    assert tensors["conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] is not None


def test_merging_an_inner_network_keeps_a_stacked_dora_network_unchanged(sd1):
    parts = clone_parts(sd1)
    inner = LycoNetwork.create(parts, NetworkConfig(rank=4))
    randomize(inner.parameters(), std=0.2, seed=1)
    outer = LycoNetwork.create(parts, NetworkConfig(rank=2, dora=True, dora_axis="output"))
    randomize(outer.parameters(), std=0.2, seed=2)
    unfused = model_outputs(parts)
    inner.merge()
    try:
        assert_close(model_outputs(parts), unfused)
    finally:
        inner.unmerge()
        outer.remove()
        inner.remove()
