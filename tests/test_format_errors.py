"""Every bad input gives a clear error naming the file and the offending keys, before the model is
touched; non-strict loading takes what fits and reports the rest; pickles only when allowed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lyco import AdapterFileError, LycoNetwork, NetworkConfig, load_adapter_file, load_network, save_network
from sd_configs import CLIP_L_TEXT, SD15_UNET, meta_text_encoder, meta_unet
from tiny_models import model_outputs, randomize, same_state, state_of, structure_of, tiny_sd1

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "sdscripts_lora_keys.json").read_text())


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid LoRA/LoCon file for tiny_sd1(), its tensors, and the outputs it produces."""
    parts = tiny_sd1()
    network = LycoNetwork.create(parts, NetworkConfig(rank=4, alpha=2, conv_rank=2))
    randomize(network.parameters(), std=0.2)
    outputs = model_outputs(parts)
    path = save_network(network, tmp_path_factory.mktemp("good") / "good.safetensors")
    tensors = network.adapter_state_dict()
    network.remove()
    return {"path": path, "tensors": tensors, "outputs": outputs}


@pytest.fixture()
def parts():
    model = tiny_sd1()
    yield model


def _write(path: Path, tensors, metadata=None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _assert_untouched(parts, state, structure):
    assert structure_of(parts) == structure, "modules were swapped although loading failed"
    if any(p.is_meta for part in parts.values() for p in part.parameters()):
        return  # meta tensors hold no values to compare
    assert same_state(parts, state), "weights changed although loading failed"


def _strict_failure(parts, path, *needles):
    """Strict load fails with all needles (and the file name) in the message; the model is unchanged."""
    state, structure = state_of(parts), structure_of(parts)
    before = Path(path).read_bytes() if Path(path).exists() else None
    with pytest.raises(AdapterFileError) as info:
        load_network(parts, path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in error:\n{message}"
    _assert_untouched(parts, state, structure)
    if before is not None:
        assert Path(path).read_bytes() == before
    return message


# ----- keys that fit nothing -----------------------------------------------------------------------


def test_unknown_module_keys(parts, good, tmp_path):
    bogus = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = dict(good["tensors"])
    tensors.update({f"{bogus}.lora_down.weight": torch.zeros(4, 32), f"{bogus}.lora_up.weight": torch.zeros(32, 4), f"{bogus}.alpha": torch.tensor(4.0)})
    path = _write(tmp_path / "unknown.safetensors", tensors)
    message = _strict_failure(parts, path, bogus, "match nothing", "strict=False")
    assert "1 modules match nothing" in message

    result = load_network(parts, path, strict=False)
    assert sorted(result.skipped_keys) == sorted(f"{bogus}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert any(bogus in problem for problem in result.problems)
    assert len(result.network) == len({k.split(".")[0] for k in good["tensors"]})
    got = model_outputs(parts)
    for name in got:
        torch.testing.assert_close(got[name], good["outputs"][name], rtol=1e-5, atol=1e-6)
    result.network.remove()


def test_shape_mismatch_names_key_and_shapes(parts, good, tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = dict(good["tensors"])
    tensors[f"{key}.lora_down.weight"] = torch.zeros(4, 48)  # the layer takes 32 features
    path = _write(tmp_path / "shape.safetensors", tensors)
    _strict_failure(parts, path, key, "(4, 48)", "(32, 32)")
    result = load_network(parts, path, strict=False)
    assert sorted(result.skipped_keys) == sorted(f"{key}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert key not in result.network.layers and len(result.network) > 0
    result.network.remove()


@pytest.fixture(scope="module")
def sd15_meta():
    return {"unet": meta_unet(SD15_UNET), "text_encoder": meta_text_encoder(CLIP_L_TEXT)}


def test_sdxl_file_on_sd15_model(sd15_meta, tmp_path):
    """Real SDXL key names and shapes (sd-scripts) against the real SD1.5 architecture (meta device)."""
    modules = [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",  # exists in SD1.5 too, but in = 2048 vs 768
        "lora_unet_input_blocks_7_1_transformer_blocks_5_attn1_to_q",  # SDXL has 10 blocks there, SD1.5 one
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",  # no second text encoder
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",  # CLIP-L: fits
    ]
    shapes = FIXTURE["sdxl_default"]
    tensors = {}
    for module in modules:
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            tensors[f"{module}.{suffix}"] = torch.full(shapes[f"{module}.{suffix}"], 0.01)
    path = _write(tmp_path / "sdxl-style.safetensors", tensors)
    message = _strict_failure(
        sd15_meta, path,
        modules[0], "(640, 768)", "2048", modules[1], modules[2], "looks like a sdxl adapter but the model is sd1",
    )
    assert modules[3] not in message
    result = load_network(sd15_meta, path, strict=False)
    try:
        assert [(result.network.slot(k).part, result.network.slot(k).path) for k in result.network.layers] == [
            ("text_encoder", "encoder.layers.0.self_attn.q_proj")]
        assert {k.split(".")[0] for k in result.skipped_keys} == set(modules[:3])
    finally:
        result.network.remove()


def test_same_module_named_twice(parts, tmp_path):
    """A kohya key and a PEFT key for the same layer: ambiguous, reported with both names."""
    base = parts["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight": torch.zeros(32, 2),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.lora_A.weight": torch.zeros(2, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.lora_B.weight": torch.zeros(32, 2),
    }
    path = _write(tmp_path / "twice.safetensors", tensors)
    _strict_failure(parts, path, "both name", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v",
                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v")
    assert parts["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v is base


def test_unsupported_adapter_forms(parts, good, tmp_path):
    """IA3, OFT, full diff and an incomplete LoRA: named in strict mode, skipped otherwise."""
    odd = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight": torch.ones(32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.on_input": torch.tensor(0),
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_2.oft_blocks": torch.zeros(4, 8, 8),
        "lora_unet_down_blocks_0_attentions_1_proj_out.diff": torch.zeros(32, 32, 1, 1),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": torch.zeros(2, 64),  # no lora_up
    }
    tensors = {k: v for k, v in good["tensors"].items() if not k.startswith(tuple(key.split(".")[0] for key in odd))}
    tensors.update(odd)
    path = _write(tmp_path / "odd.safetensors", tensors)
    with pytest.raises(AdapterFileError) as info:
        load_adapter_file(path)
    message = str(info.value)
    assert str(path) in message and "5 keys belong to no supported adapter form" in message
    assert all(key in message for key in odd)
    _strict_failure(parts, path, *odd)
    result = load_network(parts, path, strict=False)
    assert sorted(result.skipped_keys) == sorted(odd)
    assert len(result.network) == len({k.split(".")[0] for k in tensors} - {k.split(".")[0] for k in odd})
    result.network.remove()


def test_file_without_adapter_modules(parts, tmp_path):
    path = _write(tmp_path / "checkpoint.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)})
    with pytest.raises(AdapterFileError, match="contains no adapter modules"):
        load_adapter_file(path, strict=False)
    _strict_failure(parts, path, "no supported adapter form")


def test_non_strict_with_nothing_matching_still_fails(parts, tmp_path):
    tensors = {"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 8), "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 2)}
    path = _write(tmp_path / "nothing.safetensors", tensors)
    state, structure = state_of(parts), structure_of(parts)
    with pytest.raises(AdapterFileError, match="no module of the file matches this model"):
        load_network(parts, path, strict=False)
    _assert_untouched(parts, state, structure)


# ----- damaged values ------------------------------------------------------------------------------


def test_nan_and_inf_tensors(parts, good, tmp_path):
    tensors = dict(good["tensors"])
    nan_key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
    inf_key = "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"
    tensors[nan_key] = tensors[nan_key].clone()
    tensors[nan_key][0, 0] = float("nan")
    tensors[inf_key] = torch.tensor(float("inf"))
    path = _write(tmp_path / "nan.safetensors", tensors)
    _strict_failure(parts, path, "NaN or Inf", nan_key, inf_key)
    state, structure = state_of(parts), structure_of(parts)
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        load_network(parts, path, strict=False)  # damaged values are never "skipped"
    _assert_untouched(parts, state, structure)


# ----- damaged or foreign containers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, payload, needle",
    [
        ("text.safetensors", b"this is a text file, not tensors\n" * 4, "not a safetensors file"),
        ("empty.safetensors", b"", "not a safetensors file"),
        ("short.safetensors", b"\x01\x02", "not a safetensors file"),
        ("badjson.safetensors", (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\x00" * 16, "corrupt safetensors header"),
    ],
)
def test_not_safetensors(parts, tmp_path, name, payload, needle):
    path = tmp_path / name
    path.write_bytes(payload)
    _strict_failure(parts, path, needle)


def test_pickle_named_safetensors(parts, good, tmp_path):
    path = tmp_path / "pickled.safetensors"
    torch.save(good["tensors"], path)
    _strict_failure(parts, path, "not a safetensors file")


@pytest.mark.parametrize("keep", [0.6, 0.999])
def test_truncated_file(parts, good, tmp_path, keep):
    data = Path(good["path"]).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: int(len(data) * keep)])
    message = _strict_failure(parts, path, "truncated file", "download it again")
    assert "tensor '" in message  # names the first tensor that does not fit


def test_truncated_inside_the_header(parts, good, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(Path(good["path"]).read_bytes()[:100])
    _strict_failure(parts, path, "truncated download")


def test_missing_file(parts, tmp_path):
    _strict_failure(parts, tmp_path / "nope.safetensors", "no such file")


# ----- pickle checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_refused_by_default(parts, good, tmp_path, suffix):
    path = tmp_path / f"adapter{suffix}"
    torch.save(good["tensors"], path)
    _strict_failure(parts, path, "pickle", "refused", "--allow-pickle")


def test_pickle_loads_when_allowed(parts, good, tmp_path):
    path = tmp_path / "adapter.ckpt"
    torch.save({"state_dict": good["tensors"]}, path)
    result = load_network(parts, path, allow_pickle=True)
    got = model_outputs(parts)
    for name in got:
        torch.testing.assert_close(got[name], good["outputs"][name], rtol=1e-5, atol=1e-6)
    result.network.remove()


class _Payload:
    """Unpickling this runs Path.touch(sentinel): code execution, which weights_only must prevent."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_pickle_with_code_is_refused_even_when_allowed(parts, good, tmp_path):
    sentinel = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({**good["tensors"], "extra": _Payload(sentinel)}, path)
    _strict_failure(parts, path, "pickle")
    state, structure = state_of(parts), structure_of(parts)
    with pytest.raises(AdapterFileError, match="weights-only"):
        load_network(parts, path, allow_pickle=True)
    _assert_untouched(parts, state, structure)
    assert not sentinel.exists(), "the pickle ran code"
