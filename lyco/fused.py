"""The bypass path of an adapted nn.Linear as one autograd node: y = x·Wᵀ + b + scale·ΔW·x, ΔW factored.

Plain autograd on `base(x) + bypass(x)` keeps the base and the adapter as separate graph nodes. That
costs an output-sized add in forward, an input-sized add in backward and the scale multiply in both.
On CPU these elementwise passes over the activations cost as much as the thin rank-r products
themselves. Here the adapter's product is accumulated in place (addmm_/baddbmm_) into the base's
output in forward and into the base's input gradient in backward, and the factor gradients are taken
straight from the factored form.

Linear layers only, in two forms: low rank (LoRA, and LoHa as a LoRA of rank r1·r2: ΔW = up·down) and
Kronecker (LoKr: ΔW = kron(w1, w2), applied as w1·X·w2ᵀ per position). Everything runs in the autocast
dtype when autocast is on, as F.linear would, and every gradient is returned in its tensor's own dtype.
(The same node for convolutions measured no faster than plain autograd on the SD1.5 UNet's convs,
whose adapter cost is the rank-r convolution itself; it was left out.)
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .rebuild_op import autocast_dtype


def low_rank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float) -> Tensor:
    """F.linear(x, weight, bias) + scale · (x·downᵀ)·upᵀ."""
    return _LowRankLinear.apply(x, weight, bias, down, up, float(scale))


def kronecker_linear(x: Tensor, weight: Tensor, bias: Tensor | None, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """F.linear(x, weight, bias) + scale · F.linear(x, kron(w1, w2)), without building the Kronecker product."""
    return _KroneckerLinear.apply(x, weight, bias, w1, w2, float(scale))


def _prepare(ctx, x: Tensor, tensors: tuple[Tensor | None, ...]) -> tuple[Tensor, list[Tensor | None]]:
    """The input as (positions, features) and the other tensors, all in the compute dtype (call with
    autocast still as the caller set it)."""
    autocast = autocast_dtype(x.device.type)
    compute = autocast or x.dtype
    ctx.autocast_device = x.device.type if autocast is not None else None
    ctx.input_shape, ctx.dtypes = x.shape, [x.dtype] + [None if t is None else t.dtype for t in tensors]
    return x.reshape(-1, x.shape[-1]).to(compute), [None if t is None else t.to(compute) for t in tensors]


def _autocast_off(ctx) -> contextlib.AbstractContextManager:
    # Entering torch.autocast costs microseconds per call: only when it is on.
    if ctx.autocast_device is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.autocast_device, enabled=False)


def _base_output(flat: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())


def _saved_output(ctx, out: Tensor, scale: float, *saved: Tensor) -> Tensor:
    """Keep what backward needs and return the output in the input's leading shape."""
    ctx.scale = scale
    ctx.save_for_backward(*saved)
    return out.view(*ctx.input_shape[:-1], out.shape[-1])


def _base_grads(ctx, grad_out: Tensor, flat: Tensor, weight: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The output gradient as (positions, features), and the base op's own gradients: input (before
    the adapter's share is added), weight, bias."""
    grad = grad_out.reshape(-1, grad_out.shape[-1]).to(flat.dtype)
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None
    grad_weight = grad.t() @ flat if ctx.needs_input_grad[1] else None
    grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
    return grad, grad_x, grad_weight, grad_bias


def _returned(ctx, grads: list[Tensor | None]) -> tuple[Tensor | None, ...]:
    """The gradients in their tensors' dtypes, the input's in its shape, then None for the scale."""
    out = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
    if out[0] is not None:
        out[0] = out[0].view(ctx.input_shape)
    return (*out, None)


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float) -> Tensor:
        flat, (weight, bias, down, up) = _prepare(ctx, x, (weight, bias, down, up))
        with _autocast_off(ctx):
            hidden = flat @ down.t()
            out = _base_output(flat, weight, bias).addmm_(hidden, up.t(), alpha=scale)
        return _saved_output(ctx, out, scale, flat, weight, down, up, hidden)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        flat, weight, down, up, hidden = ctx.saved_tensors
        with _autocast_off(ctx):
            grad, grad_x, grad_weight, grad_bias = _base_grads(ctx, grad_out, flat, weight)
            grad_hidden = (grad @ up).mul_(ctx.scale)
            if grad_x is not None:
                grad_x.addmm_(grad_hidden, down)
            grad_down = grad_hidden.t() @ flat if ctx.needs_input_grad[3] else None
            grad_up = (grad.t() @ hidden).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        return _returned(ctx, [grad_x, grad_weight, grad_bias, grad_down, grad_up])


class _KroneckerLinear(torch.autograd.Function):
    # Per position, the input reshaped to X (in_m, in_n) maps to w1·X·w2ᵀ (out_l, out_k):
    # mixed = X·w2ᵀ is one matmul over all positions, then w1 mixes the in_m groups.
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
        flat, (weight, bias, w1, w2) = _prepare(ctx, x, (weight, bias, w1, w2))
        with _autocast_off(ctx):
            (out_l, in_m), (out_k, in_n), positions = w1.shape, w2.shape, flat.shape[0]
            mixed = (flat.reshape(positions * in_m, in_n) @ w2.t()).view(positions, in_m, out_k)
            out = _base_output(flat, weight, bias)
            out.view(positions, out_l, out_k).baddbmm_(w1.expand(positions, out_l, in_m), mixed, alpha=scale)
        return _saved_output(ctx, out, scale, flat, weight, w1, w2, mixed)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        flat, weight, w1, w2, mixed = ctx.saved_tensors
        (out_l, in_m), (out_k, in_n), positions = w1.shape, w2.shape, flat.shape[0]
        with _autocast_off(ctx):
            grad, grad_x, grad_weight, grad_bias = _base_grads(ctx, grad_out, flat, weight)
            grouped_grad = grad.reshape(positions, out_l, out_k)
            grad_mixed = torch.matmul(w1.t() * ctx.scale, grouped_grad).view(positions * in_m, out_k)
            if grad_x is not None:
                grad_x.view(positions * in_m, in_n).addmm_(grad_mixed, w2)
            grad_w1 = None
            if ctx.needs_input_grad[3]:
                grad_w1 = torch.bmm(grouped_grad, mixed.transpose(1, 2)).sum(0).mul_(ctx.scale)
            grad_w2 = grad_mixed.t() @ flat.reshape(positions * in_m, in_n) if ctx.needs_input_grad[4] else None
        return _returned(ctx, [grad_x, grad_weight, grad_bias, grad_w1, grad_w2])

