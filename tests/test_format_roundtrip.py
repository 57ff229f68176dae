"""save -> load -> identical tensors, metadata and model outputs, for every algorithm variant;
save precision, metadata (FORMAT.md §3), sd-scripts/A1111 hashes, atomic never-clobbering writes."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from lyco import BaseModelInfo, LycoNetwork, ModuleOverride, NetworkConfig, load_adapter_file, load_network, save_network
from tiny_models import model_outputs, randomize, same_state, state_of, structure_of, tiny_parts

VARIANTS = {
    "lora": ("sd1", NetworkConfig(rank=4, alpha=2)),
    "locon": ("sd1", NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=1)),
    "locon-tucker": ("sd1", NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=1, use_tucker=True)),
    "lora-rs": ("sd1", NetworkConfig(rank=4, alpha=2, rs_lora=True)),
    "loha": ("sd1", NetworkConfig(algo="loha", rank=4, alpha=2, conv_rank=2, conv_alpha=1)),
    "loha-tucker": ("sd1", NetworkConfig(algo="loha", rank=4, alpha=2, conv_rank=2, conv_alpha=1, use_tucker=True)),
    "lokr": ("sd1", NetworkConfig(algo="lokr", rank=4, alpha=2, conv_rank=2, conv_alpha=1)),
    "lokr-factor-decompose-both": ("sd1", NetworkConfig(algo="lokr", rank=1, alpha=2, factor=4, decompose_both=True)),
    "lokr-full-matrix": ("sd1", NetworkConfig(algo="lokr", rank=4, conv_rank=4, full_matrix=True)),
    "lokr-conv-tucker": ("sd1", NetworkConfig(algo="lokr", rank=2, alpha=1, conv_rank=2, use_tucker=True, factor=4)),
    "lokr-unbalanced": ("sd1", NetworkConfig(algo="lokr", rank=2, alpha=1, factor=4, unbalanced_factorization=True)),
    "dora-input": ("sd1", NetworkConfig(rank=4, alpha=2, conv_rank=2, dora=True, dora_axis="input")),
    "dora-output": ("sd1", NetworkConfig(rank=4, alpha=2, conv_rank=2, dora=True, dora_axis="output")),
    "loha-dora-output": ("sd1", NetworkConfig(algo="loha", rank=4, alpha=2, dora=True, dora_axis="output")),
    "lokr-dora-input": ("sd1", NetworkConfig(algo="lokr", rank=4, alpha=2, factor=4, dora=True, dora_axis="input")),
    "sdxl-locon": ("sdxl", NetworkConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=1)),
    "sdxl-mixed": ("sdxl", NetworkConfig(
        rank=4, alpha=2, conv_rank=2, conv_alpha=1, preset="full",
        overrides=(ModuleOverride({"algo": "loha"}, pattern=r"attn2"),
                   ModuleOverride({"algo": "lokr", "factor": 4, "dora": True}, pattern=r"ff\.net"),
                   ModuleOverride({"use_tucker": True}, classes=("ResnetBlock2D",))),
    )),
}


def _trained(family: str, config: NetworkConfig, *, seed: int = 0):
    parts = tiny_parts(family)
    network = LycoNetwork.create(parts, config)
    randomize(network.parameters(), std=0.2, seed=seed)
    return parts, network


def _file_tensors(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _file_metadata(path) -> dict[str, str]:
    with safetensors.safe_open(str(path), "pt") as handle:
        return handle.metadata()


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_every_variant(variant, tmp_path):
    family, config = VARIANTS[variant]
    parts, network = _trained(family, config)
    base_state, base_structure = None, None
    expected_outputs = model_outputs(parts)
    expected_tensors = network.adapter_state_dict()
    algos = {layer.algo.NAME for layer in network.layers.values()}
    path = save_network(network, tmp_path / f"{variant}.safetensors", base=BaseModelInfo(family=family))
    network.remove()
    base_state, base_structure = state_of(parts), structure_of(parts)
    plain = model_outputs(parts)
    assert any(not torch.allclose(plain[k], expected_outputs[k], atol=1e-3) for k in plain)  # the adapter mattered

    # the file holds exactly the network's tensors (fp32: bit-identical)
    _assert_same_tensors(_file_tensors(path), expected_tensors)

    # stand-alone state: per-module entries, algorithm per module
    adapter = load_adapter_file(path)
    assert set(adapter.algorithms()) == algos
    assert len(adapter.modules) == len(expected_tensors and {k.split(".")[0] for k in expected_tensors})
    assert adapter.metadata == _file_metadata(path)

    # into the model: same tensors, same outputs
    result = load_network(parts, path)
    assert result.skipped_keys == [] and result.problems == []
    _assert_same_tensors(result.network.adapter_state_dict(), expected_tensors)
    got = model_outputs(parts)
    for name in expected_outputs:
        torch.testing.assert_close(got[name], expected_outputs[name], rtol=1e-5, atol=1e-6)

    # save again from the loaded network: identical data section, hence identical sshs_model_hash
    again = save_network(result.network, tmp_path / f"{variant}-again.safetensors", metadata=adapter.metadata)
    _assert_same_tensors(_file_tensors(again), expected_tensors)
    assert _file_metadata(again)["sshs_model_hash"] == _file_metadata(path)["sshs_model_hash"]
    result.network.remove()
    assert same_state(parts, base_state) and structure_of(parts) == base_structure


def test_load_strength_scales_like_set_strength(tmp_path):
    parts, network = _trained("sd1", NetworkConfig(algo="loha", rank=4, alpha=2, conv_rank=2))
    network.set_strength(0.4)
    expected = model_outputs(parts)
    path = save_network(network, tmp_path / "s.safetensors")
    network.remove()
    result = load_network(parts, path, strength=0.4)
    got = model_outputs(parts)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    result.network.remove()


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_save_precision_casts_every_tensor(precision, dtype, tmp_path):
    parts, network = _trained("sd1", NetworkConfig(rank=4, alpha=3, conv_rank=2, dora=True))
    expected = network.adapter_state_dict()
    reference = model_outputs(parts)
    path = save_network(network, tmp_path / f"{precision}.safetensors", precision=precision)
    network.remove()
    stored = _file_tensors(path)
    assert {t.dtype for t in stored.values()} == {dtype}  # alpha and dora_scale too, as sd-scripts does
    assert all(stored[k].shape == expected[k].shape for k in expected)
    result = load_network(parts, path)
    loaded = result.network.adapter_state_dict()
    for key in expected:
        assert torch.equal(loaded[key], expected[key].to(dtype).float()), key
    got = model_outputs(parts)
    tolerance = {torch.float32: 1e-6, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=tolerance, atol=tolerance)
    result.network.remove()


def test_unknown_precision_is_refused(tmp_path):
    parts, network = _trained("sd1", NetworkConfig(rank=2))
    with pytest.raises(ValueError, match="save precision must be one of"):
        save_network(network, tmp_path / "x.safetensors", precision="fp8")
    assert not (tmp_path / "x.safetensors").exists()
    network.remove()


# ----- metadata ------------------------------------------------------------------------------------

MUST_MODELSPEC = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.resolution")


@pytest.mark.parametrize(
    "config, module, algo",
    [
        (NetworkConfig(rank=4), "networks.lora", None),
        (NetworkConfig(rank=4, conv_rank=2), "networks.lora", "lora"),
        (NetworkConfig(rank=4, conv_rank=2, use_tucker=True), "lycoris.kohya", "lora"),  # sd-scripts ignores lora_mid
        (NetworkConfig(rank=4, dora=True), "lycoris.kohya", "lora"),  # sd-scripts ignores dora_scale
        (NetworkConfig(algo="loha", rank=4), "lycoris.kohya", "loha"),
        (NetworkConfig(algo="lokr", rank=4, factor=4), "lycoris.kohya", "lokr"),
    ],
)
def test_metadata_network_module_and_args(config, module, algo, tmp_path):
    parts, network = _trained("sd1", config)
    path = save_network(network, tmp_path / "m.safetensors")
    network.remove()
    metadata = _file_metadata(path)
    assert metadata["ss_network_module"] == module
    if algo is None:
        assert "ss_network_args" not in metadata or json.loads(metadata["ss_network_args"])["algo"] == "lora"
    else:
        args = json.loads(metadata["ss_network_args"])
        assert args["algo"] == algo and all(isinstance(v, str) for v in args.values())
    assert metadata["ss_network_dim"] == str(config.rank)
    assert metadata["ss_network_alpha"] == str(config.rank)  # alpha None -> rank


@pytest.mark.parametrize(
    "family, v_prediction, version, v2, architecture, implementation, resolution",
    [
        ("sd1", False, "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512"),
        ("sd2", False, "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
        ("sd2", True, "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
        ("sdxl", False, "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models", "1024x1024"),
    ],
)
def test_metadata_base_model_and_modelspec(family, v_prediction, version, v2, architecture, implementation, resolution, tmp_path):
    parts, network = _trained("sdxl" if family == "sdxl" else "sd1", NetworkConfig(rank=2))
    path = save_network(network, tmp_path / "my-adapter.safetensors", base=BaseModelInfo(family=family, v_prediction=v_prediction))
    network.remove()
    metadata = _file_metadata(path)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert metadata["ss_base_model_version"] == version
    assert metadata["ss_v2"] == v2
    assert all(key in metadata for key in MUST_MODELSPEC)
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.implementation"] == implementation
    assert metadata["modelspec.resolution"] == resolution
    assert metadata["modelspec.title"] == "my-adapter" and metadata["ss_output_name"] == "my-adapter"
    assert metadata["modelspec.prediction_type"] == ("v" if v_prediction else "epsilon")
    assert "modelspec.hash_sha256" not in metadata or metadata["modelspec.hash_sha256"].startswith("0x")


def test_metadata_sd1_v_prediction_suffix(tmp_path):
    # sd-scripts get_model_version_str_for_sd1_sd2 appends _v for v-parameterisation on SD1 too
    parts, network = _trained("sd1", NetworkConfig(rank=2))
    path = save_network(network, tmp_path / "v.safetensors", base=BaseModelInfo(family="sd1", v_prediction=True))
    network.remove()
    metadata = _file_metadata(path)
    assert metadata["ss_base_model_version"] == "sd_v1_v" and metadata["modelspec.resolution"] == "512x512"


def test_caller_metadata_and_title_are_kept(tmp_path):
    parts, network = _trained("sd1", NetworkConfig(rank=2))
    extra = {"ss_tag_frequency": {"img": {"cat": 3}}, "ss_num_epochs": 4, "modelspec.author": "me", "ss_note": "x y"}
    path = save_network(network, tmp_path / "t.safetensors", title="Nice Title", metadata=extra)
    network.remove()
    metadata = load_adapter_file(path).metadata
    assert json.loads(metadata["ss_tag_frequency"]) == {"img": {"cat": 3}}
    assert metadata["ss_num_epochs"] == "4" and metadata["modelspec.author"] == "me" and metadata["ss_note"] == "x y"
    assert metadata["modelspec.title"] == "Nice Title"


# ----- hashes --------------------------------------------------------------------------------------


def _a1111_addnet_hash(path) -> str:
    """A1111 modules/hashes.py addnet_hash_safetensors, re-implemented: sha256 of everything after the header."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        (n,) = struct.unpack("<Q", handle.read(8))
        handle.seek(n + 8)
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _sd_scripts_legacy_hash(tensors, metadata) -> str:
    """sd-scripts train_util.precalculate_safetensors_hashes: serialise with the ss_* metadata only,
    sha256 of the 64 KiB at offset 1 MiB, first 8 hex."""
    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_hashes_follow_sd_scripts_and_a1111(tmp_path):
    # big enough (> 1.06 MiB) that the legacy hash covers real bytes
    parts, network = _trained("sd1", NetworkConfig(rank=32, conv_rank=32, preset="full"))
    first = save_network(network, tmp_path / "a.safetensors", title="first")
    second = save_network(network, tmp_path / "b.safetensors", title="a much longer second title")  # shifts the data by >= 8 bytes
    network.remove()
    assert os.path.getsize(first) > 0x110000
    meta_a, meta_b = _file_metadata(first), _file_metadata(second)
    assert meta_a["sshs_model_hash"] == _a1111_addnet_hash(first)
    assert not meta_a["sshs_model_hash"].startswith("0x")  # not the LyCORIS per-tensor style
    assert meta_a["sshs_legacy_hash"] == _sd_scripts_legacy_hash(_file_tensors(first), meta_a)
    # the model hash ignores metadata; the legacy one does not (it covers header bytes)
    assert meta_a["sshs_model_hash"] == meta_b["sshs_model_hash"]
    assert meta_a["sshs_legacy_hash"] != meta_b["sshs_legacy_hash"]
    assert meta_b["sshs_legacy_hash"] == _sd_scripts_legacy_hash(_file_tensors(second), meta_b)


