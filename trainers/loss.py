"""Diffusion training math as pure functions: noise, timesteps, targets, weighting, losses."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], *, offset: float = 0.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise of `shape` (batch first), sample i drawn from a generator seeded with seeds[i];
    with offset noise, each sample's channels also get a constant `offset * N(0, 1)`."""
    samples = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(tuple(shape[1:]), generator=generator)
        if offset:
            noise = noise + offset * torch.randn((shape[1],) + (1,) * (len(shape) - 2), generator=generator)
        samples.append(noise)
    return torch.stack(samples).to(dtype)


def seeded_timesteps(seeds: Sequence[int], *, low: int, high: int) -> Tensor:
    """One integer timestep in [low, high) per sample, from a generator seeded per sample."""
    out = [torch.randint(low, high, (1,), generator=torch.Generator().manual_seed(int(seed) ^ 0x5DEECE66D)) for seed in seeds]
    return torch.cat(out).long()


def zero_terminal_snr_betas(betas: Tensor) -> Tensor:
    """Rescale betas so the final timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def _gather(values: Tensor, timesteps: Tensor, ndim: int) -> Tensor:
    return values.to(timesteps.device)[timesteps].float().reshape(-1, *([1] * (ndim - 1)))


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    a = _gather(alphas_cumprod, timesteps, latents.ndim)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def prediction_target(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """epsilon: the noise; v_prediction: v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _gather(alphas_cumprod, timesteps, latents.ndim)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction type {prediction_type!r}; lyco trains epsilon and v_prediction models")


def snr(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].double()
    return (a / (1.0 - a)).float()


def min_snr_weights(timesteps: Tensor, alphas_cumprod: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction. A zero-SNR timestep gets weight 1 (epsilon)."""
    ratio = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(ratio, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return torch.where(ratio > 0, clipped / ratio.clamp(min=1e-12), torch.ones_like(ratio))


def per_sample_loss(prediction: Tensor, target: Tensor, *, loss_type: str = "l2", huber_c: float = 0.1) -> Tensor:
    """Mean loss per sample (shape [batch]), computed in fp32."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        elementwise = F.mse_loss(prediction, target, reduction="none")
    elif loss_type == "l1":
        elementwise = F.l1_loss(prediction, target, reduction="none")
    elif loss_type == "huber":  # pseudo-Huber, as sd-scripts: 2c (sqrt(d^2 + c^2) - c)
        elementwise = 2 * huber_c * (torch.sqrt((prediction - target) ** 2 + huber_c ** 2) - huber_c)
    elif loss_type == "smooth_l1":  # sd-scripts: 2 (sqrt(d^2 + c^2) - c), ~ L1 for |d| >> c
        elementwise = 2 * (torch.sqrt((prediction - target) ** 2 + huber_c ** 2) - huber_c)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}; choose l2, l1, huber or smooth_l1")
    return elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
