"""What a run writes: adapter files (through the core's save), keep-last-K, states, metadata, progress."""
from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lyco import BaseModelInfo, LycoNetwork, save_network

from .config import TrainConfig
from .data import Dataset

STATE_DIR = "state"
_STEP_FILE = re.compile(r"-step(\d+)\.safetensors$")
_STATE = re.compile(r"^step-(\d+)$")


@dataclass
class RunInfo:
    """Facts about the run that go into metadata."""

    family: str
    v_prediction: bool
    resolution: tuple[int, int]
    steps_per_epoch: int
    batches_per_epoch: int
    total_steps: int
    num_epochs: int
    num_processes: int
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = field(default_factory=time.time)


def final_adapter_path(config: TrainConfig) -> Path:
    return Path(config.saving.output_dir) / f"{config.saving.output_name}.safetensors"


def step_adapter_path(config: TrainConfig, step: int) -> Path:
    return Path(config.saving.output_dir) / f"{config.saving.output_name}-step{step:06d}.safetensors"


def state_path(config: TrainConfig, step: int) -> Path:
    return Path(config.saving.output_dir) / STATE_DIR / f"step-{step:06d}"


def latest_state(output_dir: str | Path) -> Path | None:
    """The newest complete state folder under `<output_dir>/state` (one with a `lyco_state.json`)."""
    root = Path(output_dir) / STATE_DIR
    if not root.is_dir():
        return None
    states = sorted((p for p in root.iterdir() if _STATE.match(p.name) and (p / "lyco_state.json").is_file()), key=lambda p: p.name)
    return states[-1] if states else None


