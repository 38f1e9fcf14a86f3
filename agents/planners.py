"""Sampling planners over action sequences, for model-predictive control in a learned world model.

Both planners search over open-loop action sequences of shape ``(horizon, A)`` in the world model's
normalised action units (bounds ``[-1, 1]`` unless ``low``/``high`` say otherwise). They only see the
sequences through a scoring function::

    score(actions: Tensor (N, H, A)) -> Tensor (N,)    # one finite score per sequence, higher is better

which typically rolls the world model out under each sequence and sums a predicted reward. Neither
planner logs or prints; every random draw comes from the ``torch.Generator`` passed in (same seed, same
plan), and all tensors live on that generator's device (CPU or CUDA). Scoring runs under
``torch.no_grad()``.

* :func:`cem` -- the cross-entropy method: sample ``population`` sequences from a diagonal Gaussian
  (a mean and a std per step and action dimension), clip them to the bounds, score them, refit the
  Gaussian to the best ``elites``, repeat. With ``noise_beta > 0``, ``momentum`` and ``keep_elites`` it
  is the improved CEM (iCEM) of Pinneri et al. (2020).
* :func:`mppi` -- model-predictive path integral control: sample perturbations around the mean with a
  fixed std, weight every sample by ``softmax(score / temperature)`` and move the mean to the weighted
  average of the samples, repeat.

Between control steps, :func:`shift_plan` warm-starts the next search from the previous plan (pass
the result as ``init_mean``). :func:`colored_noise` draws the temporally correlated sampling noise
(power spectrum ``1 / f**beta`` along the horizon) that both planners use when ``noise_beta > 0``.
:func:`with_action_cost` adds a control cost to a score (small actions win ties).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfflow_world.errors import UserError

__all__ = ["Plan", "Score", "cem", "colored_noise", "mppi", "shift_plan", "with_action_cost"]

Score = Callable[[Tensor], Tensor]
"""``score(actions (N, H, A)) -> (N,)``: one finite score per action sequence, higher is better."""


@dataclass
class Plan:
    """The result of a planner.

    Attributes:
        actions: ``(H, A)`` the sequence to execute: ``best`` for :func:`cem`, ``mean`` for :func:`mppi`.
        best: ``(H, A)`` the highest-scoring sequence among all the sequences scored.
        mean: ``(H, A)`` the sampling mean after the last iteration (the warm start for the next step).
        std: ``(H, A)`` the sampling std after the last iteration (MPPI: the fixed ``noise_std``).
        score: the score of ``best`` (not necessarily of ``actions``, which MPPI never scores).
        history: the highest score among each iteration's samples, one float per iteration.
    """

    actions: Tensor
    best: Tensor
    mean: Tensor
    std: Tensor
    score: float
    history: list[float] = field(default_factory=list)


# -- input checks -----------------------------------------------------------------------------------
def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def _nonnegative_number(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _device_and_dtype(
    generator: torch.Generator, init_mean: Tensor | None
) -> tuple[torch.device, torch.dtype]:
    if not isinstance(generator, torch.Generator):
        raise UserError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dtype = init_mean.dtype if isinstance(init_mean, Tensor) and init_mean.is_floating_point() else None
    return generator.device, dtype or torch.float32


def _bounds(
    low: Tensor | float | None,
    high: Tensor | float | None,
    action_dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The bounds as ``(A,)`` tensors on ``device``; ``None`` is -1 (low) or +1 (high)."""
    out = []
    for name, value, default in (("low", low, -1.0), ("high", high, 1.0)):
        bound = torch.as_tensor(default if value is None else value, dtype=dtype, device=device)
        if bound.dim() == 0:
            bound = bound.expand(action_dim)
        if bound.shape != (action_dim,):
            raise UserError(
                f"{name} must have shape ({action_dim},) (one bound per action dimension), "
                f"got shape {tuple(bound.shape)}"
            )
        if not torch.isfinite(bound).all():
            raise UserError(f"{name} must be finite, got {bound.tolist()}")
        out.append(bound.clone())
    if not (out[0] < out[1]).all():
        raise UserError(
            f"low must be below high in every action dimension, got low={out[0].tolist()} "
            f"high={out[1].tolist()}"
        )
    return out[0], out[1]


