"""lyco-inspect: per-algorithm counts, ranks, alphas, dtypes, family and naming scheme, parts, metadata,
hashes (stored vs recomputed), readable and --json output, exit code 2 naming the file on bad input."""
from __future__ import annotations

import hashlib
import importlib
import json
import struct
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from lyco import LycoNetwork, ModuleOverride, NetworkConfig, save_network
from lyco.tools.inspect import format_report, inspect_adapter, main
from tiny_models import randomize, tiny_sd1, tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "sdscripts_lora_keys.json").read_text())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny SDXL file: LoRA/LoCon, LoHa on attn2, LoKr + output-axis DoRA on the feed-forward, fp16."""
    parts = tiny_sdxl()
    config = NetworkConfig(
        rank=4, alpha=2, conv_rank=2, conv_alpha=1,
        overrides=(ModuleOverride({"algo": "loha", "rank": 3}, pattern=r"attn2"),
                   ModuleOverride({"algo": "lokr", "factor": 4, "dora": True, "dora_axis": "output"}, pattern=r"ff\.net")),
    )
    network = LycoNetwork.create(parts, config)
    randomize(network.parameters(), std=0.1)
    path = save_network(network, tmp_path_factory.mktemp("inspect") / "mixed.safetensors", precision="fp16", title="Mixed")
    layers = {key: (layer.algo.NAME, layer.rank, float(layer.alpha), layer.dora_axis) for key, layer in network.layers.items()}
    network.remove()
    return path, layers


def _data_section_sha256(path) -> str:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def test_inspect_mixed_file(mixed):
    path, layers = mixed
    info = inspect_adapter(path)
    json.dumps(info)  # plain data
    assert info["module_count"] == len(layers)
    assert info["algorithms"] == dict(Counter(a for a, _, _, _ in layers.values()))
    assert set(info["algorithms"]) == {"lora", "loha", "lokr"}
    assert info["ranks"] == {str(r): n for r, n in sorted(Counter(r for _, r, _, _ in layers.values()).items())}
    assert info["alphas"] == {_number(a): n for a, n in sorted(Counter(a for _, _, a, _ in layers.values()).items())}
    assert info["dora"] == {"output": sum(1 for *_, axis in layers.values() if axis == "output")} and info["dora"]["output"] > 0
    n_tensors = len(safetensors.torch.load_file(str(path)))
    assert info["tensor_count"] == n_tensors and info["dtypes"] == {"float16": n_tensors}
    assert info["family"] == "sdxl" and info["naming_scheme"] == "kohya-sgm"
    expected_parts = Counter({"lora_unet": "unet", "lora_te1": "te1", "lora_te2": "te2"}[k.split("_")[0] + "_" + k.split("_")[1]] for k in layers)
    assert info["parts"] == dict(expected_parts)
    with safetensors.safe_open(str(path), "pt") as handle:
        assert info["metadata"] == handle.metadata()
    hashes = info["hashes"]
    assert hashes["stored_model_hash"] == hashes["model_hash"] == _data_section_sha256(path)
    assert hashes["model_hash_matches"] is True and hashes["legacy_hash_matches"] is True
    assert hashes["stored_hash_style"] == "sd-scripts"
    assert info["warnings"] == [] and info["unparsed_keys"] == []
    variants = info["variants"]
    assert any(v.startswith("lora conv") for v in variants) and any(v.startswith("lora linear") for v in variants)
    assert any(v.startswith("lokr ") and v.endswith("+ dora(output)") for v in variants)
    assert sum(variants.values()) == len(layers)


def test_readable_report(mixed):
    path, layers = mixed
    text = format_report(inspect_adapter(path))
    assert str(path) in text
    for needle in ("Algorithms: ", "lora ×", "loha ×", "lokr ×", "Ranks:", "Alphas:", "float16 ×", "Base model: sdxl",
                   "Naming:     kohya-sgm", "matches the file", "ss_network_module: lycoris.kohya", "modelspec.title: Mixed"):
        assert needle in text, needle
    assert f"Modules:    {len(layers)} " in text


def _write(path: Path, tensors, metadata=None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _from_shapes(shapes: dict[str, list[int]], modules: list[str]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"{m}.{s}": torch.randn(shapes[f"{m}.{s}"], generator=gen) if shapes[f"{m}.{s}"] else torch.tensor(4.0)
            for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}


SD2_SHAPES = {  # SD2.x: OpenCLIP-H text encoder in HF layout (1024 wide, 23 layers), 1024-wide cross-attention
    "lora_te_text_model_encoder_layers_20_self_attn_q_proj.lora_down.weight": [4, 1024],
    "lora_te_text_model_encoder_layers_20_self_attn_q_proj.lora_up.weight": [1024, 4],
    "lora_te_text_model_encoder_layers_20_self_attn_q_proj.alpha": [],
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [4, 1024],
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": [640, 4],
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha": [],
}


@pytest.mark.parametrize(
    "name, shapes, modules, family, scheme",
    [
        ("sd15", FIXTURE["sd15_default"], ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                           "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"], "sd1", "kohya-diffusers"),
        ("sd15-unet-only", FIXTURE["sd15_default"], ["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"], "sd1", "kohya-diffusers"),
        ("sd2", SD2_SHAPES, ["lora_te_text_model_encoder_layers_20_self_attn_q_proj",
                             "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"], "sd2", "kohya-diffusers"),
        ("sdxl", FIXTURE["sdxl_default"], ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                           "lora_te2_text_model_encoder_layers_31_mlp_fc1",
                                           "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"], "sdxl", "kohya-sgm"),
    ],
)
def test_family_and_scheme_from_real_shapes(tmp_path, name, shapes, modules, family, scheme):
    path = _write(tmp_path / f"{name}.safetensors", _from_shapes(shapes, modules))  # no metadata: tensors must tell
    info = inspect_adapter(path)
    assert (info["family"], info["family_source"], info["naming_scheme"]) == (family, "shapes", scheme)
    assert info["family_evidence"]["metadata"] is None


def _tiny_tensors(rank: int = 2, **config):
    parts = tiny_sd1()
    network = LycoNetwork.create(parts, NetworkConfig(rank=rank, **config))
    randomize(network.parameters(), std=0.1)
    tensors = network.adapter_state_dict()
    network.remove()
    return tensors


def test_family_falls_back_to_metadata_and_warns_on_conflict(tmp_path):
    tensors = _tiny_tensors()  # tiny widths: shapes and keys cannot tell SD1 from SD2
    bare = inspect_adapter(_write(tmp_path / "bare.safetensors", tensors))
    assert bare["family"] is None and bare["family_source"] is None
    assert "Base model: unknown" in format_report(bare)
    claimed = inspect_adapter(_write(tmp_path / "claimed.safetensors", tensors, {"ss_base_model_version": "sd_v2"}))
    assert (claimed["family"], claimed["family_source"]) == ("sd2", "metadata")
    sdxl_keys = _from_shapes(FIXTURE["sdxl_default"], ["lora_te2_text_model_encoder_layers_0_mlp_fc1"])
    conflict = inspect_adapter(_write(tmp_path / "conflict.safetensors", sdxl_keys, {"ss_base_model_version": "sd_v1"}))
    assert conflict["family"] == "sdxl"
    assert any("metadata says sd1 but the tensors say sdxl" in w for w in conflict["warnings"])


def test_hash_mismatch_and_lycoris_style_hash(mixed, tmp_path):
    path, _ = mixed
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1  # tensors changed after the hash was written
    changed = inspect_adapter(_write(tmp_path / "changed.safetensors", tensors, metadata))
    assert changed["hashes"]["model_hash_matches"] is False
    assert changed["hashes"]["model_hash"] == _data_section_sha256(tmp_path / "changed.safetensors")
    assert any("does not match the file's data section" in w for w in changed["warnings"])
    assert "MISMATCH" in format_report(changed)
    lycoris_style = inspect_adapter(_write(tmp_path / "lyc.safetensors", tensors, {**metadata, "sshs_model_hash": "0x" + "ab" * 32}))
    assert lycoris_style["hashes"]["stored_hash_style"] == "lycoris"
    assert any("LyCORIS-style" in w for w in lycoris_style["warnings"])
    unhashed = inspect_adapter(_write(tmp_path / "nohash.safetensors", tensors))
    assert unhashed["hashes"]["stored_model_hash"] is None and unhashed["hashes"]["model_hash_matches"] is None
    assert unhashed["hashes"]["model_hash"] == _data_section_sha256(tmp_path / "nohash.safetensors")


def test_unparsed_keys_missing_alpha_and_other_schemes(tmp_path):
    tensors = _tiny_tensors(conv_rank=2, use_tucker=True)
    alpha_key = next(k for k in tensors if k.endswith(".alpha"))
    del tensors[alpha_key]
    tensors["lora_unet_conv_in.on_input"] = torch.tensor(1)
    tensors["lora_unet_conv_in.weight"] = torch.ones(32)
    info = inspect_adapter(_write(tmp_path / "odd.safetensors", tensors))
    assert sorted(info["unparsed_keys"]) == ["lora_unet_conv_in.on_input",
                                            "lora_unet_conv_in.weight"]
    assert info["alphas"]["missing"] == 1
    assert any("2 keys belong to no supported adapter form" in w for w in info["warnings"])
    assert any("1 modules have no alpha" in w for w in info["warnings"])
    assert any("tucker" in v for v in info["variants"]) and info["dtypes"] == {"float32": len(tensors) - 1, "int64": 1}
    assert info["parts"] == {"unet": sum(1 for k in {t.split(".")[0] for t in tensors} if k.startswith("lora_unet")) - 1,  # conv_in unparsed
                             "te": sum(1 for k in {t.split(".")[0] for t in tensors} if k.startswith("lora_te"))}

    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32, 1, 1),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2, 1, 1),
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}
    info = inspect_adapter(_write(tmp_path / "peft.safetensors", peft))
    assert info["naming_scheme"] == "diffusers-peft" and info["parts"] == {"te": 1, "unet": 1}
    lyc = {"lycoris_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(32, 2), "lycoris_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(2, 32),
           "lycoris_down_blocks_0_attentions_0_proj_in.hada_w2_a": torch.zeros(32, 2), "lycoris_down_blocks_0_attentions_0_proj_in.hada_w2_b": torch.zeros(2, 32)}
    info = inspect_adapter(_write(tmp_path / "lyc.safetensors", lyc))
    assert info["naming_scheme"] == "lycoris" and info["algorithms"] == {"loha": 1} and info["alphas"] == {"missing": 1}


# ----- command line --------------------------------------------------------------------------------


def test_main_json_and_text(mixed, capsys):
    path, layers = mixed
    assert main([str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(inspect_adapter(path)))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("File:") and "Algorithms:" in out


@pytest.mark.parametrize(
    "name, payload, needle",
    [
        ("missing.safetensors", None, "no such file"),
        ("text.safetensors", b"not a tensor file at all, sorry\n" * 3, "not a safetensors file"),
        ("cut.safetensors", "truncate", "truncated file"),
        ("adapter.ckpt", "pickle", "pickle checkpoints can run code"),
        ("nan.safetensors", "nan", "NaN or Inf"),
        ("model.safetensors", "no-adapter", "contains no adapter modules"),
    ],
)
def test_main_bad_files_exit_2_naming_the_file(mixed, tmp_path, capsys, name, payload, needle):
    path = tmp_path / name
    good = Path(mixed[0]).read_bytes()
    if payload == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif payload == "pickle":
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, path)
    elif payload == "nan":
        _write(path, {"lora_unet_x.lora_down.weight": torch.full((2, 2), float("nan")), "lora_unet_x.lora_up.weight": torch.zeros(2, 2)})
    elif payload == "no-adapter":
        _write(path, {"model.diffusion_model.out.2.weight": torch.zeros(2)})
    elif payload is not None:
        path.write_bytes(payload)
    assert main([str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("lyco-inspect: error: ") and str(path) in captured.err and needle in captured.err


def test_main_allow_pickle(mixed, tmp_path, capsys):
    path = tmp_path / "adapter.ckpt"
    torch.save(safetensors.torch.load_file(str(mixed[0])), path)
    assert main([str(path), "--allow-pickle", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["container"] == "pickle" and info["module_count"] == len(mixed[1])
    assert info["hashes"]["model_hash"] is None and info["metadata"] == {}


def test_console_script_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["lyco-inspect"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_lokr_without_rank_and_decomposed_factors(tmp_path):
    full = inspect_adapter(_write(tmp_path / "full.safetensors", _tiny_tensors(algo="lokr", full_matrix=True)))
    assert list(full["ranks"]) == ["full"] and list(full["variants"]) == ["lokr w1 full + w2 full"]
    both = inspect_adapter(_write(tmp_path / "both.safetensors", _tiny_tensors(rank=1, algo="lokr", factor=4, decompose_both=True, alpha=1)))
    assert "lokr w1 low-rank + w2 low-rank" in both["variants"] and both["alphas"] == {"1": both["module_count"]}