def prune(config: TrainConfig) -> list[Path]:
    """Delete all but the last `keep_last` intermediate adapters and states this run's names produce."""
    keep = config.saving.keep_last
    if keep is None:
        return []
    out_dir = Path(config.saving.output_dir)
    stem = re.escape(config.saving.output_name)
    adapters = sorted(p for p in out_dir.glob(f"{config.saving.output_name}-step*.safetensors") if re.fullmatch(stem + r"-step\d+\.safetensors", p.name))
    states_root = out_dir / STATE_DIR
    states = sorted(p for p in states_root.iterdir() if _STATE.match(p.name)) if states_root.is_dir() else []
    removed = []
    for path in adapters[:-keep]:
        path.unlink(missing_ok=True)
        removed.append(path)
    for path in states[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def base_info(config: TrainConfig, run: RunInfo) -> BaseModelInfo:
    width, height = run.resolution
    return BaseModelInfo(family=run.family, v_prediction=run.v_prediction, resolution=f"{width}x{height}",
                         model_name=Path(config.model.path.removeprefix("builtin:")).name)


def save_adapter(network: LycoNetwork, path: Path, *, config: TrainConfig, run: RunInfo, static: dict[str, Any],
                 step: int, epoch: int, overwrite: bool) -> Path:
    metadata = dict(static)
    metadata.update({"ss_training_finished_at": str(time.time()), "ss_steps": str(step), "ss_epoch": str(epoch)})
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_network(network, path, precision=config.saving.save_precision, base=base_info(config, run),
                        title=config.saving.title or config.saving.output_name, metadata=metadata, overwrite=overwrite)


def training_metadata(config: TrainConfig, dataset: Dataset, run: RunInfo) -> dict[str, Any]:
    """sd-scripts `ss_*` keys (FORMAT.md §3.1) and modelspec extras, from the config and dataset."""
    ds, tr, opt, net = config.dataset, config.training, config.optimizer, config.network
    train_subsets = [(i, s) for i, s in enumerate(dataset.subsets) if not s.is_reg]
    reg_subsets = [(i, s) for i, s in enumerate(dataset.subsets) if s.is_reg]

    def dirs(subsets):
        return {s.image_dir.name: {"n_repeats": s.num_repeats, "img_count": sum(1 for it in dataset.items if it.subset == i)} for i, s in subsets}

    buckets: dict[str, Any] = {}
    for item in dataset.items:
        entry = buckets.setdefault(f"{item.bucket[0]}x{item.bucket[1]}", {"resolution": list(item.bucket), "count": 0})
        entry["count"] += 1
    lr = opt.learning_rate
    metadata: dict[str, Any] = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": str(run.started_at),
        "ss_output_name": config.saving.output_name,
        "ss_learning_rate": lr,
        "ss_unet_lr": opt.unet_lr if opt.unet_lr is not None else lr,
        "ss_text_encoder_lr": (opt.text_encoder_lr if opt.text_encoder_lr is not None else lr) if net.train_text_encoder else 0,
        "ss_num_train_images": sum(1 for it in dataset.items if not dataset.subsets[it.subset].is_reg),
        "ss_num_validation_images": len(dataset.val_items),
        "ss_num_reg_images": sum(1 for it in dataset.items if dataset.subsets[it.subset].is_reg),
        "ss_num_batches_per_epoch": run.batches_per_epoch,
        "ss_num_epochs": run.num_epochs,
        "ss_batch_size_per_device": ds.batch_size,
        "ss_total_batch_size": ds.batch_size * run.num_processes * tr.gradient_accumulation_steps,
        "ss_gradient_checkpointing": tr.gradient_checkpointing,
        "ss_gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "ss_max_train_steps": run.total_steps,
        "ss_lr_warmup_steps": opt.lr_warmup_steps,
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_optimizer": f"{opt.type}" + (f"({', '.join(f'{k}={v}' for k, v in opt.args.items())})" if opt.args else ""),
        "ss_max_grad_norm": tr.max_grad_norm,
        "ss_network_dropout": net.dropout,
        "ss_mixed_precision": tr.mixed_precision,
        "ss_full_fp16": False,
        "ss_clip_skip": config.model.clip_skip if run.family != "sdxl" else None,
        "ss_max_token_length": None,
        "ss_cache_latents": ds.cache_latents != "none",
        "ss_seed": tr.seed,
        "ss_noise_offset": tr.noise_offset or None,
        "ss_zero_terminal_snr": tr.zero_terminal_snr,
        "ss_min_snr_gamma": tr.min_snr_gamma,
        "ss_loss_type": tr.loss_type,
        "ss_huber_c": tr.huber_c,
        "ss_prior_loss_weight": tr.prior_loss_weight,
        "ss_training_comment": config.saving.comment,
        "ss_caption_dropout_rate": ds.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": ds.caption_tag_dropout_rate,
        "ss_resolution": f"({run.resolution[0]}, {run.resolution[1]})",
        "ss_flip_aug": ds.flip_aug,
        "ss_random_crop": ds.random_crop,
        "ss_shuffle_caption": ds.shuffle_caption,
        "ss_keep_tokens": ds.keep_tokens,
        "ss_enable_bucket": ds.enable_bucket,
        "ss_bucket_no_upscale": ds.bucket_no_upscale,
        "ss_min_bucket_reso": dataset.settings.min_size,
        "ss_max_bucket_reso": dataset.settings.max_size,
        "ss_bucket_info": {"buckets": buckets},
        "ss_dataset_dirs": dirs(train_subsets),
        "ss_reg_dataset_dirs": dirs(reg_subsets),
        "ss_tag_frequency": dataset.tag_frequency(),
        "ss_validation_split": ds.validation_split,
        "ss_validation_seed": tr.seed,
        "ss_sd_model_name": Path(config.model.path.removeprefix("builtin:")).name,
        "lyco_trainer": "lyco-train",
    }
    if tr.ema_decay is not None:
        metadata["lyco_ema_decay"] = tr.ema_decay
    for key in ("author", "description", "license", "tags"):
        value = getattr(config.saving, key)
        if value is not None:
            metadata[f"modelspec.{key}"] = value
    return metadata


class ProgressFile:
    """JSON lines the UI follows: one `{"event": ...}` object per line, flushed immediately."""

    def __init__(self, path: Path | None, *, append: bool) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                path.write_text("", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"event": event, "time": datetime.now().isoformat(timespec="seconds"), **fields}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