def _per_step(
    name: str,
    value: Tensor | float,
    horizon: int,
    action_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    positive: bool,
) -> Tensor:
    """``value`` (a number, or a tensor broadcastable to ``(H, A)``) as an ``(H, A)`` tensor."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise UserError(
            f"{name} must be a number or a tensor of shape ({horizon}, {action_dim}), got {value!r}"
        )
    tensor = torch.as_tensor(value, dtype=dtype, device=device)
    try:
        tensor = torch.broadcast_to(tensor, (horizon, action_dim)).clone()
    except RuntimeError:
        raise UserError(
            f"{name} must broadcast to shape ({horizon}, {action_dim}) (horizon, action_dim), "
            f"got shape {tuple(tensor.shape)}"
        ) from None
    if not torch.isfinite(tensor).all() or (positive and not (tensor > 0).all()):
        need = "positive and finite" if positive else "finite"
        got = value if isinstance(value, (int, float)) else f"values in [{tensor.min():g}, {tensor.max():g}]"
        raise UserError(f"{name} must be {need} everywhere, got {got}")
    return tensor


def _initial_mean(
    init_mean: Tensor | None,
    horizon: int,
    action_dim: int,
    low: Tensor,
    high: Tensor,
) -> Tensor:
    if init_mean is None:
        return ((low + high) / 2).expand(horizon, action_dim).clone()
    if not isinstance(init_mean, Tensor) or init_mean.shape != (horizon, action_dim):
        shape = tuple(init_mean.shape) if isinstance(init_mean, Tensor) else type(init_mean).__name__
        raise UserError(
            f"init_mean must be a tensor of shape ({horizon}, {action_dim}) (horizon, action_dim), "
            f"got {shape}"
        )
    if not torch.isfinite(init_mean).all():
        raise UserError("init_mean must be finite everywhere")
    return torch.minimum(torch.maximum(init_mean.to(low), low), high)


def _scores(score: Score, actions: Tensor) -> Tensor:
    """Call ``score`` on ``actions (N, H, A)`` and check that it returned ``N`` finite scores."""
    n = actions.shape[0]
    out = score(actions)
    expected = f"a tensor of shape ({n},) (one finite score per sequence, higher is better)"
    if not isinstance(out, Tensor):
        raise UserError(f"score must return {expected}, got {type(out).__name__}")
    if out.shape != (n,):
        raise UserError(
            f"score must return {expected} for actions of shape {tuple(actions.shape)}, "
            f"got shape {tuple(out.shape)}"
        )
    if not (out.is_floating_point() or out.dtype in (torch.int32, torch.int64)):
        raise UserError(f"score must return {expected}, got dtype {out.dtype}")
    out = out.to(device=actions.device, dtype=actions.dtype)
    bad = ~torch.isfinite(out)
    if bad.any():
        raise UserError(
            f"score must return {expected}, got {int(bad.sum())} non-finite values (nan or inf) out of {n}"
        )
    return out


def _noise(
    shape: tuple[int, int, int], beta: float, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    if beta == 0:
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return colored_noise(shape, beta, generator, dtype=dtype)


# -- public functions -------------------------------------------------------------------------------
def colored_noise(
    shape: tuple[int, int, int],
    beta: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian noise of ``shape (N, H, A)`` with power spectrum ``1 / f**beta`` along the time axis ``H``.

    ``beta = 0`` is white noise; ``beta = 1`` pink; ``beta = 2`` red (Brownian-like, neighbouring steps
    strongly correlated). Each of the ``N * A`` series is drawn independently: complex Gaussian Fourier
    coefficients scaled by ``f**(-beta / 2)`` (the zero frequency is given the lowest nonzero frequency
    ``1 / H``), inverse real FFT over ``H``. The result is divided by its exact standard deviation, so
    every step has unit variance in expectation (no per-sample normalisation: the mean of a sequence is
    random too, which lets a planner shift whole sequences). Drawn from ``generator`` on its device.
    """
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
        raise UserError(f"shape must be three positive integers (N, H, A), got {shape!r}")
    beta = _nonnegative_number("noise_beta", beta)
    n, horizon, action_dim = shape
    device = generator.device
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = torch.fft.rfftfreq(horizon, device=device, dtype=work)
    freqs[0] = 1.0 / horizon
    scale = freqs ** (-beta / 2.0)
    # irfft ignores the imaginary part at f = 0 and (for even H) at the Nyquist frequency; every other
    # coefficient appears twice (with its conjugate). Variance of a step: sum of the weights below / H^2.
    weight = torch.full_like(scale, 4.0)
    weight[0] = 1.0
    if horizon % 2 == 0 and horizon > 1:
        weight[-1] = 1.0
    sigma = torch.sqrt((weight * scale**2).sum()) / horizon
    size = (n, len(freqs), action_dim)
    real = torch.randn(size, generator=generator, device=device, dtype=work)
    imag = torch.randn(size, generator=generator, device=device, dtype=work)
    spectrum = torch.complex(real, imag) * scale[None, :, None]
    signal = torch.fft.irfft(spectrum, n=horizon, dim=1) / sigma
    return signal.to(dtype)


