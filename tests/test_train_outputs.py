"""One short run with most options on: what lyco-train prints and writes (adapters, keep-last-K, samples,
validation loss, progress JSON lines, tensorboard logs, metadata) and that a corrupt image is skipped by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from trainers.cli import main

from train_utils import concept_data, tiny_config, write_config


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_options_run_writes_everything(tmp_path, capsys):
    data = concept_data(tmp_path / "data", n_images=6)
    (data / "2_sks" / "broken.png").write_bytes(b"not an image")
    config = tiny_config(
        tmp_path,
        "training.max_train_steps=6", "dataset.validation_split=0.2", "training.validate_every_n_steps=3",
        "saving.save_every_n_steps=2", "saving.keep_last=2", "saving.save_precision='fp16'",
        "sampling.every_n_steps=3", "sampling.prompts=[{prompt='a photo of sks', steps=2}, {prompt='sks', seed=5, steps=2}]",
        "logging.trackers=['tensorboard']", "optimizer.type='Adafactor'", "optimizer.loraplus_ratio=4.0",
        "training.gradient_checkpointing=true", "training.loss_type='huber'", "training.noise_offset=0.05",
        "training.min_snr_gamma=5.0", "network.algo='loha'", "network.conv_rank=2", "saving.comment='options test'",
        "optimizer.lr_warmup_steps=2", "optimizer.lr_scheduler='linear'",
        data=data,
    )
    assert main(["--config", str(write_config(config, tmp_path / "c.toml"))]) == 0
    printed = capsys.readouterr()
    out = tmp_path / "out"
    # before training: the dataset, bucket and step summary, the skipped file by name
    assert "bucket 64x64: 5 images (10 with repeats)" in printed.out
    assert "steps per epoch" in printed.out and "(+1 held out for validation)" in printed.out
    assert "broken.png" in printed.out + printed.err
    # keep_last = 2 of the intermediate adapters, and the final one
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t-step000002.safetensors", "t-step000004.safetensors", "t.safetensors"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step000003-00.png", "step000003-01.png", "step000006-00.png", "step000006-01.png"]
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[-1]["status"] == "completed"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "it_per_s", "eta_s", "epoch"} <= set(e) for e in steps)
    assert set(steps[0]["lr"]) == {"unet.down", "unet.up", "text_encoder.down", "text_encoder.up"}  # LoRA+ groups
    assert [e["step"] for e in events if e["event"] == "validation"] == [3, 6]
    assert all(e["val_loss"] > 0 for e in events if e["event"] == "validation")
    assert [len(e["paths"]) for e in events if e["event"] == "sample"] == [2, 2]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard event file"
    with safe_open(str(out / "t.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys() if not k.endswith(".alpha")}
    assert dtypes == {torch.float16}
    assert metadata["ss_network_module"] == "lycoris.kohya" and json.loads(metadata["ss_network_args"])["algo"] == "loha"
    assert metadata["ss_steps"] == "6" and metadata["ss_num_train_images"] == "5" and metadata["ss_num_validation_images"] == "1"
    assert metadata["ss_training_comment"] == "options test" and metadata["ss_loss_type"] == "huber"
    assert metadata["ss_optimizer"] == "Adafactor" and metadata["ss_gradient_checkpointing"] == "True"
    assert json.loads(metadata["ss_tag_frequency"])["2_sks"] and json.loads(metadata["ss_dataset_dirs"]) == {"2_sks": {"n_repeats": 2, "img_count": 5}}
    assert metadata["modelspec.resolution"] == "64x64" and metadata["sshs_model_hash"]


def test_existing_output_is_refused_before_loading(tmp_path, capsys):
    config = tiny_config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t.safetensors").write_bytes(b"")
    assert main(["--config", str(write_config(config, tmp_path / "c.toml"))]) == 2
    assert "saving.output_name" in capsys.readouterr().err


def test_resume_without_a_state_is_refused(tmp_path, capsys):
    path = write_config(tiny_config(tmp_path), tmp_path / "c.toml")
    assert main(["--config", str(path), "--resume"]) == 2
    assert main(["--config", str(path), "--resume", str(tmp_path)]) == 2
    assert "not a complete lyco-train state folder" in capsys.readouterr().err
