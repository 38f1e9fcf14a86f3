"""Offline metrics: PSNR/SSIM values and shapes, confidence intervals, Frechet distance,
controllability, linear probe R^2, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from selfflow_world.errors import UserError
from selfflow_world.metrics import (
    MAX_PSNR_DB,
    controllability_gap,
    frechet_distance,
    linear_probe_r2,
    mean_ci,
    psnr,
    psnr_per_horizon,
    shuffle_actions,
    ssim,
    ssim_per_horizon,
)


def _video(b=2, t=5, size=16, seed=0) -> torch.Tensor:
    """Smooth random video in [-1, 1]: ``(B, T, 3, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b * t, 3, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear").view(b, t, 3, size, size)


# -- PSNR ----------------------------------------------------------------------------------------------
def test_psnr_of_identical_frames_is_the_cap():
    video = _video()
    assert torch.equal(psnr_per_horizon(video, video), torch.full((2, 5), MAX_PSNR_DB))
    assert MAX_PSNR_DB == pytest.approx(100.0)


@pytest.mark.parametrize("offset", [0.02, 0.1, 0.5])
def test_psnr_of_a_constant_offset_matches_the_formula(offset):
    """An offset d in [-1, 1] units is d/2 in [0, 1] units: PSNR = 10 log10(1 / (d/2)^2)."""
    a = torch.zeros(3, 3, 8, 8)
    expected = 10 * math.log10(1 / (offset / 2) ** 2)
    assert psnr(a, a + offset) == pytest.approx(torch.full((3,), expected), abs=1e-3)


def test_psnr_per_horizon_shape_and_order():
    real = _video(b=3, t=4)
    imagined = real.clone()
    for k in range(4):  # error grows with the horizon
        imagined[:, k] += 0.05 * (k + 1)
    out = psnr_per_horizon(real, imagined)
    assert out.shape == (3, 4)
    assert (out[:, 1:] < out[:, :-1]).all()
    assert out[:, 0] == pytest.approx(torch.full((3,), 10 * math.log10(1 / 0.025**2)), abs=1e-3)


def test_video_psnr_agrees_with_metrics_psnr():
    from selfflow_world.video import psnr as video_psnr

    a, b = _video(seed=1), _video(seed=2)
    assert torch.allclose(video_psnr(a, b), psnr(a, b))


# -- SSIM ----------------------------------------------------------------------------------------------
def test_ssim_of_identical_frames_is_one():
    video = _video()
    assert ssim_per_horizon(video, video) == pytest.approx(torch.ones(2, 5), abs=1e-5)


def test_ssim_decreases_with_noise():
    real = _video(b=1, t=1)[:, 0]  # (1, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=g)
    scores = [float(ssim(real, real + sigma * noise)) for sigma in (0.0, 0.05, 0.2, 0.8)]
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert all(x > y for x, y in zip(scores[:-1], scores[1:], strict=True))
    assert scores[-1] < 0.5


def test_ssim_matches_a_direct_computation():
    """The separable filter equals a direct per-window weighted mean/variance (one window, 11x11)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 1, 11, 11, generator=g) * 2 - 1, torch.rand(1, 1, 11, 11, generator=g) * 2 - 1
    x, y = ((a + 1) / 2).double().flatten(), ((b + 1) / 2).double().flatten()
    r = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2)).flatten()
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2, (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert float(ssim(a, b)) == pytest.approx(float(expected), abs=1e-5)


def test_ssim_fits_the_window_to_small_frames():
    a = _video(b=2, t=1, size=8)[:, 0]  # 8x8 < 11: a 7-tap window
    noisy = a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    out = ssim(a, noisy)
    assert out.shape == (2,) and torch.isfinite(out).all() and (out < 0.99).all()
    assert ssim(a, a) == pytest.approx(torch.ones(2), abs=1e-5)


def test_ssim_per_horizon_shape():
    real, imagined = _video(b=3, t=4, seed=0), _video(b=3, t=4, seed=1)
    out = ssim_per_horizon(real, imagined)
    assert out.shape == (3, 4) and (out < 1).all() and (out > -1).all()


# -- confidence intervals --------------------------------------------------------------------------------
def test_mean_ci_contains_the_mean_and_narrows_with_more_samples():
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(8, generator=g) + 3, torch.randn(800, generator=g) + 3
    m, lo, hi = mean_ci(small)
    assert lo < m < hi and m == pytest.approx(float(small.mean()))
    m2, lo2, hi2 = mean_ci(large)
    assert lo2 < m2 < hi2 and (hi2 - lo2) < (hi - lo) / 5
    assert lo2 < 3 < hi2


def test_mean_ci_uses_the_t_quantile():
    """Values -1, +1: mean 0, s = sqrt(2), t_{0.975, 1} = 12.706: half width 12.706."""
    m, lo, hi = mean_ci([-1.0, 1.0])
    assert m == 0 and hi == pytest.approx(12.7062, abs=1e-3) and lo == pytest.approx(-hi)
    _, lo90, hi90 = mean_ci([-1.0, 1.0], level=0.9)
    assert hi90 < hi


def test_mean_ci_of_one_value_has_no_interval():
    m, lo, hi = mean_ci([2.5])
    assert m == 2.5 and math.isnan(lo) and math.isnan(hi)


# -- Frechet distance ------------------------------------------------------------------------------------
def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_mean_shift_is_its_squared_norm():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)).double()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    for scale in (0.1, 1.0, 2.0):
        expected = float((scale * shift).pow(2).sum())
        assert frechet_distance(x, x + scale * shift) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_distance_of_gaussians_with_different_scales():
    """Isotropic covariances a^2 I and b^2 I in D dims: distance D (a - b)^2 (fits, so approximately)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20000, 3, generator=g), 3 * torch.randn(20000, 3, generator=g)
    assert frechet_distance(x, y) == pytest.approx(3 * (3 - 1) ** 2, rel=0.05)


