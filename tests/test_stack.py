"""AdapterStack on builtin tiny pipelines: sums of independent contributions, block weights, exact strength 0,
bit-exact fuse/unfuse cycles (fp32 and fp16), collapsed inference, borrowed networks, errors."""
from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch

from lyco import LycoNetwork, NetworkConfig, load_network, save_network
from pipelines.stack import AdapterSettings, AdapterStack, AdapterStackError, CollapsedLayer

STRENGTHS = {"lora": (0.7, 0.4), "loha": (-0.5, 1.3), "lokr": (1.2, 0.8)}  # (unet, text encoder)
CONFIGS = {
    "lora": dict(algo="lora", rank=4, alpha=2, conv_rank=2, conv_alpha=3),  # LoCon: ResNet and sampler convs too
    "loha": dict(algo="loha", rank=3, alpha=5),
    "lokr": dict(algo="lokr", rank=2, alpha=1, preset="attn-only"),
}


def make_adapter(pipe, path: Path, *, algo: str, seed: int, scale: float = 0.05, **config) -> Path:
    """Write an adapter file with random non-zero factors for `pipe` (its parts are left untouched)."""
    parts = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    network = LycoNetwork.create(parts, NetworkConfig(algo=algo, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in network.layers.values():
            for param in layer.adapter.values():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    save_network(network, path, overwrite=True)
    network.remove()
    return path


@pytest.fixture(scope="module")
def pipe():
    from pipelines.models import load_pipeline

    return load_pipeline("builtin:tiny-sd")


@pytest.fixture(scope="module")
def clean(pipe):
    """An untouched copy of the model parts, for references computed away from the stack."""
    return types.SimpleNamespace(unet=copy.deepcopy(pipe.unet), text_encoder=copy.deepcopy(pipe.text_encoder))


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(pipe, folder / f"{name}.safetensors", seed=i, **cfg) for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture()
def stack(pipe):
    before = {name: dict(getattr(pipe, name).named_modules()) for name in ("unet", "text_encoder")}
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    stack = AdapterStack(pipe)
    yield stack
    stack.unfuse()
    stack.clear()
    after = {name: dict(getattr(pipe, name).named_modules()) for name in ("unet", "text_encoder")}
    assert all(before[n].keys() == after[n].keys() and all(before[n][k] is after[n][k] for k in before[n]) for n in before)
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())


def inputs():
    generator = torch.Generator().manual_seed(123)
    return torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 64, generator=generator), torch.randint(0, 600, (1, 77), generator=generator)


@torch.no_grad()
def outputs(pipe_or_parts):
    latents, context, ids = inputs()
    unet, text_encoder = pipe_or_parts.unet, pipe_or_parts.text_encoder
    return unet(latents, 10, encoder_hidden_states=context).sample, text_encoder(ids)[0]


def reference(clean, files, settings: dict[str, tuple[float, float]], block_factor=lambda part, path: 1.0):
    """A copy of the model whose weights are W + Σ each adapter's contribution, each computed alone."""
    totals: dict[tuple[str, str], torch.Tensor] = {}
    for name, (unet_strength, te_strength) in settings.items():
        parts = {"unet": copy.deepcopy(clean.unet), "text_encoder": copy.deepcopy(clean.text_encoder)}
        network = load_network(parts, files[name], family="sd1").network
        for key, layer in network.layers.items():
            slot = network.slot(key)
            layer.strength = (unet_strength if slot.part == "unet" else te_strength) * block_factor(slot.part, slot.path)
            delta = layer.contribution(dtype=torch.float32).detach()
            totals[(slot.part, slot.path)] = totals.get((slot.part, slot.path), 0) + delta
    ref = types.SimpleNamespace(unet=copy.deepcopy(clean.unet), text_encoder=copy.deepcopy(clean.text_encoder))
    with torch.no_grad():
        for (part, path), delta in totals.items():
            getattr(ref, part).get_submodule(path).weight += delta
    return ref


def close(a, b, tol=1e-5):
    return all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b))


def add_all(stack, files):
    for name, (unet_strength, te_strength) in STRENGTHS.items():
        stack.add(name, files[name], unet=unet_strength, text_encoder=te_strength)