def shift_plan(mean: Tensor, steps: int = 1, fill: float | Tensor | None = 0.0) -> Tensor:
    """Warm start: the plan ``mean (H, A)`` after executing its first ``steps`` actions, as ``(H, A)``.

    Row ``t`` of the result is row ``t + steps`` of ``mean``; the last ``steps`` rows are ``fill`` (a
    number, or an ``(A,)`` tensor), or repeat the last action of ``mean`` when ``fill`` is ``None``.
    ``steps = 0`` returns a copy; ``steps >= H`` fills everything. The input is not modified.
    """
    if not isinstance(mean, Tensor) or mean.dim() != 2:
        shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
        raise UserError(f"mean must be a tensor of shape (horizon, action_dim), got {shape}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UserError(f"steps must be an integer >= 0, got {steps!r}")
    horizon, action_dim = mean.shape
    steps = min(steps, horizon)
    if fill is None:
        tail = mean[-1]
    else:
        tail = torch.as_tensor(fill, dtype=mean.dtype, device=mean.device)
        if tail.dim() > 1 or (tail.dim() == 1 and tail.shape != (action_dim,)):
            raise UserError(
                f"fill must be a number, None or a tensor of shape ({action_dim},), "
                f"got shape {tuple(tail.shape)}"
            )
    out = torch.empty_like(mean)
    out[: horizon - steps] = mean[steps:]
    out[horizon - steps :] = tail
    return out


def with_action_cost(score: Score, weight: float) -> Score:
    """``score`` minus a control cost: ``weight * sum over steps and dimensions of actions**2``
    (normalised units), so that between sequences the score cannot tell apart, the gentler one wins.

    Near a target, where every candidate scores about the same and the winner is decided by noise
    in the imagined frames, the cost prefers small actions (holding still) over the random torques
    of a lucky candidate. ``weight = 0`` returns ``score`` itself.
    """
    weight = _nonnegative_number("weight", weight)
    if weight == 0:
        return score

    def penalised(actions: Tensor) -> Tensor:
        return score(actions) - weight * actions.pow(2).sum(dim=(1, 2)).to(actions.dtype)

    return penalised


@torch.no_grad()
def _search_start(generator, init_mean, low, high, horizon: int, action_dim: int, std_name: str, std):
    """Checked bounds ``(A,)``, the starting mean ``(H, A)`` and std ``(H, A)`` of a search, on the
    generator's device."""
    device, dtype = _device_and_dtype(generator, init_mean)
    low, high = _bounds(low, high, action_dim, device, dtype)
    mean = _initial_mean(init_mean, horizon, action_dim, low, high)
    return low, high, mean, _per_step(std_name, std, horizon, action_dim, device, dtype, positive=True)


def cem(
    score: Score,
    horizon: int,
    action_dim: int,
    *,
    population: int,
    elites: int,
    iterations: int,
    generator: torch.Generator,
    init_mean: Tensor | None = None,
    init_std: float | Tensor = 1.0,
    low: Tensor | float | None = None,
    high: Tensor | float | None = None,
    momentum: float = 0.0,
    noise_beta: float = 0.0,
    min_std: float = 0.05,
    keep_elites: int = 0,
) -> Plan:
    """Cross-entropy method over action sequences ``(horizon, action_dim)``.

    Each iteration draws ``population`` sequences ``mean + std * noise`` (white noise, or
    :func:`colored_noise` with exponent ``noise_beta``), clips them to ``[low, high]``, scores them with
    ``score (N, H, A) -> (N,)`` (higher is better) and refits the Gaussian to the ``elites`` best:
    ``mean <- momentum * mean + (1 - momentum) * elite_mean``, likewise for the std (population std of
    the elites), then ``std >= min_std``. With ``keep_elites = k > 0`` the ``k`` best sequences of an
    iteration replace the last ``k`` fresh samples of the next one, so every ``score`` call sees exactly
    ``population`` sequences.

    Args:
        score: ``(N, H, A) -> (N,)`` finite scores, higher is better.
        horizon, action_dim: the shape ``(H, A)`` of a sequence.
        population: sequences per iteration. elites: how many of them refit the Gaussian, in
            ``[1, population]``. iterations: rounds of sampling and refitting.
        generator: source of every random draw; all tensors live on its device.
        init_mean: ``(H, A)`` starting mean (e.g. :func:`shift_plan` of the previous plan), clipped to the
            bounds; default the middle of the bounds (0 for ``[-1, 1]``).
        init_std: starting std, a positive number or a tensor broadcastable to ``(H, A)``.
        low, high: bounds, numbers or ``(A,)`` tensors; default -1 and 1.
        momentum: in ``[0, 1)``, the weight of the old mean/std in each refit.
        noise_beta: ``>= 0``, the coloured-noise exponent (0 white, 2 strongly correlated in time).
        min_std: ``>= 0``, a floor on the std after each refit (keeps exploring).
        keep_elites: in ``[0, elites]`` and below ``population``.

    Returns:
        A :class:`Plan` whose ``actions`` is ``best``, the highest-scoring sequence found in any
        iteration (``score`` is its score); ``mean``/``std`` are the final Gaussian.
    """
    horizon = _positive_int("horizon", horizon)
    action_dim = _positive_int("action_dim", action_dim)
    population = _positive_int("population", population)
    iterations = _positive_int("iterations", iterations)
    if isinstance(elites, bool) or not isinstance(elites, int) or not 1 <= elites <= population:
        raise UserError(f"elites must be an integer in [1, population={population}], got {elites!r}")
    if (
        isinstance(keep_elites, bool)
        or not isinstance(keep_elites, int)
        or not 0 <= keep_elites <= elites
        or keep_elites >= population
    ):
        raise UserError(
            f"keep_elites must be an integer in [0, elites={elites}] and below "
            f"population={population}, got {keep_elites!r}"
        )
    momentum = _nonnegative_number("momentum", momentum)
    if momentum >= 1:
        raise UserError(f"momentum must be in [0, 1), got {momentum!r}")
    noise_beta = _nonnegative_number("noise_beta", noise_beta)
    min_std = _nonnegative_number("min_std", min_std)
    low, high, mean, std = _search_start(
        generator, init_mean, low, high, horizon, action_dim, "init_std", init_std
    )

    best, best_score = mean.clone(), -math.inf
    kept: Tensor | None = None
    history: list[float] = []
    for _ in range(iterations):
        noise = _noise((population, horizon, action_dim), noise_beta, generator, mean.dtype)
        samples = torch.minimum(torch.maximum(mean + std * noise, low), high)
        if kept is not None:
            samples[population - len(kept) :] = kept
        scores = _scores(score, samples)
        top = torch.topk(scores, elites).indices
        elite = samples[top]
        mean = momentum * mean + (1 - momentum) * elite.mean(0)
        std = (momentum * std + (1 - momentum) * elite.std(0, unbiased=False)).clamp_min(min_std)
        kept = elite[:keep_elites].clone() if keep_elites else None
        top_score = float(scores[top[0]])
        history.append(top_score)
        if top_score > best_score:
            best, best_score = samples[top[0]].clone(), top_score
    return Plan(actions=best, best=best, mean=mean, std=std, score=best_score, history=history)


@torch.no_grad()
def mppi(
    score: Score,
    horizon: int,
    action_dim: int,
    *,
    population: int,
    iterations: int,
    temperature: float,
    noise_std: float | Tensor,
    generator: torch.Generator,
    init_mean: Tensor | None = None,
    low: Tensor | float | None = None,
    high: Tensor | float | None = None,
    noise_beta: float = 0.0,
) -> Plan:
    """Model-predictive path integral control over action sequences ``(horizon, action_dim)``.

    Each iteration draws ``population`` sequences ``mean + noise_std * noise`` (white noise, or
    :func:`colored_noise` with exponent ``noise_beta``), clips them to ``[low, high]``, scores them with
    ``score (N, H, A) -> (N,)`` (higher is better) and sets the mean to the average of the samples
    weighted by ``softmax(score / temperature)``. A small temperature approaches "take the best
    sample"; a large one, the plain average. The std stays ``noise_std``.

    Args:
        score: ``(N, H, A) -> (N,)`` finite scores, higher is better.
        horizon, action_dim: the shape ``(H, A)`` of a sequence.
        population: sequences per iteration. iterations: rounds of sampling and averaging.
        temperature: ``> 0``, in the units of the score.
        noise_std: the sampling std, a positive number or a tensor broadcastable to ``(H, A)``.
        generator: source of every random draw; all tensors live on its device.
        init_mean: ``(H, A)`` starting mean (e.g. :func:`shift_plan` of the previous plan), clipped to the
            bounds; default the middle of the bounds (0 for ``[-1, 1]``).
        low, high: bounds, numbers or ``(A,)`` tensors; default -1 and 1.
        noise_beta: ``>= 0``, the coloured-noise exponent (0 white, 2 strongly correlated in time).

    Returns:
        A :class:`Plan` whose ``actions`` is ``mean``, the final weighted average (within the bounds, as
        an average of clipped samples); ``best`` is the highest-scoring sample and ``score`` its score.
    """
    horizon = _positive_int("horizon", horizon)
    action_dim = _positive_int("action_dim", action_dim)
    population = _positive_int("population", population)
    iterations = _positive_int("iterations", iterations)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise UserError(f"temperature must be a positive finite number, got {temperature!r}")
    noise_beta = _nonnegative_number("noise_beta", noise_beta)
    low, high, mean, std = _search_start(
        generator, init_mean, low, high, horizon, action_dim, "noise_std", noise_std
    )

    best, best_score = mean.clone(), -math.inf
    history: list[float] = []
    for _ in range(iterations):
        noise = _noise((population, horizon, action_dim), noise_beta, generator, mean.dtype)
        samples = torch.minimum(torch.maximum(mean + std * noise, low), high)
        scores = _scores(score, samples)
        weights = torch.softmax(scores / temperature, dim=0)
        mean = torch.einsum("n,nha->ha", weights, samples)
        top = int(torch.argmax(scores))
        top_score = float(scores[top])
        history.append(top_score)
        if top_score > best_score:
            best, best_score = samples[top].clone(), top_score
    return Plan(actions=mean, best=best, mean=mean, std=std, score=best_score, history=history)