# ----- atomic writes -------------------------------------------------------------------------------


def test_never_overwrites_unless_asked(tmp_path):
    parts, network = _trained("sd1", NetworkConfig(rank=2))
    path = save_network(network, tmp_path / "out.safetensors")
    before = Path(path).read_bytes()
    randomize(network.parameters(), seed=99)
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        save_network(network, path)
    assert Path(path).read_bytes() == before
    save_network(network, path, overwrite=True)
    assert Path(path).read_bytes() != before
    _assert_same_tensors(_file_tensors(path), network.adapter_state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary files left
    network.remove()


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    parts, network = _trained("sd1", NetworkConfig(rank=2))
    target = tmp_path / "crash.safetensors"
    existing = save_network(network, tmp_path / "keep.safetensors")
    keep_bytes = Path(existing).read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    import lyco.format.container as container

    monkeypatch.setattr(container.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_network(network, target)
    with pytest.raises(OSError, match="No space left"):
        save_network(network, existing, overwrite=True)
    monkeypatch.undo()
    assert not target.exists()
    assert Path(existing).read_bytes() == keep_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    network.remove()


def test_only_safetensors_is_written(tmp_path):
    parts, network = _trained("sd1", NetworkConfig(rank=2))
    for name in ("x.ckpt", "x.pt", "x"):
        with pytest.raises(ValueError, match="safetensors"):
            save_network(network, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    network.remove()
