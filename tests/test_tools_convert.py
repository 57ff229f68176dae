"""lyco-convert: key parsing over the real SD architectures, kohya -> diffusers loads in
`pipe.load_lora_weights` with identical outputs, lossless round trips, precision, pickles."""
from __future__ import annotations

import json

import pytest
import torch

from lyco import LycoNetwork, NetworkConfig, load_network, naming, save_network
from lyco.format import AdapterFileError, load_adapter_file, parse_adapter, read_tensors
from lyco.tools.convert import (
    SD_LAYOUT, SDXL_LAYOUT, ModuleId, convert_adapter, convert_file, kohya_key, main, parse_module_key, split_underscored,
)
from sd_configs import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SD15_UNET, SDXL_UNET, meta_text_encoder, meta_unet
from tiny_models import randomize, tiny_sdxl


# ----- key parsing without a model --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_real_module_key_parses_back_to_its_module(family):
    if family == "sd1":
        parts = {"unet": meta_unet(SD15_UNET), "text_encoder": meta_text_encoder(CLIP_L_TEXT)}
    else:
        parts = {"unet": meta_unet(SDXL_UNET), "text_encoder": meta_text_encoder(CLIP_L_TEXT),
                 "text_encoder_2": meta_text_encoder(OPENCLIP_BIGG_TEXT, with_projection=True)}
    layout = SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT
    assert naming.UNetLayout.from_unet(parts["unet"]) == layout
    checked = 0
    for part, root in parts.items():
        for path, _ in naming.adaptable_modules(root):
            expected = ModuleId(part, naming.canonical_text_encoder_path(path) if part != "unet" else path)
            written = naming.file_key(part, path, family=family, layout=layout)
            assert parse_module_key(written, family=family) == expected, written
            assert kohya_key(expected, family=family) == written
            assert parse_module_key(f"{part}.{path}", family=family) == expected
            if part == "unet":
                assert parse_module_key(naming.module_key("lora_unet", path), family=family) == expected
                assert parse_module_key(naming.module_key("lycoris", path), family=family) == expected
            checked += 1
    assert checked > (700 if family == "sdxl" else 300)


def test_split_underscored_and_unknown_keys():
    assert split_underscored("down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj") == "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert split_underscored("text_model_encoder_layers_11_self_attn_out_proj") == "text_model.encoder.layers.11.self_attn.out_proj"
    assert parse_module_key("bundle_emb") is None
    assert parse_module_key("lora_te2_text_model_encoder_layers_0_mlp_fc1") == ModuleId("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")


# ----- adapters on the builtin tiny models and diffusers' own loader ------------------------------------


def make_network_file(parts, path, *, family, seed=0, **config):
    network = LycoNetwork.create(parts, NetworkConfig(**config), family=family)
    randomize(network.parameters(), std=0.1, seed=seed)
    for index, layer in enumerate(network.layers.values()):  # several alphas: exercises alpha_pattern
        layer.alpha.fill_(1.5 if index % 3 else 5.0)
    save_network(network, path)
    network.remove()
    return path


@torch.no_grad()
def outputs(pipe):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 600, (1, 7), generator=gen)
    hidden = pipe.text_encoder(ids).last_hidden_state
    kwargs = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        second = pipe.text_encoder_2(ids)
        kwargs["added_cond_kwargs"] = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        hidden = torch.cat([hidden, second.last_hidden_state], dim=-1)
    config = pipe.unet.config
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    return {"text": hidden, "unet": pipe.unet(sample, torch.tensor([500]), hidden, **kwargs).sample}


def parts_of(pipe):
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


def lyco_outputs(pipe, path):
    loaded = load_network(parts_of(pipe), path)
    try:
        return outputs(pipe)
    finally:
        loaded.network.remove()


def diffusers_outputs(pipe, path):
    pipe.load_lora_weights(str(path), adapter_name="converted")
    try:
        return outputs(pipe)
    finally:
        pipe.unload_lora_weights()  # back to plain nn.Linear / nn.Conv2d modules


