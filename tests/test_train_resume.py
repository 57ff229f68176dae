"""Resume: a run continued from a saved state ends with exactly the adapter of an uninterrupted run
(CPU, fp32), also after SIGTERM; `network.weights` continues from an adapter file."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lyco import load_network
from trainers.loop import train
from trainers.outputs import latest_state

from train_utils import PYTHON, adapter_tensors, assert_same_tensors, reset_accelerate, subprocess_env, tiny_config, write_config


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_resume_from_a_saved_state_is_bit_exact(tmp_path):
    # accumulation, adapter dropout (global RNG) and EMA all have state that must survive the restart
    sets = ["training.max_train_steps=6", "training.gradient_accumulation_steps=2", "network.dropout=0.1",
            "training.ema_decay=0.9", "saving.save_every_n_steps=3", "saving.save_state=true", "optimizer.lr_scheduler='cosine'"]
    full = train(tiny_config(tmp_path, *sets, out="full"))
    state = tmp_path / "full" / "state" / "step-000003"
    assert json.loads((state / "lyco_state.json").read_text())["global_step"] == 3
    assert latest_state(tmp_path / "full").name == "step-000006"  # save_state also writes the final state
    assert not [p for p in state.rglob("*") if "unet" in p.name or p.stat().st_size > 5_000_000]  # adapter-only states
    reset_accelerate()
    resumed = train(tiny_config(tmp_path, *sets, out="resumed"), resume=str(state))
    assert resumed.steps == 6
    assert_same_tensors(full.adapter, resumed.adapter)
    progress = [json.loads(line) for line in (tmp_path / "resumed" / "progress.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress if p["event"] == "step"] == [4, 5, 6]


def test_sigterm_saves_state_and_adapter_then_resume_matches(tmp_path):
    sets = ["training.max_train_steps=24", "dataset.batch_size=1"]
    config = tiny_config(tmp_path, *sets, out="run")
    path = write_config(config, tmp_path / "run.toml")
    process = subprocess.Popen([PYTHON, "-m", "trainers.cli", "--config", str(path)], env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "run" / "progress.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if progress.exists() and any(json.loads(line).get("step", 0) >= 2 and json.loads(line)["event"] == "step"
                                     for line in progress.read_text().splitlines() if line.strip()):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    end = events[-1]
    assert end["event"] == "end" and end["status"] == "interrupted" and end["signal"] == "SIGTERM"
    stopped = end["step"]
    assert 2 <= stopped < 24 and "--resume" in err
    adapter = Path(end["adapter"])
    assert adapter.name == f"t-step{stopped:06d}.safetensors"
    from pipelines.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd")
    result = load_network({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, adapter)
    assert len(result.network) > 0 and not result.skipped_keys
    assert latest_state(tmp_path / "run").name == f"step-{stopped:06d}"

    resumed = train(config, resume=True)
    reset_accelerate()
    reference = train(tiny_config(tmp_path, *sets, out="reference"))
    assert_same_tensors(reference.adapter, resumed.adapter)


def test_network_weights_continue_from_an_adapter_file(tmp_path):
    first = train(tiny_config(tmp_path, "training.max_train_steps=2", out="first"))
    reset_accelerate()
    zero_steps = tiny_config(tmp_path, "training.max_train_steps=1", "optimizer.learning_rate=1e-12",
                             f"network.weights='{first.adapter}'", out="cont")
    cont = train(zero_steps)
    before, after = adapter_tensors(first.adapter), adapter_tensors(cont.adapter)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    reset_accelerate()
    mismatched = tiny_config(tmp_path, "network.rank=2", f"network.weights='{first.adapter}'", out="bad")
    with pytest.raises(ValueError, match="does not match the network config"):
        train(mismatched)


FINAL_PHASE_DRIVER = """
import os, signal, sys
import trainers.loop as loop

patched = sys.argv[2]
real = getattr(loop, patched)
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the UI's Stop arrives while the run is finishing
    return real(*args, **kwargs)
setattr(loop, patched, signalled)
from trainers.cli import main
sys.exit(main(["--config", sys.argv[1]]))
"""


@pytest.mark.parametrize("during, samples", [("save_adapter", 0), ("draw", 1)])
def test_sigterm_while_finishing_keeps_the_final_adapter(tmp_path, during, samples):
    config = tiny_config(tmp_path, "training.max_train_steps=2", "sampling.prompts=[{prompt='a photo of sks', steps=2}]", out="run")
    path = write_config(config, tmp_path / "run.toml")
    driver = tmp_path / "driver.py"
    driver.write_text(FINAL_PHASE_DRIVER)
    run = subprocess.run([PYTHON, str(driver), str(path), during], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SIGTERM received" in run.stderr
    end = json.loads((tmp_path / "run" / "progress.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["status"] == "completed" and end["step"] == 2
    assert Path(end["adapter"]).name == "t.safetensors" and adapter_tensors(Path(end["adapter"]))
    # a stop that arrives before the final samples skips them; one that arrives while drawing lets them finish
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == samples
