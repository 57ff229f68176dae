"""The training loop: one accelerate loop for SD1/SD2/SDXL.

Only the main process writes files (adapters, samples, progress); every process takes part in
`save_state` (accelerate writes each process's RNG state). SIGINT/SIGTERM stop at the next optimizer
step with a resumable state and a valid adapter file.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .batching import encode_latents, epoch_loader
from .config import TrainConfig
from .config_io import dump_toml
from .family import Conditioning
from .loss import add_noise, min_snr_weights, per_sample_loss, prediction_target, seeded_noise, seeded_timesteps
from .outputs import (ProgressFile, final_adapter_path, latest_state, prune, save_adapter, state_path, step_adapter_path,
                      training_metadata)
from .sampling import draw, sample_requests
from .setup import Run, build_run, make_accelerator
from .state import AdapterEMA, LoopPosition

log = logging.getLogger("lyco.train")


class TrainingInterrupted(RuntimeError):
    def __init__(self, signum: int, state_dir: Path, adapter: Path | None) -> None:
        self.signum, self.state_dir, self.adapter = signum, state_dir, adapter
        super().__init__(f"stopped by {signal.Signals(signum).name}: state saved to {state_dir}" + (f", adapter {adapter}" if adapter else ""))


@dataclass
class TrainResult:
    adapter: Path | None
    steps: int
    last_loss: float | None
    state_dir: Path | None = None


class StopSignal:
    """Remembers SIGINT/SIGTERM; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving a resumable state after this step (send again to stop at once)", signal.Signals(signum).name)


# ----- one step ---------------------------------------------------------------------------------------
def conditioning(run: Run, captions: list[str], *, grad: bool) -> Conditioning:
    if run.te_cache:
        cond = Conditioning.stack([run.te_cache[c] for c in captions])
        return Conditioning(cond.hidden.to(run.accelerator.device), None if cond.pooled is None else cond.pooled.to(run.accelerator.device))
    token_ids = run.family.tokenize(captions)
    with torch.set_grad_enabled(grad and any(p in run.trained for p in run.family.te_parts)):
        return run.family.encode(token_ids, run.encoders)


