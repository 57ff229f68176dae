"""lyco-resize: lossless at full rank, the truncated-SVD optimum below it, effective scale kept."""
from __future__ import annotations

import json

import pytest
import torch

from lyco import LycoNetwork, NetworkConfig, load_network, save_network
from lyco.format import load_adapter_file, parse_adapter
from lyco.format.hashes import file_model_hash
from lyco.tools._common import write_adapter
from lyco.tools.resize import main, model_layer_shapes, resize_adapter
from tiny_models import clone_parts, model_outputs, randomize, tiny_sd1

KEY = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV_KEY = "lora_unet_down_blocks_0_resnets_0_conv1"


def lora_file(*, rank=6, alpha=3.0, seed=0, spectrum=None):
    """A Linear (24 -> 20) and a 3x3 conv (8 -> 16) LoRA module with alpha != rank."""
    gen = torch.Generator().manual_seed(seed)
    if spectrum is None:
        up, down = torch.randn(20, rank, generator=gen), torch.randn(rank, 24, generator=gen)
    else:
        u, _ = torch.linalg.qr(torch.randn(20, len(spectrum), generator=gen))
        v, _ = torch.linalg.qr(torch.randn(24, len(spectrum), generator=gen))
        up, down, rank = u * torch.tensor(spectrum), v.t().contiguous(), len(spectrum)
    tensors = {
        f"{KEY}.lora_up.weight": up, f"{KEY}.lora_down.weight": down, f"{KEY}.alpha": torch.tensor(alpha),
        f"{CONV_KEY}.lora_up.weight": torch.randn(16, 4, 1, 1, generator=gen),
        f"{CONV_KEY}.lora_down.weight": torch.randn(4, 8, 3, 3, generator=gen), f"{CONV_KEY}.alpha": torch.tensor(2.0),
    }
    return parse_adapter(tensors, {"ss_network_dim": str(rank), "ss_training_comment": "trained"})


def scaled_delta(adapter, key):
    entry = adapter.modules[key]
    up, down = entry.tensors["lora_up.weight"].flatten(1), entry.tensors["lora_down.weight"].flatten(1)
    return entry.scale * (up @ down)


def test_full_rank_is_lossless_and_keeps_the_scale():
    adapter = lora_file()
    result = resize_adapter(adapter, rank=64)
    out = parse_adapter(result.tensors)
    for key in (KEY, CONV_KEY):
        torch.testing.assert_close(scaled_delta(out, key), scaled_delta(adapter, key), rtol=1e-5, atol=1e-5)
        assert out.modules[key].scale == pytest.approx(adapter.modules[key].scale)
    assert result.tensors[f"{CONV_KEY}.lora_down.weight"].shape == (4, 8, 3, 3)
    assert result.tensors[f"{CONV_KEY}.lora_up.weight"].shape == (16, 4, 1, 1)
    assert all(layer.fro_retained == pytest.approx(1.0) for layer in result.layers)


def test_lower_rank_is_the_truncated_svd_optimum():
    adapter = lora_file(rank=6)
    result = resize_adapter(adapter, rank=3, conv_rank=2)
    out = parse_adapter(result.tensors)
    for key, rank in ((KEY, 3), (CONV_KEY, 2)):
        target = scaled_delta(adapter, key)
        u, s, vh = torch.linalg.svd(target.double())
        optimum = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(scaled_delta(out, key).double(), optimum, rtol=1e-4, atol=1e-4)
        assert out.modules[key].rank == rank
        assert out.modules[key].scale == pytest.approx(adapter.modules[key].scale)  # alpha = old scale * new rank
        layer = next(r for r in result.layers if r.key == key)
        assert layer.fro_retained == pytest.approx(float(s[:rank].norm() / s.norm()), rel=1e-4)


