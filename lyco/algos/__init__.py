"""Algorithm registry: each algorithm is a module of small pure functions over named tensors.

Adding an algorithm = one new module + one line here (+ one row in the test matrix).
Per-module protocol: NAME, REQUIRED_KEYS, OPTIONAL_KEYS, OPTIONS, UP_KEYS, param_shapes(spec, rank, **options),
init_params(spec, rank, **options), expected_shapes(params, spec), scale_rank(params),
delta_weight(params, spec);
optionally bypass(x, params, spec) with bypass_cost / rebuild_cost, fused(x, weight, bias, params, scale, spec)
with fuses(params, spec) (the bypass and the base F.linear as one autograd node), mask_rank(params, keep),
has_complete_keys(keys).
UP_KEYS: the "up" factor(s) for LoRA+ learning rates; ΔW is linear in the first one present, so the layer
scales that factor instead of the bypass output.
"""
from __future__ import annotations

from types import ModuleType

from . import loha, lokr, lora

ALGORITHMS: dict[str, ModuleType] = {"lora": lora, "locon": lora, "loha": loha, "lokr": lokr}
# Detection order follows A1111/ComfyUI: the first algorithm whose keys are complete wins.
DETECTION_ORDER: tuple[ModuleType, ...] = (lora, loha, lokr)


def get_algorithm(name: str) -> ModuleType:
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None


def has_complete_keys(algo: ModuleType, keys: set[str]) -> bool:
    custom = getattr(algo, "has_complete_keys", None)
    if custom is not None:
        return custom(keys)
    return set(algo.REQUIRED_KEYS) <= keys


def detect_algorithm(keys: set[str]) -> ModuleType | None:
    """The algorithm a module's key suffixes (without .alpha / .dora_scale) belong to, or None."""
    for algo in DETECTION_ORDER:
        if has_complete_keys(algo, keys):
            return algo
    return None


def known_keys(algo: ModuleType) -> set[str]:
    return set(algo.REQUIRED_KEYS) | set(algo.OPTIONAL_KEYS)
