"""The pretraining script runs a few steps end to end and writes a loadable pipeline folder."""

from __future__ import annotations

import json

import torch
from diffusers import StableDiffusionPipeline

from pipelines.builtin.pretrain import main as pretrain_main
from pipelines.models import describe_pipeline, load_pipeline


def test_pretrain_few_steps_writes_loadable_pipeline(tmp_path, capsys):
    out = tmp_path / "tiny"
    threads = torch.get_num_threads()
    try:
        code = pretrain_main([
            "--out", str(out), "--n-images", "16", "--vae-steps", "2", "--vae-batch", "4",
            "--steps", "2", "--batch", "4", "--eval-every", "0",
        ])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    log = capsys.readouterr().out
    assert "vae step 1" in log and "unet step 1" in log and f"wrote {out}" in log
    record = json.loads((out / "training_log.json").read_text())
    assert record["config"]["unet_steps"] == 2
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "unet" / "config.json").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.vae.config.scaling_factor != 1.0  # set from the encoded dataset
    info = describe_pipeline(load_pipeline(str(out)))
    assert (info.family, info.prediction_type) == ("sd1", "epsilon")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_vae_foreground_mask_selects_saturated_shapes_not_grey_backgrounds():
    from pipelines.builtin.pretrain import _foreground_mask, _images_to_tensor, _to_unit
    from pipelines.synthetic import ShapeSpec, render_shape

    grey = torch.full((1, 3, 8, 8), 0.3)
    red = torch.tensor([1.0, -0.9, -0.9]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    black_red = torch.tensor([-0.7, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)  # too dark to count
    assert _foreground_mask(grey).sum() == 0
    assert _foreground_mask(red).sum() == 64
    assert _foreground_mask(black_red).sum() == 0
    image = _to_unit(_images_to_tensor([render_shape(ShapeSpec("blue", "circle", "gray"), seed=1)]))
    share = _foreground_mask(image).mean().item()
    assert 0.02 < share < 0.6