def compute_loss(run: Run, batch: dict[str, Any], *, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted mean loss, per-sample unweighted losses) of one micro-batch."""
    cfg, device = run.config.training, run.accelerator.device
    if "latents" in batch:
        latents = batch["latents"].to(device)
    else:
        latents = encode_latents(run.pipe.vae, batch["pixels"], batch["vae_seeds"]).to(device)
    seeds = batch["noise_seeds"]
    noise = seeded_noise(latents.shape, seeds, offset=cfg.noise_offset).to(device)
    timesteps = seeded_timesteps(seeds, low=cfg.min_timestep, high=cfg.max_timestep or len(run.alphas_cumprod)).to(device)
    noisy = add_noise(latents, noise, timesteps, run.alphas_cumprod)
    with run.accelerator.autocast():
        cond = conditioning(run, batch["captions"], grad=grad)
        prediction = run.unet(noisy.to(run.weight_dtype), timesteps, **run.family.unet_kwargs(cond, batch, run.weight_dtype), return_dict=False)[0]
    target = prediction_target(latents, noise, timesteps, run.alphas_cumprod, run.prediction_type)
    losses = per_sample_loss(prediction, target, loss_type=cfg.loss_type, huber_c=cfg.huber_c)
    weights = batch["weights"].to(device)
    if cfg.min_snr_gamma:
        weights = weights * min_snr_weights(timesteps, run.alphas_cumprod, cfg.min_snr_gamma, run.prediction_type)
    return (losses * weights).mean(), losses.detach()


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """Mean loss over the held-out images with fixed noise and timesteps (adapters in eval mode)."""
    if not run.dataset.val_items:
        return None
    run.network.train(False)
    total = torch.zeros(2, device=run.accelerator.device)
    try:
        for batch in run.source.validation_batches(run.config.dataset.batch_size):
            _, losses = compute_loss(run, batch, grad=False)
            total += torch.stack([losses.sum(), torch.tensor(float(len(losses)), device=losses.device)])
    finally:
        run.network.train(True)
    if run.accelerator.num_processes > 1:
        total = run.accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


# ----- the run ----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig, *, resume: str | bool | None = None) -> None:
        self.config = config
        self.accelerator = make_accelerator(config)
        self.main = self.accelerator.is_main_process
        set_seed(config.training.seed)  # adapter initialisation; data and noise have their own seeded generators
        _prepare_dataset_folder(config, self.accelerator)
        self.run = build_run(config, self.accelerator)
        self.position = LoopPosition()
        self.ema = AdapterEMA(self.run.network, config.training.ema_decay) if config.training.ema_decay else None
        self._register_checkpointing()
        self.resumed_from = self._load_resume(resume)
        progress = Path(config.logging.progress_file or Path(config.saving.output_dir) / "progress.jsonl")
        self.progress = ProgressFile(progress if self.main else None, append=self.resumed_from is not None)
        self.metadata = training_metadata(config, self.run.dataset, self.run.info)
        self.requests = sample_requests(config.sampling, self.run.info.resolution)
        self.last_sampled = -1
        self.losses: list[float] = []

    # ----- checkpointing ----------------------------------------------------------------------------
    def _register_checkpointing(self) -> None:
        acc = self.accelerator

        def drop_model_weights(models, weights, output_dir):  # the frozen base is not state: save adapters only
            weights.clear()

        def skip_model_loading(models, input_dir):
            models.clear()

        acc.register_save_state_pre_hook(drop_model_weights)
        acc.register_load_state_pre_hook(skip_model_loading)
        acc.register_for_checkpointing(self.run.network, self.run.scheduler, self.position)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)

    def _load_resume(self, resume: str | bool | None) -> Path | None:
        if not resume:
            return None
        directory = latest_state(self.config.saving.output_dir) if resume is True else Path(resume)
        if directory is None or not (directory / "lyco_state.json").is_file():
            raise FileNotFoundError(f"--resume: no saved state in {directory or Path(self.config.saving.output_dir) / 'state'}")
        self.accelerator.load_state(str(directory))
        if self.main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", directory, self.position.global_step, self.position.epoch, self.position.next_batch)
        return directory

    def save_state(self) -> Path:
        """accelerate `save_state` (all processes) into a temporary folder, renamed when complete."""
        final = state_path(self.config, self.position.global_step)
        if final.exists():
            return final
        partial = final.with_name(f".{final.name}.partial")
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.main:
            (partial / "lyco_state.json").write_text(json.dumps({**self.position.state_dict(), "config": self.config.model_dump(mode="json")}, indent=1))
            (partial / "config.toml").write_text(dump_toml(self.config))
            os.replace(partial, final)
        self.accelerator.wait_for_everyone()
        return final

    def save_adapter(self, path: Path, *, overwrite: bool = True) -> Path | None:
        if self.main:
            with self.ema.applied() if self.ema else nullcontext():
                epoch = -(-self.position.global_step // self.run.info.steps_per_epoch)  # epochs begun, as sd-scripts counts
                save_adapter(self.run.network, path, config=self.config, run=self.run.info, static=self.metadata,
                             step=self.position.global_step, epoch=epoch, overwrite=overwrite)
            self.progress.write("save", step=self.position.global_step, path=str(path))
        return path if self.main else None

    def checkpoint(self, *, epoch_end: bool) -> None:
        step, saving = self.position.global_step, self.config.saving
        due = (saving.save_every_n_steps and step % saving.save_every_n_steps == 0) or \
              (epoch_end and saving.save_every_n_epochs and self.position.epoch % saving.save_every_n_epochs == 0)
        if not due or step >= self.run.info.total_steps:
            return
        self.save_adapter(step_adapter_path(self.config, step))
        if saving.save_state:
            self.save_state()
        if self.main:
            prune(self.config)
        self.accelerator.wait_for_everyone()

    # ----- samples, validation, logging --------------------------------------------------------------
    def sample(self) -> None:
        step = self.position.global_step
        if not self.requests or step == self.last_sampled:
            return
        if self.main:
            self.run.network.train(False)
            try:
                with self.ema.applied() if self.ema else nullcontext(), self.accelerator.autocast():
                    paths = draw(self.run.pipe, self.requests, Path(self.config.saving.output_dir) / "samples", step=step)
            finally:
                self.run.network.train(True)
            self.progress.write("sample", step=step, paths=[str(p) for p in paths])
        self.last_sampled = step
        self.accelerator.wait_for_everyone()

    def after_step(self, loss: float, *, epoch_end: bool, bar: tqdm, started: float, start_step: int) -> None:
        step, cfg = self.position.global_step, self.config
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.run.optimizer.param_groups)}
        self.losses.append(loss)
        recent = sum(self.losses[-20:]) / len(self.losses[-20:])
        bar.update(1)
        bar.set_postfix(loss=f"{recent:.4f}", lr=f"{next(iter(lrs.values())):.2e}", epoch=self.position.epoch)
        if step % cfg.logging.log_every_n_steps == 0 or step == self.run.info.total_steps:
            rate = (step - start_step) / max(time.time() - started, 1e-9)
            eta = (self.run.info.total_steps - step) / rate if rate > 0 else None
            self.accelerator.log({"loss": loss, "loss/avg20": recent, **{f"lr/{k}": v for k, v in lrs.items()}}, step=step)
            self.progress.write("step", step=step, epoch=self.position.epoch, loss=loss, loss_avg=recent, lr=lrs,
                                it_per_s=round(rate, 4), eta_s=None if eta is None else round(eta, 1), total_steps=self.run.info.total_steps)
        every = cfg.training.validate_every_n_steps
        if (every and step % every == 0) or (not every and epoch_end and cfg.dataset.validation_split > 0):
            value = validation_loss(self.run)
            if value is not None:
                self.accelerator.log({"val_loss": value}, step=step)
                self.progress.write("validation", step=step, val_loss=value)
        s = cfg.sampling
        if (s.every_n_steps and step % s.every_n_steps == 0) or (epoch_end and s.every_n_epochs and self.position.epoch % s.every_n_epochs == 0):
            self.sample()
        self.checkpoint(epoch_end=epoch_end)

    # ----- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        run, acc, cfg, pos = self.run, self.accelerator, self.config, self.position
        info = run.info
        if self.main:
            self._announce()
        acc.init_trackers(cfg.logging.project_name, config=_flat_hparams(cfg)) if cfg.logging.trackers else None
        self.progress.write("start", total_steps=info.total_steps, steps_per_epoch=info.steps_per_epoch, epochs=info.num_epochs,
                            resumed_from=str(self.resumed_from) if self.resumed_from else None, step=pos.global_step)
        if cfg.sampling.at_start and pos.global_step == 0:
            self.sample()
        run.network.train(True)
        bar = tqdm(total=info.total_steps, initial=pos.global_step, disable=not self.main, desc="train", dynamic_ncols=True)
        started, start_step = time.time(), pos.global_step
        params = [p for p in run.network.parameters() if p.requires_grad]
        global_batch = cfg.dataset.batch_size * acc.num_processes
        micro_losses: list[torch.Tensor] = []
        with StopSignal() as stop:
            while pos.global_step < info.total_steps:
                batches = run.dataset.epoch_batches(pos.epoch, global_batch)[: info.batches_per_epoch]
                first = pos.next_batch
                for offset, batch in enumerate(epoch_loader(run.source, pos.epoch, batches, start=first, num_workers=cfg.dataset.num_workers)):
                    with acc.accumulate(*run.trained.values()):
                        loss, _ = compute_loss(run, batch)
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.training.max_grad_norm > 0:
                            acc.clip_grad_norm_(params, cfg.training.max_grad_norm)
                        run.optimizer.step()
                        run.optimizer.zero_grad(set_to_none=True)
                    micro_losses.append(loss.detach())
                    if not acc.sync_gradients:
                        continue
                    run.scheduler.step()
                    if self.ema is not None:
                        self.ema.update()
                    step_loss = torch.stack(micro_losses).mean()
                    micro_losses.clear()
                    if acc.num_processes > 1:
                        step_loss = acc.reduce(step_loss, reduction="mean")
                    pos.global_step += 1
                    pos.next_batch = first + offset + 1
                    epoch_end = pos.next_batch >= len(batches)
                    if epoch_end:
                        pos.epoch, pos.next_batch = pos.epoch + 1, 0
                    self.after_step(float(step_loss), epoch_end=epoch_end, bar=bar, started=started, start_step=start_step)
                    if self._stop_requested(stop):
                        bar.close()
                        self._interrupt(stop.signum or signal.SIGTERM)
                    if pos.global_step >= info.total_steps or epoch_end:
                        break
            bar.close()
            # Still inside the signal scope: a Stop during the final save/sampling must not kill the run.
            return self.finish(stop)

    def _stop_requested(self, stop: StopSignal) -> bool:
        flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _interrupt(self, signum: int) -> None:
        adapter = self.save_adapter(step_adapter_path(self.config, self.position.global_step))
        state = self.save_state()
        self.progress.write("end", status="interrupted", signal=signal.Signals(signum).name, step=self.position.global_step,
                            state=str(state), adapter=str(adapter) if adapter else None)
        self.accelerator.end_training()
        raise TrainingInterrupted(signum, state, adapter)

    def finish(self, stop: StopSignal | None = None) -> TrainResult:
        """Save the final adapter (and state), then draw the final samples unless a stop was requested."""
        final = final_adapter_path(self.config)
        adapter = self.save_adapter(final, overwrite=self.config.saving.overwrite or self.resumed_from is not None)
        state = self.save_state() if self.config.saving.save_state else None
        if self.main:
            prune(self.config)
        if stop is None or not self._stop_requested(stop):
            self.sample()
        last = self.losses[-1] if self.losses else None
        self.progress.write("end", status="completed", step=self.position.global_step, adapter=str(adapter) if adapter else None, loss=last)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return TrainResult(adapter if self.main else None, self.position.global_step, last, state)

    def _announce(self) -> None:
        info, ds = self.run.info, self.run.dataset
        lines = [f"model {self.config.model.path}: {info.family}, {self.run.prediction_type}, network {len(self.run.network)} modules "
                 f"({self.config.network.algo}, rank {self.config.network.rank})"]
        lines += ds.summary_lines()
        if ds.skipped:
            lines.append(f"skipped {len(ds.skipped)} unreadable image(s): {', '.join(ds.skipped[:5])}")
        lines.append(f"{info.batches_per_epoch} batches per epoch x {self.config.dataset.batch_size} images x {info.num_processes} process(es); "
                     f"{info.steps_per_epoch} steps per epoch; {info.total_steps} steps = {info.num_epochs} epoch(s)")
        for line in lines:
            print(line, flush=True)


def _prepare_dataset_folder(config: TrainConfig, accelerator: Any) -> None:
    ds = config.dataset
    if ds.generate == "concept" and ds.train_data_dir and accelerator.is_main_process:
        folder = Path(ds.train_data_dir)
        if not folder.is_dir() or not any(folder.iterdir()):
            from pipelines.synthetic import write_concept_dataset

            written = write_concept_dataset(folder, overwrite=True)
            print(f"wrote the synthetic concept dataset to {written}", flush=True)
    accelerator.wait_for_everyone()


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in config.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def train(config: TrainConfig, *, resume: str | bool | None = None) -> TrainResult:
    """Run a whole training; raises TrainingInterrupted after SIGINT/SIGTERM (state saved)."""
    return Trainer(config, resume=resume).train()