def test_three_algorithms_equal_the_sum_of_independent_contributions(pipe, clean, files, stack):
    add_all(stack, files)
    expected = outputs(reference(clean, files, STRENGTHS))
    assert close(outputs(pipe), expected)  # adapters beside the frozen weights
    with stack.inference():
        assert isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, CollapsedLayer)
        assert close(outputs(pipe), expected)  # collapsed single-op path
    stack.fuse()
    assert close(outputs(pipe), expected)  # fused
    listed = {info.name: info for info in stack.list()}
    assert listed["loha"].algorithms == {"loha": sum(listed["loha"].modules.values())}
    assert listed["lora"].settings == AdapterSettings(unet=0.7, text_encoder=0.4)
    assert len(listed["lokr"].short_hash) == 12


def test_strength_zero_and_disabled_are_the_base_model_bit_exactly(pipe, files, stack):
    base = outputs(pipe)
    add_all(stack, files)
    for name in STRENGTHS:
        stack.set_strength(name, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), base))
    for name in STRENGTHS:
        stack.set_strength(name, 1.0)
        stack.disable(name)
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), base))
    stack.enable("loha")
    assert not torch.equal(outputs(pipe)[0], base[0])


def test_strength_changes_apply_instantly_and_per_part(pipe, clean, files, stack):
    stack.add("loha", files["loha"])
    stack.set_strength("loha", unet=0.3, text_encoder=-0.2)
    assert close(outputs(pipe), outputs(reference(clean, files, {"loha": (0.3, -0.2)})))
    assert stack.set_strength("loha", 0.9) == AdapterSettings(unet=0.9, text_encoder=0.9)
    with stack.inference():
        assert close(outputs(pipe), outputs(reference(clean, files, {"loha": (0.9, 0.9)})))
        stack.set_strength("loha", text_encoder=0.1)  # the collapsed cache notices the change
        assert close(outputs(pipe), outputs(reference(clean, files, {"loha": (0.9, 0.1)})))


def test_collapsed_layers_follow_merges_train_and_to_and_read_parameter_edits_at_the_next_block(pipe, clean, files, stack):
    at_03, at_06 = (outputs(reference(clean, files, {"lora": (s, s)})) for s in (0.3, 0.6))  # before: they set strengths
    stack.add("lora", files["lora"], strength=0.3)
    layers = list(stack.network("lora").layers.values())
    unet_layers = [layer for _, layer in stack.network("lora").layers_of("unet")]
    with stack.inference():
        assert close(outputs(pipe), at_03)
        for layer in layers:
            layer.merge()  # the collapsed layers now run the merged base weight
        assert close(outputs(pipe), at_03)
        for layer in layers:
            layer.unmerge()
        assert close(outputs(pipe), at_03)
        with torch.no_grad():
            for layer in layers:
                layer.adapter["lora_up_weight"].mul_(2.0)  # ΔW doubles: like strength 0.6
        pipe.unet.train()  # passed on to the adapters held by the collapsed layers
        assert all(layer.training for layer in unet_layers)
        pipe.unet.eval()
        pipe.unet.to(torch.float64)
        assert all(p.dtype == torch.float64 for layer in unet_layers for p in layer.adapter.values())
        pipe.unet.to(torch.float32)
    with stack.inference():
        assert close(outputs(pipe), at_06)
    with torch.no_grad():
        for layer in layers:
            layer.adapter["lora_up_weight"].mul_(0.5)


IN04_PREFIXES = ("down_blocks.1.resnets.0.", "down_blocks.1.attentions.0.")


