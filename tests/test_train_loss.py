"""Training math: noise, timesteps, targets, zero-terminal SNR, min-SNR weights and losses."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from trainers.loss import (add_noise, min_snr_weights, per_sample_loss, prediction_target, seeded_noise, seeded_timesteps, snr,
                           zero_terminal_snr_betas)


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_noising_and_v_target_match_diffusers(scheduler):
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ac = scheduler.alphas_cumprod
    torch.testing.assert_close(add_noise(latents, noise, t, ac), scheduler.add_noise(latents, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prediction_target(latents, noise, t, ac, "v_prediction"), scheduler.get_velocity(latents, noise, t), rtol=1e-5, atol=1e-5)
    assert prediction_target(latents, noise, t, ac, "epsilon") is noise
    with pytest.raises(ValueError, match="sample"):
        prediction_target(latents, noise, t, ac, "sample")


def test_zero_terminal_snr_matches_diffusers(scheduler):
    ours = zero_terminal_snr_betas(scheduler.betas)
    torch.testing.assert_close(ours, rescale_zero_terminal_snr(scheduler.betas.clone()), rtol=1e-4, atol=1e-5)  # ours in float64
    ac = torch.cumprod(1 - ours.double(), 0).float()
    assert ac[-1] < 1e-6 and snr(torch.tensor([999]), ac)[0] < 1e-5


def test_min_snr_weights(scheduler):
    ac = scheduler.alphas_cumprod
    t = torch.tensor([1, 100, 999])
    ratio = snr(t, ac)
    eps = min_snr_weights(t, ac, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.clamp(ratio, max=5.0) / ratio)
    assert eps[0] < 1 and eps[-1] == pytest.approx(1.0)  # high-SNR (early) timesteps are down-weighted
    v = min_snr_weights(t, ac, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.clamp(ratio, max=5.0) / (ratio + 1))
    zts = torch.cumprod(1 - zero_terminal_snr_betas(scheduler.betas).double(), 0).float()
    assert torch.isfinite(min_snr_weights(torch.tensor([999]), zts, 5.0, "epsilon")).all()
    assert torch.isfinite(min_snr_weights(torch.tensor([999]), zts, 5.0, "v_prediction")).all()


def test_losses():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.cat([torch.full((1, 4, 2, 2), 0.01), torch.full((1, 4, 2, 2), 10.0)])
    l2 = per_sample_loss(pred, target, loss_type="l2")
    torch.testing.assert_close(l2, torch.tensor([1e-4, 100.0]))
    torch.testing.assert_close(per_sample_loss(pred, target, loss_type="l1"), torch.tensor([0.01, 10.0]))
    huber = per_sample_loss(pred, target, loss_type="huber", huber_c=0.1)
    assert huber[0] == pytest.approx(1e-4, rel=0.01)  # ~ L2 for small errors
    assert huber[1] == pytest.approx(2 * 0.1 * (10.0 - 0.1), rel=0.01)  # ~ 2c|d| for large ones
    smooth = per_sample_loss(pred, target, loss_type="smooth_l1", huber_c=0.1)
    assert smooth[1] == pytest.approx(2 * (10.0 - 0.1), rel=0.01)
    assert per_sample_loss(pred.half(), target.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown loss"):
        per_sample_loss(pred, target, loss_type="l3")


def test_seeded_noise_is_per_sample():
    a = seeded_noise((3, 4, 8, 8), [1, 2, 3])
    b = seeded_noise((2, 4, 8, 8), [3, 1])
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])  # independent of batch composition
    assert not torch.equal(a[0], a[1])
    offset = seeded_noise((1, 4, 8, 8), [1], offset=0.1) - seeded_noise((1, 4, 8, 8), [1])
    per_channel = offset.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel)) and per_channel.abs().sum() > 0


def test_seeded_timesteps_in_range_and_stable():
    t = seeded_timesteps(list(range(200)), low=100, high=200)
    assert t.min() >= 100 and t.max() < 200 and t.dtype == torch.long
    assert torch.equal(t[:5], seeded_timesteps([0, 1, 2, 3, 4], low=100, high=200))
    assert len(set(t.tolist())) > 50
