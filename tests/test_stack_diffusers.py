"""Plain LoRA/LoCon files: images from lyco's stack equal diffusers' load_lora_weights + set_adapters (UNet and text encoder)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.stack import AdapterStack
from test_stack import make_adapter

pytest.importorskip("peft")

WEIGHTS = {"a": (0.8, 0.5), "b": (-0.6, 1.2)}  # (unet, text encoder)


@pytest.fixture(scope="module")
def pipes():
    from pipelines.models import load_pipeline

    return load_pipeline("builtin:tiny-sd"), load_pipeline("builtin:tiny-sd")


@pytest.fixture(scope="module")
def files(pipes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {
        "a": make_adapter(pipes[0], folder / "a.safetensors", algo="lora", seed=1, scale=0.08, rank=4, alpha=2, conv_rank=4, conv_alpha=2),
        "b": make_adapter(pipes[0], folder / "b.safetensors", algo="lora", seed=2, scale=0.08, rank=2, alpha=3, preset="attn-only"),
    }


def images(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(7)
    return pipe(["a red circle on white"], negative_prompt=[""], num_inference_steps=3, guidance_scale=5.0,
                generator=generator, output_type="np").images


def test_lyco_stack_matches_diffusers_load_lora_weights(pipes, files):
    ours, theirs = pipes
    base = images(ours)
    stack = AdapterStack(ours)
    for name, (unet, te) in WEIGHTS.items():
        stack.add(name, files[name], unet=unet, text_encoder=te)
        theirs.load_lora_weights(str(files[name]), adapter_name=name)
    theirs.set_adapters(list(WEIGHTS), adapter_weights=[{"unet": u, "text_encoder": t} for u, t in WEIGHTS.values()])
    reference = images(theirs)
    assert np.abs(reference - base).max() > 0.05  # the adapters do change the image
    try:
        assert np.abs(images(ours) - reference).max() < 2e-3  # adapters beside the weights
        with stack.inference():
            assert np.abs(images(ours) - reference).max() < 2e-3  # collapsed
        stack.fuse()
        assert np.abs(images(ours) - reference).max() < 2e-3  # fused

        # The text-encoder strength is applied like diffusers' per-component weight.
        stack.set_strength("b", text_encoder=0.0)
        theirs.set_adapters(list(WEIGHTS), adapter_weights=[{"unet": 0.8, "text_encoder": 0.5}, {"unet": -0.6, "text_encoder": 0.0}])
        changed = images(theirs)
        assert np.abs(changed - reference).max() > 1e-3
        assert np.abs(images(ours) - changed).max() < 2e-3
    finally:
        stack.unfuse()
        stack.clear()
    assert np.array_equal(images(ours), base)
