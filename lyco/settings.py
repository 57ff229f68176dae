"""NetworkConfig: every option of an adapter network, as one immutable value."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .algos import get_algorithm
from .dora import DORA_AXES
from .targets import PRESETS, ModuleOverride, TargetSelection

ALGO_OPTION_FIELDS = ("use_tucker", "factor", "decompose_both", "full_matrix", "unbalanced_factorization")
# Settings an override may change for the modules it matches.
PER_MODULE_FIELDS = (
    "algo", "rank", "alpha", "conv_rank", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
    "dora", "dora_axis", "rs_lora",
) + ALGO_OPTION_FIELDS


@dataclass(frozen=True)
class NetworkConfig:
    algo: str = "lora"
    rank: int = 8
    alpha: float | None = None  # None => alpha = rank (scale 1)
    conv_rank: int | None = None  # rank for k x k convs; None => rank
    conv_alpha: float | None = None  # None => alpha (or conv_rank when alpha is None)
    preset: str = "attn-mlp"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[ModuleOverride, ...] = ()
    parts: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    dora: bool = False
    dora_axis: str = "input"  # the axis A1111 and ComfyUI both apply correctly (FORMAT.md §4.3)
    rs_lora: bool = False
    use_tucker: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced_factorization: bool = False
    path: str = "auto"

    def __post_init__(self) -> None:
        get_algorithm(self.algo)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise ValueError("rank and conv_rank must be >= 1")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dora_axis not in DORA_AXES:
            raise ValueError(f"dora_axis must be one of {DORA_AXES}, got {self.dora_axis!r}")
        for override in self.overrides:
            unknown = sorted(set(override.settings) - set(PER_MODULE_FIELDS))
            if unknown:
                raise ValueError(f"override {override.pattern or override.classes}: {unknown} cannot be overridden per module; valid: {list(PER_MODULE_FIELDS)}")
            replace(self, overrides=(), **override.settings)  # validates the overridden values

    def selection(self) -> TargetSelection:
        return TargetSelection(self.preset, tuple(self.include), tuple(self.exclude), self.conv_rank is not None, tuple(self.parts))

    def with_overrides(self, matching: list[ModuleOverride]) -> "NetworkConfig":
        merged: dict[str, Any] = {}
        for override in matching:
            merged.update(override.settings)
        return replace(self, overrides=(), **merged) if merged else self

    def rank_and_alpha(self, *, spatial_conv: bool) -> tuple[int, float]:
        if spatial_conv and self.conv_rank is not None:
            alpha = self.conv_alpha if self.conv_alpha is not None else (self.alpha if self.alpha is not None else self.conv_rank)
            return self.conv_rank, float(alpha)
        return self.rank, float(self.alpha if self.alpha is not None else self.rank)

    def algo_options(self) -> dict[str, Any]:
        allowed = get_algorithm(self.algo).OPTIONS
        return {name: getattr(self, name) for name in ALGO_OPTION_FIELDS if name in allowed}

    def as_network_args(self) -> dict[str, str]:
        """The sd-scripts/LyCORIS `ss_network_args` view (string pairs) of the non-default options."""
        defaults = NetworkConfig()
        args = {"algo": self.algo, "preset": self.preset}
        for f in fields(self):
            if f.name in ("algo", "rank", "alpha", "preset", "overrides", "parts", "path"):
                continue
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                key = {"conv_rank": "conv_dim", "dora": "dora_wd"}.get(f.name, f.name)
                args[key] = ",".join(value) if isinstance(value, tuple) else str(value)
        if self.dora:
            args["wd_on_output"] = str(self.dora_axis == "output")
        return args
