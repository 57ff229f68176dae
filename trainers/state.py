"""Small checkpointed objects: the loop position and the EMA of adapter weights.

Both have `state_dict` / `load_state_dict`, so `accelerator.register_for_checkpointing` saves and
restores them with the optimizer, scheduler and RNG states.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass
class LoopPosition:
    """Where training continues: optimizer steps done, the epoch, and the next batch in it."""

    global_step: int = 0
    epoch: int = 0
    next_batch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch, self.next_batch = int(state["global_step"]), int(state["epoch"]), int(state["next_batch"])


class AdapterEMA:
    """Exponential moving average of a module's trainable parameters (fp32 shadow copies)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # warm up early on
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1.0 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the module (for saving and sampling)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, backup):
                    param.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)
