"""Offline metrics for imagined video against simulator ground truth (docs/evaluation.md).

Everything here is a pure function of tensors: no downloaded weights, no global state, no logging.
Frames are float in [-1, 1] shaped ``(B, C, H, W)`` (images) or ``(B, T, C, H, W)`` (videos);
``real`` is the simulator's video and ``imagined`` the world model's, from the same start state and
the same actions.

- :func:`psnr`, :func:`psnr_per_horizon`: peak signal-to-noise ratio in dB, peak = the full [-1, 1]
  range, capped at :data:`MAX_PSNR_DB` for identical frames.
- :func:`ssim`, :func:`ssim_per_horizon`: structural similarity (Wang et al. 2004).
- :func:`mean_ci`: mean and confidence interval over episodes.
- :func:`frechet_distance`: distance between Gaussian fits of two sets of vectors (e.g. probed
  state trajectories), in the vectors' own units squared.
- :func:`shuffle_actions`, :func:`controllability_gap`: does the model follow its actions?
- :func:`linear_probe_r2`: how linearly the model's features encode the physics state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from selfflow_world.errors import UserError

MSE_FLOOR = 1e-10
"""Smallest mean squared error (in [0, 1] units) PSNR uses, so identical frames score a finite value."""
MAX_PSNR_DB = 10 * math.log10(1 / MSE_FLOOR)
"""PSNR of identical frames: 100 dB."""
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, ndim: int, what: str) -> None:
    if a.shape != b.shape:
        raise UserError(
            f"{what}: both inputs must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.ndim != ndim:
        raise UserError(f"{what}: expected {ndim}-D inputs, got shape {tuple(a.shape)}")
    if a.numel() == 0:
        raise UserError(f"{what}: inputs are empty (shape {tuple(a.shape)}); give at least one element")


# -- pixel metrics -----------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per leading index between frames in [-1, 1]: ``(B, ...)`` -> ``(B,)``.

    ``10 * log10(1 / mse)`` with the error measured in [0, 1] units (half the [-1, 1] difference),
    so a constant offset of ``d`` in [-1, 1] units scores ``10 * log10(4 / d**2)``. Identical inputs
    score :data:`MAX_PSNR_DB` (100 dB) instead of infinity.
    """
    if a.shape != b.shape or a.ndim < 1 or a.numel() == 0:
        raise UserError(
            f"psnr: inputs must be non-empty with equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    mse = (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).mean(1) / 4.0  # (B,) in [0, 1] units
    return 10 * torch.log10(1.0 / mse.clamp(min=MSE_FLOOR))


def psnr_per_horizon(real: torch.Tensor, imagined: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of every frame: videos ``(B, T, C, H, W)`` in [-1, 1] -> ``(B, T)``."""
    _check_pair(real, imagined, 5, "psnr_per_horizon")
    b, t = real.shape[:2]
    return psnr(real.flatten(0, 1), imagined.flatten(0, 1)).view(b, t)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps: ``(size,)``."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image: ``(B, C, H, W)`` frames in [-1, 1] -> ``(B,)`` in [-1, 1] (1 = identical).

    The standard definition (Wang et al. 2004): frames are mapped to [0, 1] (data range 1), a
    Gaussian window of 11 taps with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, computed per channel
    with valid (unpadded) filtering, averaged over positions and channels. Frames smaller than the
    window (under 11 pixels a side) use the largest odd window that fits, with the same sigma; a
    16x16 frame takes the full 11-tap window and averages a 6x6 map.
    """
    _check_pair(a, b, 4, "ssim")
    c, h, w = a.shape[1:]
    size = min(SSIM_WINDOW, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise UserError(f"ssim: frames must be at least 1x1, got {h}x{w}")
    x = (a.float() + 1) / 2  # (B, C, H, W) in [0, 1]
    y = (b.float() + 1) / 2
    g = _gaussian_window(size, SSIM_SIGMA, x.dtype, x.device)
    gh = g.view(1, 1, size, 1).expand(c, 1, size, 1)  # separable: one pass down, one across
    gw = g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(z: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H-size+1, W-size+1)
        return F.conv2d(F.conv2d(z, gh, groups=c), gw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def ssim_per_horizon(real: torch.Tensor, imagined: torch.Tensor) -> torch.Tensor:
    """SSIM of every frame: videos ``(B, T, C, H, W)`` in [-1, 1] -> ``(B, T)``."""
    _check_pair(real, imagined, 5, "ssim_per_horizon")
    b, t = real.shape[:2]
    return ssim(real.flatten(0, 1), imagined.flatten(0, 1)).view(b, t)


# -- statistics --------------------------------------------------------------------------------------
def _t_quantile(q: float, dof: int) -> float:
    """Quantile ``q`` of Student's t with ``dof`` degrees of freedom (normal quantile without scipy)."""
    try:
        from scipy import stats
    except ImportError:  # scipy comes with dm-control; the normal quantile is a close fallback for n >= 30
        from statistics import NormalDist

        return NormalDist().inv_cdf(q)
    return float(stats.t.ppf(q, dof))


def mean_ci(
    values: torch.Tensor | np.ndarray | Sequence[float], level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and two-sided confidence interval of the mean: ``(N,)`` values, one per episode.

    Student-t interval ``mean +- t_{(1+level)/2, N-1} * s / sqrt(N)`` (``s`` the sample standard
    deviation), which is right for the few episodes an evaluation has; if scipy is missing the normal
    quantile replaces the t quantile. One value gives ``(value, nan, nan)``: no interval exists.
    Returns ``(mean, low, high)`` as floats.
    """
    if isinstance(values, torch.Tensor):
        x = values.detach().double().cpu()
    else:
        x = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if x.ndim != 1 or x.numel() == 0:
        raise UserError(
            f"mean_ci: values must be a non-empty 1-D sequence (one per episode), got shape {tuple(x.shape)}"
        )
    if not 0 < level < 1:
        raise UserError(f"mean_ci: level must be in (0, 1), got {level!r}")
    if not torch.isfinite(x).all():
        raise UserError("mean_ci: values must be finite (no nan or inf)")
    n = x.numel()
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan
    half = _t_quantile((1 + level) / 2, n - 1) * float(x.std(unbiased=True)) / math.sqrt(n)
    return mean, mean - half, mean + half


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix ``(D, D)`` (eigenvalues
    below zero from rounding are clipped)."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two sets: ``(N, D)`` and ``(M, D)`` -> float >= 0.

    ``||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^(1/2))`` with sample means and
    (unbiased) covariances, in the vectors' units squared. Trailing dimensions are flattened, so
    ``(N, T, S)`` trajectories compare as ``(N, T*S)`` vectors. Computed in float64 with
    ``tr((S_x S_y)^(1/2)) = tr((S_x^(1/2) S_y S_x^(1/2))^(1/2))``: a symmetric PSD matrix, so
    eigendecompositions suffice and singular covariances (N <= D) are safe. Same set -> ~0.
    """
    if x.ndim < 2 or y.ndim < 2:
        raise UserError(
            f"frechet_distance: inputs must be (N, D) sets of vectors, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x = x.detach().double().flatten(1)
    y = y.detach().double().flatten(1).to(x.device)
    if x.shape[1] != y.shape[1]:
        raise UserError(
            f"frechet_distance: both sets need the same dimension D, got {x.shape[1]} and {y.shape[1]}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] == 0:
        raise UserError(
            f"frechet_distance: each set needs at least 2 vectors of dimension >= 1, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)  # (D, D)
    root_x = _sqrtm_psd(cov_x)
    cross = torch.linalg.eigvalsh(root_x @ cov_y @ root_x).clamp(min=0).sqrt().sum()
    dist = (mu_x - mu_y).pow(2).sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * cross
    return max(float(dist), 0.0)


# -- controllability ---------------------------------------------------------------------------------
def shuffle_actions(actions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Give every row another row's action sequence: ``(B, T, A)`` -> ``(B, T, A)``.

    The rows are permuted by a uniformly drawn derangement (rejection sampling with ``generator``),
    so for ``B >= 2`` no row keeps its own actions; ``B = 1`` has nothing to swap and returns a copy.
    Same generator state, same permutation.
    """
    if actions.ndim < 1 or actions.shape[0] == 0:
        raise UserError(
            f"shuffle_actions: actions must be (B, T, A) with B >= 1, got shape {tuple(actions.shape)}"
        )
    b = actions.shape[0]
    if b == 1:
        return actions.clone()
    identity = torch.arange(b, device=generator.device)
    while True:  # a random permutation is a derangement with probability ~1/e
        perm = torch.randperm(b, generator=generator, device=generator.device)
        if not (perm == identity).any():
            return actions[perm.to(actions.device)]


def controllability_gap(
    err_true: torch.Tensor, err_shuffled: torch.Tensor, level: float = 0.95
) -> dict[str, float]:
    """Error with the true actions vs with shuffled ones, from the same contexts (lower error = better).

    ``err_true`` and ``err_shuffled``: ``(B, ...)`` errors of the same examples (any trailing dims,
    e.g. horizon, are averaged per example first). Returns floats: ``error_true``,
    ``error_shuffled`` (means), ``gap = error_shuffled - error_true`` (> 0: the model follows its
    actions; ~0: it ignores them), ``ratio = error_shuffled / error_true`` (inf if the true error is 0),
    and ``gap_low``, ``gap_high``: the :func:`mean_ci` interval of the paired per-example gap.
    """
    if err_true.shape != err_shuffled.shape or err_true.ndim < 1 or err_true.numel() == 0:
        raise UserError(
            "controllability_gap: errors must be non-empty with equal shapes (B, ...), "
            f"got {tuple(err_true.shape)} and {tuple(err_shuffled.shape)}"
        )
    per_true = err_true.detach().double().reshape(err_true.shape[0], -1).mean(1).cpu()  # (B,)
    per_shuffled = err_shuffled.detach().double().reshape(err_shuffled.shape[0], -1).mean(1).cpu()
    true, shuffled = float(per_true.mean()), float(per_shuffled.mean())
    gap, low, high = mean_ci(per_shuffled - per_true, level)
    if true > 0:
        ratio = shuffled / true
    else:
        ratio = math.inf if shuffled > 0 else math.nan
    return {
        "error_true": true,
        "error_shuffled": shuffled,
        "gap": gap,
        "ratio": ratio,
        "gap_low": low,
        "gap_high": high,
    }


# -- representation quality -------------------------------------------------------------------------
def _as_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double()
    if t.ndim == 1:
        t = t.unsqueeze(1)
    if t.ndim != 2:
        raise UserError(f"linear_probe_r2: {name} must be (N, D) or (N,), got shape {tuple(t.shape)}")
    return t


def linear_probe_r2(
    features_train: torch.Tensor,
    y_train: torch.Tensor,
    features_test: torch.Tensor,
    y_test: torch.Tensor,
    ridge: float = 1e-3,
) -> tuple[torch.Tensor, float]:
    """Held-out R^2 of a closed-form ridge regression from features to targets.

    Features ``(N, D)`` and targets ``(N, K)`` (or ``(N,)``) for train and test. Features and targets
    are standardised with the training mean and std (constant columns become zero); the weights
    solve ``(X^T X / N + ridge * I) W = X^T Y / N`` in float64, so ``ridge`` does not depend on N or
    on the feature scale. Returns ``(r2, mean)``: ``r2`` of shape ``(K,)`` is
    ``1 - SS_res / SS_tot`` on the test set (1 = perfect, ~0 = no better than the mean, < 0 worse;
    nan for a target constant on the test set), ``mean`` its mean over targets (nans skipped).
    """
    xtr, ytr = _as_2d("features_train", features_train), _as_2d("y_train", y_train)
    xte = _as_2d("features_test", features_test).to(xtr.device)
    yte = _as_2d("y_test", y_test).to(xtr.device)
    ytr = ytr.to(xtr.device)
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise UserError(
            "linear_probe_r2: features and targets need the same number of rows, got "
            f"train {xtr.shape[0]} vs {ytr.shape[0]}, test {xte.shape[0]} vs {yte.shape[0]}"
        )
    if xtr.shape[1] != xte.shape[1] or ytr.shape[1] != yte.shape[1]:
        raise UserError(
            "linear_probe_r2: train and test need the same feature and target dimensions, got "
            f"features {xtr.shape[1]} vs {xte.shape[1]}, targets {ytr.shape[1]} vs {yte.shape[1]}"
        )
    if xtr.shape[0] < 2 or xte.shape[0] < 2 or xtr.shape[1] == 0 or ytr.shape[1] == 0:
        raise UserError(
            "linear_probe_r2: train and test need at least 2 rows each and at least 1 feature and target"
        )
    if ridge < 0:
        raise UserError(f"linear_probe_r2: ridge must be >= 0, got {ridge!r}")
    x_mean, x_std = xtr.mean(0), xtr.std(0)
    x_std = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
    y_mean, y_std = ytr.mean(0), ytr.std(0)
    y_std = torch.where(y_std > 0, y_std, torch.ones_like(y_std))
    xs, ys = (xtr - x_mean) / x_std, (ytr - y_mean) / y_std  # (N, D), (N, K)
    n, d = xs.shape
    gram = xs.T @ xs / n + ridge * torch.eye(d, dtype=xs.dtype, device=xs.device)  # (D, D)
    rhs = xs.T @ ys / n  # (D, K)
    weights = torch.linalg.solve(gram, rhs) if ridge > 0 else torch.linalg.pinv(gram, hermitian=True) @ rhs
    pred = ((xte - x_mean) / x_std) @ weights * y_std + y_mean  # (N_test, K)
    ss_res = (yte - pred).pow(2).sum(0)
    ss_tot = (yte - yte.mean(0)).pow(2).sum(0)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp(min=1e-300), torch.full_like(ss_tot, math.nan))
    finite = r2[~torch.isnan(r2)]
    mean = float(finite.mean()) if finite.numel() else math.nan
    return r2.float().cpu(), mean