@pytest.mark.parametrize("model, family, modes", [("tiny-sd", "sd1", ("fold", "metadata")), ("tiny-sdxl", "sdxl", ("metadata",))])
def test_kohya_to_diffusers_loads_in_diffusers_with_identical_outputs(model, family, modes, tmp_path):
    from pipelines.models import load_pipeline

    pipe = load_pipeline(f"builtin:{model}")
    source = make_network_file(parts_of(pipe), tmp_path / "kohya.safetensors", family=family, rank=4, conv_rank=2)
    expected = lyco_outputs(pipe, source)
    base = outputs(pipe)
    assert not torch.allclose(expected["unet"], base["unet"], atol=1e-3)
    for mode in modes:
        target = tmp_path / f"diffusers_{mode}.safetensors"
        assert main([str(source), str(target), "--to", "diffusers", "--alpha", mode]) == 0
        keys = set(read_tensors(target)[0])
        assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) and ".lora_" in k for k in keys)
        for name, value in diffusers_outputs(pipe, target).items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=2e-5)
        for name, value in lyco_outputs(pipe, target).items():  # and lyco reads its own output back
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=2e-5)
        assert torch.equal(outputs(pipe)["unet"], base["unet"])


def test_round_trips_are_lossless(tmp_path):
    parts = tiny_sdxl()
    source = make_network_file(parts, tmp_path / "sgm.safetensors", family="sdxl", rank=4, conv_rank=2)
    original, _ = read_tensors(source)
    assert any(k.startswith("lora_unet_input_blocks_") for k in original)
    # kohya -> diffusers/PEFT (alpha recorded in lora_adapter_metadata) -> kohya: bit-exact
    convert_file(source, tmp_path / "peft.safetensors", to="diffusers", alpha="metadata")
    convert_file(tmp_path / "peft.safetensors", tmp_path / "back.safetensors", to="kohya")
    back, metadata = read_tensors(tmp_path / "back.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    # SDXL SGM names -> diffusers names -> SGM names: bit-exact, and the diffusers-named file loads the same
    convert_file(source, tmp_path / "dn.safetensors", to="kohya", unet_naming="diffusers")
    dn, _ = read_tensors(tmp_path / "dn.safetensors")
    assert any(k.startswith("lora_unet_down_blocks_") for k in dn) and not any("input_blocks" in k for k in dn)
    convert_file(tmp_path / "dn.safetensors", tmp_path / "sgm2.safetensors", to="kohya", family="sdxl")
    again, _ = read_tensors(tmp_path / "sgm2.safetensors")
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
    first, second = (load_network(parts, p).network for p in (source, tmp_path / "dn.safetensors"))
    try:
        for key, layer in first.layers.items():
            torch.testing.assert_close(second.layers[key].contribution(), layer.contribution(), rtol=0, atol=0)
    finally:
        second.remove()
        first.remove()
    history = json.loads(metadata["lyco_history"])
    assert [h["to"] for h in history] == ["diffusers", "kohya"]


def test_fold_mode_keeps_every_delta(tmp_path):
    parts = tiny_sdxl()
    source = make_network_file(parts, tmp_path / "k.safetensors", family="sdxl", rank=3)
    folded = convert_adapter(load_adapter_file(source), to="diffusers")
    assert "lora_adapter_metadata" not in folded.metadata
    back = parse_adapter(convert_adapter(parse_adapter(folded.tensors), to="kohya", family="sdxl").tensors).modules
    for key, entry in load_adapter_file(source).modules.items():
        expected = entry.scale * entry.tensors["lora_up.weight"] @ entry.tensors["lora_down.weight"]
        got = back[key].scale * back[key].tensors["lora_up.weight"] @ back[key].tensors["lora_down.weight"]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        assert back[key].alpha == back[key].rank


def test_precision_casts_every_float_tensor_including_alpha(tmp_path):
    parts = tiny_sdxl()
    source = make_network_file(parts, tmp_path / "k.safetensors", family="sdxl", rank=3)
    convert_file(source, tmp_path / "half.safetensors", precision="fp16")
    half, _ = read_tensors(tmp_path / "half.safetensors")
    assert {v.dtype for v in half.values()} == {torch.float16}
    convert_file(tmp_path / "half.safetensors", tmp_path / "full.safetensors", precision="fp32")
    convert_file(tmp_path / "full.safetensors", tmp_path / "half2.safetensors", precision="bf16")
    convert_file(tmp_path / "full.safetensors", tmp_path / "half3.safetensors", precision="fp16")
    again, metadata = read_tensors(tmp_path / "half3.safetensors")
    assert all(torch.equal(again[k], half[k]) for k in half)  # fp16 -> fp32 -> fp16 is exact
    assert {v.dtype for v in read_tensors(tmp_path / "half2.safetensors")[0].values()} == {torch.bfloat16}
    assert [h.get("precision") for h in json.loads(metadata["lyco_history"])] == ["fp16", "fp32", "fp16"]


def test_pickles_need_the_flag_and_are_read_weights_only(tmp_path, capsys):
    tensors = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(16, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    torch.save(tensors, tmp_path / "old.pt")
    out = tmp_path / "new.safetensors"
    assert main([str(tmp_path / "old.pt"), str(out)]) == 1
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main([str(tmp_path / "old.pt"), str(out), "--allow-pickle"]) == 0
    converted, metadata = read_tensors(out)
    assert all(torch.equal(converted[k], v) for k, v in tensors.items())
    assert json.loads(metadata["lyco_history"])[-1]["from_pickle"] is True
    torch.save({"state_dict": tensors, "hook": Exploit()}, tmp_path / "evil.ckpt")
    assert main([str(tmp_path / "evil.ckpt"), str(tmp_path / "evil.safetensors"), "--allow-pickle"]) == 1
    assert "weights-only" in capsys.readouterr().err
    assert main([str(tmp_path / "old.pt"), str(out), "--allow-pickle"]) == 1  # exists, no --overwrite


class Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_diffusers_target_refuses_what_diffusers_cannot_load(tmp_path):
    parts = tiny_sdxl()
    loha, _ = read_tensors(make_network_file(parts, tmp_path / "h.safetensors", family="sdxl", algo="loha", rank=2))
    lora, _ = read_tensors(make_network_file(parts, tmp_path / "l.safetensors", family="sdxl", rank=2))
    mixed = {**{k: v for k, v in loha.items() if k.startswith("lora_unet")}, **{k: v for k, v in lora.items() if k.startswith("lora_te")}}
    with pytest.raises(AdapterFileError, match="loha has no diffusers/PEFT form"):
        convert_adapter(mixed, to="diffusers")
    dropped = convert_adapter(mixed, to="diffusers", strict=False)
    assert set(dropped.skipped) == {k for k in mixed if k.startswith("lora_unet")}
    assert dropped.tensors and all(k.startswith("text_encoder") for k in dropped.tensors)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_converts_on_the_output_axis_only(tmp_path, axis):
    parts = tiny_sdxl()
    network = LycoNetwork.create(parts, NetworkConfig(rank=2, dora=True, dora_axis=axis, conv_rank=2, preset="full"), family="sdxl")
    randomize(network.parameters(), std=0.1)
    source = save_network(network, tmp_path / "dora.safetensors")
    network.remove()
    if axis == "input":
        with pytest.raises(AdapterFileError, match="input-axis DoRA"):
            convert_adapter(load_adapter_file(source), to="diffusers")
        return
    peft = convert_file(source, tmp_path / "peft.safetensors", to="diffusers")
    magnitudes = {k: v.shape for k, v in peft.tensors.items() if k.endswith("lora_magnitude_vector")}
    assert magnitudes and all(len(s) in (1, 4) for s in magnitudes.values())
    first, second = (load_network(parts, p).network for p in (source, tmp_path / "peft.safetensors"))
    try:
        for key, layer in first.layers.items():
            torch.testing.assert_close(second.layers[key].contribution(), layer.contribution(), rtol=1e-5, atol=1e-6)
    finally:
        second.remove()
        first.remove()