def test_block_weights_change_only_the_named_blocks(pipe, clean, files, stack):
    # 26 values: BASE, IN00..IN11, M00, OUT00..OUT11; everything 1 except IN04 (= SGM input_blocks.4).
    values = [1.0] * 26
    values[5] = 0.25
    stack.add("lora", files["lora"], strength=0.8, block_weights=values)
    layers = {key: (stack.network("lora").slot(key), layer) for key, layer in stack.network("lora").layers.items()}
    in04 = [key for key, (slot, _) in layers.items() if slot.part == "unet" and slot.path.startswith(IN04_PREFIXES)]
    assert in04 and all(layers[k][1].strength == pytest.approx(0.2) for k in in04)
    assert all(layer.strength == pytest.approx(0.8) for k, (_, layer) in layers.items() if k not in in04)

    def factor(part, path):
        return 0.25 if part == "unet" and path.startswith(IN04_PREFIXES) else 1.0

    assert close(outputs(pipe), outputs(reference(clean, files, {"lora": (0.8, 0.8)}, factor)))
    # The 17-value form leaves IN00/IN03/IN06/IN09-11/OUT00-02 out, and lbw gives them 0.
    stack.set_strength("lora", block_weights="ALL")
    zeroed = {slot.path.split(".")[0] + "." + slot.path.split(".")[1] for slot, layer in layers.values() if layer.strength == 0}
    assert zeroed == {"conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "up_blocks.0"} - {"conv_in"}
    stack.set_strength("lora", block_weights=None)
    assert all(layer.strength == pytest.approx(0.8) for _, layer in layers.values())


def test_fuse_unfuse_cycles_are_bit_exact_fp32_and_fp16(pipe, tmp_path):
    # Adapters on one UNet level and the text encoder keep 100 cycles x 2 dtypes fast.
    only = dict(exclude=(r"^unet\.(?!down_blocks\.1\.)",))
    files = {name: make_adapter(pipe, tmp_path / f"{name}.safetensors", seed=i, **{**cfg, **only})
             for i, (name, cfg) in enumerate(CONFIGS.items())}
    for dtype in (torch.float32, torch.float16):
        model = types.SimpleNamespace(unet=copy.deepcopy(pipe.unet).to(dtype), text_encoder=copy.deepcopy(pipe.text_encoder).to(dtype))
        original = {part: {k: v.clone() for k, v in getattr(model, part).state_dict().items()} for part in ("unet", "text_encoder")}
        stack = AdapterStack(model, family="sd1")
        add_all(stack, files)
        for cycle in range(100):
            stack.fuse()
            assert stack.fused
            stack.set_strength("lora", unet=0.1 * (cycle % 7) - 0.3)  # re-fuse from the originals
            if cycle % 10 == 0:
                stack.set_strength("lokr", block_weights="OUTALL")
            stack.unfuse()
            stack.set_strength("loha", 0.05 * cycle)
        stack.clear()
        for part, weights in original.items():
            now = getattr(model, part).state_dict()
            assert now.keys() == weights.keys()
            assert all(torch.equal(now[k], v) for k, v in weights.items()), f"{part} {dtype} drifted"


def test_fused_outputs_equal_unfused_and_structure_changes_while_fused(pipe, clean, files, stack):
    stack.add("lora", files["lora"], strength=0.6)
    unfused = outputs(pipe)
    stack.fuse()
    assert not any(isinstance(m, CollapsedLayer) for m in pipe.unet.modules())
    assert close(outputs(pipe), unfused)
    stack.add("loha", files["loha"], strength=0.5)  # unfuses, attaches, re-fuses
    assert stack.fused
    assert close(outputs(pipe), outputs(reference(clean, files, {"lora": (0.6, 0.6), "loha": (0.5, 0.5)})))
    stack.remove("lora")
    assert close(outputs(pipe), outputs(reference(clean, files, {"loha": (0.5, 0.5)})))


def test_overridden_restores_settings(files, stack):
    stack.add("lora", files["lora"], strength=0.5)
    with stack.overridden({"lora": AdapterSettings(unet=2.0, text_encoder=1.0, block_weights="OUTS")}):
        assert stack.settings("lora").unet == 2.0
    assert stack.settings("lora") == AdapterSettings(unet=0.5, text_encoder=0.5)


def test_borrowed_network_is_left_attached(pipe, stack):
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    network = LycoNetwork.create(parts, NetworkConfig(algo="lora", rank=2, preset="attn-only"))
    try:
        for layer in network.layers.values():
            layer.strength = 0.3
        info = stack.add("training", network, strength=0.9)
        assert info.borrowed and info.short_hash is None
        assert all(layer.strength == 0.9 for layer in network.layers.values())
        stack.remove("training")
        assert network.attached and all(layer.strength == 0.3 for layer in network.layers.values())
        key, layer = next(iter(network.layers.items()))
        assert pipe.unet.get_submodule(network.slot(key).path) is layer
    finally:
        network.remove()


def test_unattached_network_is_copied(pipe, clean, files, stack):
    parts = {"unet": copy.deepcopy(pipe.unet), "text_encoder": copy.deepcopy(pipe.text_encoder)}
    network = load_network(parts, files["loha"], family="sd1").network
    info = stack.add("copy", network, strength=0.5)
    assert not info.borrowed and info.source == "<network copy>"
    assert close(outputs(pipe), outputs(reference(clean, files, {"loha": (0.5, 0.5)})))


def test_errors_name_the_adapter_and_the_fix(pipe, files, stack, tmp_path):
    stack.add("lora", files["lora"])
    with pytest.raises(AdapterStackError, match="already loaded; remove it first"):
        stack.add("lora", files["loha"])
    with pytest.raises(AdapterStackError, match=r"no adapter named 'nope' in the stack \(loaded: lora\)"):
        stack.set_strength("nope", 1)
    with pytest.raises(AdapterStackError, match="adapter 'lora': 12 block weights do not fit a sd1 model"):
        stack.set_strength("lora", block_weights=[1] * 12)
    with pytest.raises(AdapterStackError, match="cannot be used"):
        stack.add("a:b", files["loha"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        stack.add("missing", tmp_path / "missing.safetensors")
    assert stack.names == ["lora"]


def test_wrong_family_file_is_refused_without_touching_the_model(pipe, tmp_path, stack):
    from pipelines.models import load_pipeline

    xl = load_pipeline("builtin:tiny-sdxl")
    path = make_adapter(xl, tmp_path / "xl.safetensors", algo="lora", seed=0, rank=2)
    before = dict(pipe.unet.named_modules())
    with pytest.raises(AdapterStackError, match="(?s)adapter 'xl'.*looks like a sdxl adapter"):
        stack.add("xl", path)
    assert dict(pipe.unet.named_modules()).keys() == before.keys() and len(stack) == 0
    # ... and the same file works on the SDXL pipeline, both text encoders, 12-value block weights.
    xl_stack = AdapterStack(xl)
    info = xl_stack.add("xl", path, unet=0.5, text_encoder=0.7, block_weights=[1] * 12)
    assert set(info.modules) == {"unet", "text_encoder", "text_encoder_2"}
    layers = xl_stack.network("xl").layers
    te2 = [layer for key, layer in layers.items() if xl_stack.network("xl").slot(key).part == "text_encoder_2"]
    assert te2 and all(layer.strength == pytest.approx(0.7) for layer in te2)
    xl_stack.fuse()
    xl_stack.clear()
    assert not xl_stack.fused


def test_img2img_and_inpaint_pipelines_share_the_stack(pipe, files):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    for cls in (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline):
        other = cls(**pipe.components)
        stack = AdapterStack(other)
        assert stack.family == "sd1"
        stack.add("lokr", files["lokr"], strength=0.5)
        assert any(info.name == "lokr" for info in stack.list())
        stack.clear()


def test_collapsed_layers_are_kept_between_blocks_and_rebuilt_after_structure_changes(pipe, files, stack):
    stack.add("lora", files["lora"], strength=0.5)
    with stack.inference():
        first = pipe.unet.down_blocks[0].attentions[0].proj_in
        assert isinstance(first, CollapsedLayer)
        outputs(pipe)
    assert not isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, CollapsedLayer)
    with stack.inference():
        assert pipe.unet.down_blocks[0].attentions[0].proj_in is first  # its summed weight is reused
    stack.add("lokr", files["lokr"], strength=0.5)
    with stack.inference():
        assert pipe.unet.down_blocks[0].attentions[0].proj_in is not first
    stack.drop_inference_cache()
    stack.fuse()
    with stack.inference():  # fused: nothing to collapse
        assert not any(isinstance(m, CollapsedLayer) for m in pipe.unet.modules())