def test_frechet_distance_with_fewer_vectors_than_dimensions_and_trajectories():
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))  # (N, T, S): singular covariance
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1) == pytest.approx(15.0, rel=1e-6)


# -- controllability -------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [2, 3, 7, 64])
def test_shuffle_actions_is_a_deterministic_derangement(batch):
    actions = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1).expand(batch, 4, 2).contiguous()
    for seed in range(10):
        out = shuffle_actions(actions, torch.Generator().manual_seed(seed))
        rows = out[:, 0, 0].long()
        assert sorted(rows.tolist()) == list(range(batch))  # a permutation of rows
        assert (rows != torch.arange(batch)).all()  # nobody keeps their own
        again = shuffle_actions(actions, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
    outs = {
        tuple(shuffle_actions(actions, torch.Generator().manual_seed(s))[:, 0, 0].tolist()) for s in range(10)
    }
    assert batch == 2 or len(outs) > 1  # the seed matters


def test_shuffle_actions_of_one_row_is_a_copy():
    actions = torch.randn(1, 5, 2)
    out = shuffle_actions(actions, torch.Generator().manual_seed(0))
    assert torch.equal(out, actions) and out.data_ptr() != actions.data_ptr()


def test_controllability_gap_sign_and_ratio():
    true = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # (B, T)
    follows = controllability_gap(true, true * 2)
    assert follows["error_true"] == pytest.approx(2.0) and follows["error_shuffled"] == pytest.approx(4.0)
    assert follows["gap"] == pytest.approx(2.0) and follows["ratio"] == pytest.approx(2.0)
    assert follows["gap_low"] < 2.0 < follows["gap_high"]
    ignores = controllability_gap(true, true.clone())
    assert ignores["gap"] == 0 and ignores["ratio"] == 1
    worse = controllability_gap(true * 2, true)
    assert worse["gap"] < 0 and worse["ratio"] < 1


# -- linear probe ----------------------------------------------------------------------------------------
def test_linear_probe_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(16, 3, generator=g)
    x_train, x_test = torch.randn(500, 16, generator=g) * 5 + 2, torch.randn(200, 16, generator=g) * 5 + 2
    y_train = x_train @ weights + 0.01 * torch.randn(500, 3, generator=g) + 10
    y_test = x_test @ weights + 0.01 * torch.randn(200, 3, generator=g) + 10
    r2, mean = linear_probe_r2(x_train, y_train, x_test, y_test)
    assert r2.shape == (3,) and (r2 > 0.99).all() and mean > 0.99


def test_linear_probe_finds_nothing_in_noise():
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(2000, 8, generator=g), torch.randn(1000, 8, generator=g)
    y_train, y_test = torch.randn(2000, 2, generator=g), torch.randn(1000, 2, generator=g)
    r2, mean = linear_probe_r2(x_train, y_train, x_test, y_test)
    assert (r2.abs() < 0.03).all() and abs(mean) < 0.03


def test_linear_probe_handles_constant_columns_and_1d_targets():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 4, generator=g), torch.ones(100, 1)], 1)  # a constant feature
    y = x[:, 0] * 3 - x[:, 1]
    r2, mean = linear_probe_r2(x[:70], y[:70], x[70:], y[70:])
    assert r2.shape == (1,) and mean > 0.99


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda: psnr(torch.zeros(2, 3), torch.zeros(2, 4)),
        lambda: psnr(torch.zeros(0, 3), torch.zeros(0, 3)),
        lambda: psnr_per_horizon(torch.zeros(2, 3, 3, 4, 4), torch.zeros(2, 2, 3, 4, 4)),
        lambda: psnr_per_horizon(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
        lambda: ssim(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5)),
        lambda: ssim_per_horizon(torch.zeros(0, 3, 3, 4, 4), torch.zeros(0, 3, 3, 4, 4)),
        lambda: mean_ci([]),
        lambda: mean_ci([1.0, 2.0], level=1.5),
        lambda: mean_ci([1.0, math.nan]),
        lambda: frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4)),
        lambda: frechet_distance(torch.zeros(0, 3), torch.zeros(5, 3)),
        lambda: frechet_distance(torch.zeros(5), torch.zeros(5)),
        lambda: shuffle_actions(torch.zeros(0, 3, 2), torch.Generator()),
        lambda: controllability_gap(torch.zeros(3), torch.zeros(4)),
        lambda: controllability_gap(torch.zeros(0), torch.zeros(0)),
        lambda: linear_probe_r2(torch.zeros(10, 3), torch.zeros(9, 1), torch.zeros(5, 3), torch.zeros(5, 1)),
        lambda: linear_probe_r2(torch.zeros(10, 3), torch.zeros(10, 1), torch.zeros(5, 4), torch.zeros(5, 1)),
        lambda: linear_probe_r2(torch.zeros(0, 3), torch.zeros(0, 1), torch.zeros(5, 3), torch.zeros(5, 1)),
    ],
)
def test_bad_input_raises_user_error(call):
    with pytest.raises(UserError):
        call()
