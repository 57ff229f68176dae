"""Everything a run needs before its first step: accelerator, model, network, data, caches, optimizer."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from torch import nn

from lyco import LycoNetwork, load_adapter_file
from lyco import naming

from .batching import BatchSource, LatentKeys, fill_latent_cache
from .cache import LatentCache, module_fingerprint
from .config import DEFAULT_MAX_TRAIN_STEPS, TrainConfig
from .data import Dataset, build_dataset
from .family import Conditioning, Family, family_for
from .loss import zero_terminal_snr_betas
from .optim import build_optimizer, build_scheduler
from .outputs import RunInfo

log = logging.getLogger("lyco.train")


@dataclass
class Run:
    """The built pieces of a training run."""

    config: TrainConfig
    accelerator: Accelerator
    pipe: Any
    family: Family
    prediction_type: str
    alphas_cumprod: torch.Tensor
    network: LycoNetwork
    dataset: Dataset
    source: BatchSource
    optimizer: Any
    scheduler: Any
    trained: dict[str, nn.Module]  # part -> (possibly wrapped) model whose adapters train
    encoders: dict[str, nn.Module]  # text-encoder part -> module to call
    info: RunInfo
    weight_dtype: torch.dtype
    te_cache: dict[str, Conditioning] = field(default_factory=dict)

    @property
    def unet(self) -> nn.Module:
        return self.trained.get("unet", self.pipe.unet)


def make_accelerator(config: TrainConfig) -> Accelerator:
    out = Path(config.saving.output_dir)
    precision = config.training.mixed_precision
    if precision != "no" and not torch.cuda.is_available():
        log.warning("mixed_precision = %s needs a GPU; training in fp32 on the CPU", precision)
        precision = "no"
    trackers = list(config.logging.trackers) or None
    project = ProjectConfiguration(project_dir=str(out), logging_dir=config.logging.logging_dir or str(out / "logs"))
    return Accelerator(gradient_accumulation_steps=config.training.gradient_accumulation_steps, mixed_precision=precision,
                       log_with=trackers, project_config=project, cpu=not torch.cuda.is_available())


def unused_adapters_possible(config: TrainConfig, family: str) -> bool:
    """Whether some adapter can get no gradient in a step (then DDP must not wait for it): module
    dropout, or text-encoder layers after the one the conditioning is read from (clip skip, SDXL)."""
    skips_layers = config.model.clip_skip > 1 or family == "sdxl"
    return config.network.module_dropout > 0 or (config.network.train_text_encoder and skips_layers)


def resolution_of(config: TrainConfig, native: int) -> tuple[int, int]:
    res = config.dataset.resolution
    if res is None:
        return (native, native)
    return (res, res) if isinstance(res, int) else (res[0], res[1])


def load_base(config: TrainConfig, accelerator: Accelerator) -> tuple[Any, Any, torch.dtype]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from pipelines.models import describe_pipeline, load_pipeline

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = load_pipeline(config.model.path, dtype=torch.float32, device=accelerator.device, config_dir=config.model.config_dir)
    info = describe_pipeline(pipe)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            if name != "vae" and module.dtype != weight_dtype:  # the frozen base in the compute dtype; adapters stay fp32
                module.to(dtype=weight_dtype)
    if config.training.attention == "xformers":
        if torch.cuda.is_available():
            pipe.unet.enable_xformers_memory_efficient_attention()
        else:
            log.warning("xformers needs CUDA; using PyTorch SDPA attention")
    return pipe, info, weight_dtype


def noise_schedule(pipe: Any, *, zero_terminal_snr: bool) -> torch.Tensor:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    betas = scheduler.betas
    if zero_terminal_snr:
        betas = zero_terminal_snr_betas(betas)
    return torch.cumprod(1.0 - betas.double(), dim=0).float()


def create_network(config: TrainConfig, pipe: Any, family: str) -> LycoNetwork:
    parts = {p: getattr(pipe, p) for p in config.network.parts() if getattr(pipe, p, None) is not None}
    network = LycoNetwork.create(parts, config.network.to_core(), family=family)
    if config.network.weights:
        load_weights_into(network, parts, config.network.weights, family=family)
    return network


def load_weights_into(network: LycoNetwork, parts: dict[str, nn.Module], path: str, *, family: str) -> None:
    """Copy an adapter file's tensors into the freshly created network (same modules and shapes)."""
    adapter = load_adapter_file(path)
    table = naming.build_key_table(parts, family=family)
    by_slot = {(network.slot(k).part, network.slot(k).path): k for k in network.layers}
    problems, loaded = [], set()
    for entry in adapter.modules.values():
        target = table.lookup(entry.key)
        key = by_slot.get(target) if target else None
        if key is None:
            problems.append(f"{entry.key}: not a module of this network (check network.preset / include / train_* settings)")
            continue
        layer = network.layers[key]
        ours = {s: tuple(t.shape) for s, t in layer.tensors().items()}
        theirs = {s: tuple(t.shape) for s, t in entry.tensors.items()}
        if entry.algo != layer.algo.NAME or ours != theirs:
            problems.append(f"{entry.key}: file has {entry.algo} {theirs}, the network config gives {layer.algo.NAME} {ours}")
            continue
        with torch.no_grad():
            for suffix, tensor in entry.tensors.items():
                layer.tensors()[suffix].copy_(tensor.float())
            if entry.alpha is not None:
                layer.alpha.fill_(float(entry.alpha))
            if entry.dora_scale is not None and layer.dora_scale is not None:
                layer.dora_scale.copy_(entry.dora_scale.reshape(layer.dora_scale.shape).float())
        loaded.add(key)
    missing = sorted(set(network.layers) - loaded)
    if missing:
        problems.append(f"{len(missing)} network modules are not in the file, e.g. {missing[:3]}")
    if problems:
        raise ValueError(f"network.weights {path} does not match the network config:\n  " + "\n  ".join(problems[:20]))
    log.info("continuing from %s (%d modules)", path, len(loaded))