@pytest.mark.parametrize("method, param, expected", [("sv_ratio", 4.0, 3), ("sv_fro", 0.99, 3), ("sv_cumulative", 0.5, 1)])
def test_dynamic_resize_picks_ranks_from_the_spectrum(method, param, expected):
    adapter = lora_file(spectrum=[8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    result = resize_adapter(adapter, rank=16, method=method, param=param)
    assert parse_adapter(result.tensors).modules[KEY].rank == expected
    assert result.metadata["ss_network_dim"] == "Dynamic"


def test_dora_scale_is_kept():
    adapter = lora_file()
    tensors = {f"{k}.{s}": t for k, e in adapter.modules.items() for s, t in e.tensors.items()}
    tensors[f"{KEY}.alpha"] = torch.tensor(3.0)
    tensors[f"{KEY}.dora_scale"] = torch.rand(1, 24) + 0.5
    result = resize_adapter(parse_adapter(tensors), rank=2)
    torch.testing.assert_close(result.tensors[f"{KEY}.dora_scale"], tensors[f"{KEY}.dora_scale"])


def test_layer_shapes_are_inferred_from_tensors_and_sd_names():
    from lyco.tools._common import infer_weight_shape

    gen = torch.Generator().manual_seed(0)
    loha = {f"{k}.{s}": torch.randn(*shape, generator=gen) for k, shape_map in {
        "lora_unet_down_blocks_0_resnets_0_conv1": {"hada_w1_a": (16, 2), "hada_w1_b": (2, 72), "hada_w2_a": (16, 2), "hada_w2_b": (2, 72)},
        "lora_unet_down_blocks_0_resnets_0_conv_shortcut": {"hada_w1_a": (16, 2), "hada_w1_b": (2, 8), "hada_w2_a": (16, 2), "hada_w2_b": (2, 8)},
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj": {"hada_w1_a": (16, 2), "hada_w1_b": (2, 72), "hada_w2_a": (16, 2), "hada_w2_b": (2, 72)},
        "lora_unet_input_blocks_1_0_in_layers_2": {"lokr_w1": (4, 4), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 18)},
    }.items() for s, shape in shape_map.items()}
    modules = parse_adapter(loha).modules
    assert infer_weight_shape(modules["lora_unet_down_blocks_0_resnets_0_conv1"]) == (16, 8, 3, 3)
    assert infer_weight_shape(modules["lora_unet_down_blocks_0_resnets_0_conv_shortcut"]) == (16, 8, 1, 1)
    assert infer_weight_shape(modules["lora_unet_down_blocks_0_resnets_0_time_emb_proj"]) == (16, 72)
    assert infer_weight_shape(modules["lora_unet_input_blocks_1_0_in_layers_2"]) == (16, 8, 3, 3)


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd1()


@pytest.mark.parametrize("algo, options", [("loha", {}), ("lokr", {"factor": 4}), ("lora", {"use_tucker": True})])
def test_any_algorithm_becomes_an_equivalent_lora_at_full_rank(sd1, tmp_path, algo, options):
    parts = clone_parts(sd1)
    network = LycoNetwork.create(parts, NetworkConfig(algo=algo, rank=4, alpha=2.5, conv_rank=2, preset="full", **options))
    randomize(network.parameters(), std=0.1)
    source = save_network(network, tmp_path / "in.safetensors")
    network.remove()
    adapter = load_adapter_file(source)
    result = resize_adapter(adapter, rank=10_000, shapes=model_layer_shapes(parts))
    target = write_adapter(tmp_path / "out.safetensors", result.tensors, result.metadata)
    # SD1's proj_in is a 1x1 conv: the LoCon layout is 4-D whatever the source algorithm stored
    assert result.tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4
    expected = _outputs_with(parts, source, strength=0.7)
    actual = _outputs_with(parts, target, strength=0.7)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=2e-5)
    assert {e.algo for e in load_adapter_file(target).modules.values()} == {"lora"}
    assert result.metadata["ss_network_module"] == "networks.lora"


def _outputs_with(parts, path, *, strength):
    loaded = load_network(parts, path, strength=strength)  # strict: every module must fit the model
    try:
        return model_outputs(parts)
    finally:
        loaded.network.remove()


def test_cli_writes_atomically_records_history_and_refuses_to_overwrite(tmp_path, capsys):
    adapter = lora_file()
    source = tmp_path / "in.safetensors"
    tensors = {f"{k}.{s}": t for k, e in adapter.modules.items() for s, t in e.tensors.items()}
    tensors.update({f"{k}.alpha": torch.tensor(e.alpha) for k, e in adapter.modules.items()})
    write_adapter(source, tensors, adapter.metadata)
    target = tmp_path / "out.safetensors"
    assert main([str(source), str(target), "--rank", "2", "--precision", "fp16", "--verbose", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert KEY in printed and "Frobenius norm retained" in printed
    written = load_adapter_file(target)
    assert {t.dtype for e in written.modules.values() for t in e.tensors.values()} == {torch.float16}
    history = json.loads(written.metadata["lyco_history"])
    assert history[-1]["tool"] == "resize" and history[-1]["rank"] == 2
    assert written.metadata["ss_network_dim"] == "2"
    assert written.metadata["ss_training_comment"].endswith("; trained")
    assert written.metadata["sshs_model_hash"] == file_model_hash(str(target))
    before = target.read_bytes()
    assert main([str(source), str(target), "--rank", "3", "--no-progress"]) == 1
    assert target.read_bytes() == before
    assert "already exists" in capsys.readouterr().err
    assert main([str(source), str(target), "--rank", "3", "--no-progress", "--overwrite"]) == 0
    assert load_adapter_file(target).modules[KEY].rank == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
