"""The rebuild path for training: one F.linear/F.conv2d with a rebuilt weight, keeping for backward
only the input and the tensors the weight is built from.

Plain autograd on `op(x, W + ΔW)` keeps the rebuilt weight (one weight-sized tensor per adapted
layer, about the size of the whole frozen UNet when every layer is adapted). Here backward builds the
weight again from the small factors (a few thin matmuls per layer, cheap next to the op itself), takes
the input and weight gradients of the op in one call, and sends the weight gradient through the build
function with autograd.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .spec import LayerSpec

WeightBuilder = Callable[..., Tensor]


def supports(spec: LayerSpec) -> bool:
    """Linear layers and convolutions with numeric padding (string padding goes through autograd)."""
    return not spec.is_conv or not isinstance(spec.padding, str)


def apply_rebuilt(x: Tensor, build: WeightBuilder, tensors: Sequence[Tensor], spec: LayerSpec, bias: Tensor | None = None) -> Tensor:
    """`spec.apply(x, build(*tensors), bias)`, with gradients for x, bias and every tensor that needs one."""
    padding = None
    if spec.is_conv:
        x, padding = spec.pad_input(x)
    return _RebuiltWeightOp.apply(x, bias, build, spec, padding, *tensors)


class _RebuiltWeightOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, build: WeightBuilder, spec: LayerSpec, padding: tuple[int, int] | None, *tensors: Tensor) -> Tensor:
        # The weight is built without autocast (full precision, one cast), in forward and in backward
        # alike; the op itself runs in the autocast dtype, as F.linear/F.conv2d would.
        compute = autocast_dtype(x.device.type) or x.dtype
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            weight = build(*tensors).to(compute)
        ctx.build, ctx.spec, ctx.padding, ctx.has_bias, ctx.input_dtype = build, spec, padding, bias is not None, x.dtype
        x = x.to(compute)
        bias = None if bias is None else bias.to(compute)
        ctx.save_for_backward(x, *tensors)
        if spec.is_conv:
            return torch.nn.functional.conv2d(x, weight, bias, spec.stride, padding, spec.dilation)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *tensors = ctx.saved_tensors
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            weight = ctx.build(*leaves)
        grad_out = grad_out.to(x.dtype)
        grad_x, grad_weight, grad_bias = _op_grads(x, weight.detach().to(x.dtype), grad_out, ctx)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad(weight, wanted, grad_weight.to(weight.dtype)) if wanted else ())
        grads = [next(found) if leaf.requires_grad else None for leaf in leaves]
        grad_x = None if grad_x is None else grad_x.to(ctx.input_dtype)
        return (grad_x, grad_bias, None, None, None, *grads)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type without autocast support
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _op_grads(x: Tensor, weight: Tensor, grad_out: Tensor, ctx) -> tuple[Tensor | None, Tensor, Tensor | None]:
    need_x, need_bias = ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[1]
    spec: LayerSpec = ctx.spec
    if spec.is_conv:
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if need_bias else None, list(spec.stride), list(ctx.padding),
            list(spec.dilation), False, [0, 0], 1, [need_x, True, need_bias],
        )
        return grad_x, grad_weight, grad_bias
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1])
    grad_x = grad_out @ weight if need_x else None
    grad_bias = flat_grad.sum(0) if need_bias else None
    return grad_x, grad_weight, grad_bias

