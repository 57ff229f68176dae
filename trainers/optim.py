"""Optimizers and learning-rate schedulers."""
from __future__ import annotations

from typing import Any

import torch

from .config import OptimizerSection


def build_optimizer(config: OptimizerSection, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups` (each with its own lr; names are kept)."""
    kwargs: dict[str, Any] = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if config.betas is not None:
        kwargs["betas"] = tuple(config.betas)
    if config.eps is not None:
        kwargs["eps"] = config.eps
    kwargs.update(config.args)
    name = config.type
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, **kwargs)
    if name == "SGD":
        kwargs.pop("betas", None)
        kwargs.pop("eps", None)
        return torch.optim.SGD(param_groups, **kwargs)
    if name in ("AdamW8bit", "Lion8bit"):
        import bitsandbytes as bnb

        return (bnb.optim.AdamW8bit if name == "AdamW8bit" else bnb.optim.Lion8bit)(param_groups, **_without(kwargs, "eps" if name == "Lion8bit" else ""))
    if name == "Lion":
        from lion_pytorch import Lion

        return Lion(param_groups, **_without(kwargs, "eps"))
    if name == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, **kwargs)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        # With explicit learning rates Adafactor must not pick its own relative step size.
        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **_without(kwargs, "betas", "eps")}
        return Adafactor(param_groups, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}")


def _without(kwargs: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in names}


def warmup_steps(config: OptimizerSection, total_steps: int) -> int:
    warmup = config.lr_warmup_steps
    return int(round(warmup * total_steps)) if isinstance(warmup, float) else int(warmup)


def build_scheduler(config: OptimizerSection, optimizer: torch.optim.Optimizer, *, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A `diffusers.optimization` scheduler, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    warmup = warmup_steps(config, total_steps)
    name = config.lr_scheduler
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         num_cycles=config.lr_scheduler_num_cycles, power=config.lr_scheduler_power)
