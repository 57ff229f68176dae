"""DoRA weight decomposition (FORMAT.md §2.4): W' = dora_scale ⊙ V / ‖V‖ along one axis."""
from __future__ import annotations

import torch
from torch import Tensor

DORA_AXES = ("input", "output")


def weight_norms(weight: Tensor, axis: str) -> Tensor:
    """Per-output-row norms (out, 1, ...) or per-input-column norms (1, in, ...) of a weight."""
    rest = [1] * (weight.dim() - 2)
    if axis == "output":
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], 1, *rest)
    if axis == "input":
        return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, weight.shape[1], *rest)
    raise ValueError(f"DoRA axis must be one of {DORA_AXES}, got {axis!r}")


def dora_axis_of(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
    """Which axis a stored dora_scale normalises, from its shape (PEFT's 1-D (out,) is the output axis)."""
    out_f, in_f = weight_shape[0], weight_shape[1]
    flat = [d for d in scale_shape]
    if len(flat) == 1:
        return "output" if flat[0] == out_f else None
    if len(flat) >= 2 and flat[0] == out_f and all(d == 1 for d in flat[1:]):
        return "output"
    if len(flat) >= 2 and flat[0] == 1 and flat[1] == in_f and all(d == 1 for d in flat[2:]):
        return "input"
    return None


def dora_weight(combined: Tensor, dora_scale: Tensor, axis: str) -> Tensor:
    """dora_scale ⊙ V / ‖V‖, the norm of V = W + s·ΔW taken along `axis`.

    The norm is clamped at eps instead of having eps added (LyCORIS adds it) so that a fresh adapter,
    whose dora_scale equals ‖W‖, reproduces W bit-exactly; the two differ by < 1e-7 relative."""
    norm = weight_norms(combined, axis).clamp_min(torch.finfo(combined.dtype).eps)
    return combined * (dora_scale.to(combined.dtype) / norm)
