"""Helpers for the lyco-train tests: small configs on the builtin tiny models, fresh accelerate state."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainers.config import TrainConfig
from trainers.config_io import apply_overrides, dump_toml, validate

REPO = Path(__file__).resolve().parents[1]


def concept_data(root: Path, *, n_images: int = 4, repeats: int = 2) -> Path:
    """A small synthetic concept dataset (kohya layout) under `root`, written once per folder."""
    from pipelines.synthetic import write_concept_dataset

    if not root.exists():
        write_concept_dataset(root, n_images=n_images, repeats=repeats)
    return root


def tiny_config(tmp_path: Path, *sets: str, model: str = "builtin:tiny-sd", out: str = "out", data: Path | None = None) -> TrainConfig:
    """A fast run: rank 4, a few steps, fp32 saves, no trackers, memory latent cache."""
    data = data or concept_data(tmp_path / "data")
    base: dict[str, Any] = {
        "model": {"path": model},
        "network": {"rank": 4, "alpha": 2.0},
        "dataset": {"train_data_dir": str(data), "batch_size": 2, "cache_latents": "memory"},
        "training": {"max_train_steps": 4, "seed": 3},
        "optimizer": {"learning_rate": 1e-3},
        "saving": {"output_dir": str(tmp_path / out), "output_name": "t", "save_precision": "fp32"},
        "logging": {"trackers": []},
    }
    return validate(apply_overrides(base, sets))


def write_config(config: TrainConfig, path: Path) -> Path:
    path.write_text(dump_toml(config), encoding="utf-8")
    return path


def reset_accelerate() -> None:
    """Forget the process-wide accelerate state so that the next Accelerator starts fresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def subprocess_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


PYTHON = sys.executable