def plan_steps(config: TrainConfig, dataset: Dataset, world: int) -> tuple[int, int, int]:
    """(batches per epoch used, optimizer steps per epoch, total steps)."""
    accum = config.training.gradient_accumulation_steps
    batches = len(dataset.epoch_batches(0, config.dataset.batch_size * world))
    steps_per_epoch = batches // accum
    if steps_per_epoch == 0:
        raise ValueError(f"dataset: {batches} batches per epoch is fewer than gradient_accumulation_steps = {accum}")
    if config.training.max_train_epochs is not None:
        total = steps_per_epoch * config.training.max_train_epochs
    else:
        total = config.training.max_train_steps or DEFAULT_MAX_TRAIN_STEPS
    return steps_per_epoch * accum, steps_per_epoch, total


def build_run(config: TrainConfig, accelerator: Accelerator) -> Run:
    pipe, model_info, weight_dtype = load_base(config, accelerator)
    prediction = model_info.prediction_type if config.model.prediction_type == "auto" else config.model.prediction_type
    resolution = resolution_of(config, model_info.resolution)
    dataset = build_dataset(config.dataset, resolution=resolution, seed=config.training.seed)
    network = create_network(config, pipe, model_info.family)
    network.to(accelerator.device)
    if config.training.gradient_checkpointing:
        _enable_checkpointing(pipe, config)
    world, rank = accelerator.num_processes, accelerator.process_index
    cache, keys = _latent_cache(config, pipe, dataset, accelerator)
    source = BatchSource(dataset, rank=rank, world=world, prior_loss_weight=config.training.prior_loss_weight, cache=cache, keys=keys)
    batches, steps_per_epoch, total = plan_steps(config, dataset, world)
    lrs = {"unet_lr": config.optimizer.unet_lr if config.optimizer.unet_lr is not None else config.optimizer.learning_rate,
           "text_encoder_lr": config.optimizer.text_encoder_lr if config.optimizer.text_encoder_lr is not None else config.optimizer.learning_rate}
    groups = network.param_groups(**lrs, loraplus_ratio=config.optimizer.loraplus_ratio)
    if not groups:
        raise ValueError("no adapter parameter trains (every learning rate is 0)")
    trained_names = [part for part in network.config.parts if any(True for _ in network.layers_of(part)) and _group_lr(groups, part) > 0]
    optimizer = build_optimizer(config.optimizer, groups)
    scheduler = build_scheduler(config.optimizer, optimizer, total_steps=total)  # (warmup sets the groups' lr to 0)
    accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=unused_adapters_possible(config, model_info.family))
    prepared = accelerator.prepare(*[getattr(pipe, p) for p in trained_names], optimizer)
    trained = dict(zip(trained_names, prepared[:-1]))
    family = family_for(model_info.family, pipe, clip_skip=config.model.clip_skip)
    encoders = {p: trained.get(p, getattr(pipe, p)) for p in family.te_parts}
    info = RunInfo(family=model_info.family, v_prediction=prediction == "v_prediction", resolution=resolution,
                   steps_per_epoch=steps_per_epoch, batches_per_epoch=batches, total_steps=total,
                   num_epochs=math.ceil(total / steps_per_epoch), num_processes=world)
    run = Run(config, accelerator, pipe, family, prediction, noise_schedule(pipe, zero_terminal_snr=config.training.zero_terminal_snr),
              network, dataset, source, prepared[-1], scheduler, trained, encoders, info, weight_dtype)
    if config.dataset.cache_text_encoder_outputs:
        _cache_text_encoder_outputs(run)
    return run


def _group_lr(groups: list[dict], part: str) -> float:
    return max((g["lr"] for g in groups if g["name"].split(".")[0] == part), default=0.0)


def _enable_checkpointing(pipe: Any, config: TrainConfig) -> None:
    pipe.unet.enable_gradient_checkpointing()
    if config.network.train_text_encoder:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:  # transformers >= 5 renamed it
                (getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable)()


def _latent_cache(config: TrainConfig, pipe: Any, dataset: Dataset, accelerator: Accelerator) -> tuple[LatentCache | None, LatentKeys | None]:
    mode = config.dataset.cache_latents
    if mode == "none":
        return None, None
    directory = Path(config.dataset.cache_dir or Path(config.saving.output_dir) / "cache") / "latents"
    cache = LatentCache(mode, directory if mode == "disk" else None)
    keys = LatentKeys(module_fingerprint(pipe.vae))
    world, rank = accelerator.num_processes, accelerator.process_index
    encoded = fill_latent_cache(dataset, pipe.vae, cache, keys, batch_size=config.training.vae_batch_size, rank=rank, world=world)
    accelerator.wait_for_everyone()
    if mode == "disk" and world > 1:  # read what the other processes wrote
        fill_latent_cache(dataset, pipe.vae, cache, keys, batch_size=config.training.vae_batch_size)
    if accelerator.is_main_process:
        log.info("latent cache (%s): %d encoded, %d reused", mode, encoded, cache.hits)
    return cache, keys


@torch.no_grad()
def _cache_text_encoder_outputs(run: Run) -> None:
    captions = sorted({item.caption for item in run.dataset.items + run.dataset.val_items})
    for start in range(0, len(captions), 16):
        chunk = captions[start:start + 16]
        cond = run.family.encode(run.family.tokenize(chunk), run.encoders)
        for i, caption in enumerate(chunk):
            run.te_cache[caption] = cond.select(i)
