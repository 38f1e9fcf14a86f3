"""Sampling planners (CEM, MPPI) on known concave quadratics, the warm start, the coloured noise, and
the refusal of bad input. Everything is tiny: a few hundred sequences of 5 steps, about a second."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from selfflow_world.agents import Plan, cem, colored_noise, mppi, shift_plan, with_action_cost
from selfflow_world.errors import UserError

H, A = 5, 2
# A fixed optimum inside (-0.8, 0.8): one row per step.
TARGET = torch.tensor([[0.5, -0.3], [0.1, 0.7], [-0.6, 0.2], [0.3, 0.3], [-0.2, -0.7]])


def quadratic(target: torch.Tensor):
    """score(a) = -sum over steps and dims of (a - target)^2: concave, maximum 0 at ``target``."""
    return lambda actions: -((actions - target) ** 2).sum(dim=(1, 2))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_cem(score=None, seed: int = 0, **overrides) -> Plan:
    score = quadratic(TARGET) if score is None else score
    kwargs = dict(population=64, elites=8, iterations=10, generator=gen(seed)) | overrides
    return cem(score, H, A, **kwargs)


def run_mppi(score=None, seed: int = 0, **overrides) -> Plan:
    score = quadratic(TARGET) if score is None else score
    kwargs = (
        dict(population=128, iterations=12, temperature=0.1, noise_std=0.3, generator=gen(seed)) | overrides
    )
    return mppi(score, H, A, **kwargs)


# -- finding a known optimum ------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"momentum": 0.1, "keep_elites": 2}, {"noise_beta": 1.0}])
def test_cem_finds_the_optimum_of_a_quadratic(options):
    plan = run_cem(**options)
    assert plan.actions.shape == plan.best.shape == plan.mean.shape == plan.std.shape == (H, A)
    assert torch.equal(plan.actions, plan.best)  # CEM executes the best sequence found
    assert (plan.mean - TARGET).abs().max() < 0.1
    assert (plan.best - TARGET).abs().max() < 0.15
    assert len(plan.history) == 10 and plan.score == max(plan.history)
    assert plan.score == pytest.approx(float(quadratic(TARGET)(plan.best[None])[0]))
    assert plan.history[-1] > plan.history[0]
    assert (plan.std >= 0.05 - 1e-6).all()  # min_std floor


def test_mppi_finds_the_optimum_of_a_quadratic():
    plan = run_mppi()
    assert plan.actions.shape == plan.best.shape == (H, A)
    assert torch.equal(plan.actions, plan.mean)  # MPPI executes the weighted mean
    assert (plan.mean - TARGET).abs().max() < 0.15
    assert torch.allclose(plan.std, torch.full((H, A), 0.3))
    assert len(plan.history) == 12 and plan.score == max(plan.history)
    assert plan.history[-1] > plan.history[0]


@pytest.mark.parametrize(
    ("low", "high", "corner"),
    [(None, None, [1.0, -1.0]), (torch.tensor([-0.5, -0.2]), torch.tensor([0.4, 0.3]), [0.4, -0.2])],
)
def test_an_optimum_outside_the_bounds_gives_a_plan_on_the_bound(low, high, corner):
    target = torch.tensor([1.6, -2.0]).expand(H, A)  # beyond high in dim 0, below low in dim 1
    corner = torch.tensor(corner).expand(H, A)
    seen = []

    def score(actions):
        seen.append(actions)
        return quadratic(target)(actions)

    # the search starts in the middle of the bounds, away from the corner: more iterations than inside
    plans = (
        run_cem(score, low=low, high=high, iterations=20),
        run_mppi(score, low=low, high=high, noise_std=0.2, iterations=15),
    )
    for plan in plans:
        assert (plan.actions - corner).abs().mean() < 0.03
        assert (plan.actions - corner).abs().max() < 0.1
    samples = torch.cat(seen)  # every scored sample is within the bounds
    lo, hi = (-torch.ones(A), torch.ones(A)) if low is None else (low, high)
    assert (samples >= lo).all() and (samples <= hi).all()
    assert (samples == hi[0]).any()  # and clipping put samples exactly on the bound


# -- warm start ------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", [run_cem, partial(run_mppi, temperature=0.2)])
def test_an_action_cost_moves_the_optimum_towards_zero_and_decides_a_flat_score(run):
    # -(a - t)^2 - w a^2 peaks at a = t / (1 + w); MPPI's temperature doubles with the score's curvature
    plan = run(with_action_cost(quadratic(TARGET), 1.0))
    assert (plan.mean - TARGET / 2).abs().max() < 0.15
    # a score that cannot tell sequences apart: the cost alone picks the gentlest one
    flat = run(
        with_action_cost(lambda actions: torch.zeros(actions.shape[0]), 1.0),
        init_mean=torch.full((H, A), 0.6),
    )
    assert flat.mean.abs().max() < 0.15
    scored = torch.rand(4, H, A)
    assert torch.allclose(
        with_action_cost(quadratic(TARGET), 0.5)(scored),
        quadratic(TARGET)(scored) - 0.5 * scored.pow(2).sum((1, 2)),
    )


def test_a_zero_action_cost_is_the_score_itself_and_a_negative_one_is_refused():
    score = quadratic(TARGET)
    assert with_action_cost(score, 0.0) is score
    with pytest.raises(UserError, match="weight must be a finite number >= 0"):
        with_action_cost(score, -1.0)


def test_shift_plan_shifts_and_fills():
    plan = torch.arange(10.0).reshape(5, 2)
    before = plan.clone()
    shifted = shift_plan(plan)
    assert torch.equal(shifted[:4], plan[1:]) and torch.equal(shifted[4], torch.zeros(2))
    assert torch.equal(plan, before)  # input untouched
    two = shift_plan(plan, steps=2, fill=None)  # repeat the last action
    assert torch.equal(two[:3], plan[2:]) and torch.equal(two[3:], plan[-1].expand(2, 2))
    vector = shift_plan(plan, steps=1, fill=torch.tensor([7.0, -7.0]))
    assert torch.equal(vector[4], torch.tensor([7.0, -7.0]))
    assert torch.equal(shift_plan(plan, steps=0), plan)
    assert torch.equal(shift_plan(plan, steps=9, fill=0.5), torch.full((5, 2), 0.5))
    with pytest.raises(UserError, match="steps"):
        shift_plan(plan, steps=-1)


def test_warm_start_from_a_shifted_plan_is_good_after_one_iteration():
    first = run_cem(iterations=8)
    # the optimum moves with time: the next step's optimum is the old one shifted, last row repeated
    next_target = shift_plan(TARGET, fill=None)
    warm = run_cem(
        quadratic(next_target), iterations=1, init_mean=shift_plan(first.mean, fill=None), init_std=0.1
    )
    cold = run_cem(quadratic(next_target), iterations=1)
    assert warm.score > cold.score


def test_init_mean_near_the_optimum_needs_fewer_iterations():
    near = TARGET + 0.05
    for run in (run_cem, run_mppi):
        warm, cold = run(iterations=1, init_mean=near), run(iterations=1)
        assert warm.history[0] > cold.history[0]
        assert warm.score > cold.score


# -- reproducibility -------------------------------------------------------------------------------
@pytest.mark.parametrize("run", [run_cem, run_mppi])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_same_seed_same_plan_different_seed_different_samples(run, beta):
    def recorded(store):
        def score(actions):
            store.append(actions.clone())
            return quadratic(TARGET)(actions)

        return score

    a, b, c = [], [], []
    plan_a = run(recorded(a), seed=3, iterations=3, noise_beta=beta)
    plan_b = run(recorded(b), seed=3, iterations=3, noise_beta=beta)
    plan_c = run(recorded(c), seed=4, iterations=3, noise_beta=beta)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(plan_a.actions, plan_b.actions) and torch.equal(plan_a.mean, plan_b.mean)
    assert plan_a.history == plan_b.history
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(plan_a.actions, plan_c.actions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_planners_run_on_the_generators_device():
    cuda = torch.Generator(device="cuda").manual_seed(0)
    target = TARGET.cuda()
    plan = cem(
        quadratic(target), H, A, population=64, elites=8, iterations=10, generator=cuda, noise_beta=2.0
    )
    assert plan.actions.is_cuda and plan.mean.is_cuda and (plan.mean - target).abs().max() < 0.2
    plan = mppi(
        quadratic(target),
        H,
        A,
        population=128,
        iterations=12,
        temperature=0.1,
        noise_std=0.3,
        generator=torch.Generator(device="cuda").manual_seed(0),
    )
    assert plan.actions.is_cuda and (plan.mean - target).abs().max() < 0.15
    assert colored_noise((4, H, A), 2.0, torch.Generator(device="cuda").manual_seed(0)).is_cuda


# -- coloured noise --------------------------------------------------------------------------------
def lag_one_correlation(x: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x[:, :-1].flatten(), x[:, 1:].flatten()]))[0, 1])


@pytest.mark.parametrize("horizon", [16, 15])
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_colored_noise_has_unit_variance_per_step(beta, horizon):
    x = colored_noise((4000, horizon, 2), beta, gen(0))
    assert x.shape == (4000, horizon, 2) and x.dtype == torch.float32
    variance = x.var(dim=(0, 2))  # one variance per step
    assert torch.allclose(variance, torch.ones(horizon), atol=0.08)
    assert abs(float(x.mean())) < 0.05


def test_colored_noise_beta_two_is_correlated_beta_zero_is_not():
    assert lag_one_correlation(colored_noise((2000, 16, 2), 2.0, gen(0))) > 0.5
    assert abs(lag_one_correlation(colored_noise((2000, 16, 2), 0.0, gen(0)))) < 0.05
    one_step = colored_noise((10, 1, 3), 2.0, gen(0))  # a horizon of 1 is fine
    assert one_step.shape == (10, 1, 3) and torch.isfinite(one_step).all()
    assert torch.equal(colored_noise((3, 8, 2), 2.0, gen(5)), colored_noise((3, 8, 2), 2.0, gen(5)))


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"horizon": 0}, "horizon"),
        ({"population": 0}, "population"),
        ({"iterations": -1}, "iterations"),
        ({"elites": 0}, "elites"),
        ({"elites": 65}, "elites"),
        ({"keep_elites": 9}, "keep_elites"),
        ({"momentum": 1.0}, "momentum"),
        ({"init_std": 0.0}, "init_std"),
        ({"noise_beta": -1.0}, "noise_beta"),
        ({"init_mean": torch.zeros(4, A)}, "init_mean"),
        ({"low": torch.zeros(3)}, "low"),
        ({"low": 0.5, "high": 0.1}, "low must be below high"),
    ],
)
def test_cem_refuses_bad_input_naming_the_argument(overrides, name):
    horizon = overrides.pop("horizon", H)
    kwargs = dict(population=64, elites=8, iterations=2, generator=gen()) | overrides
    with pytest.raises(UserError, match=name):
        cem(quadratic(TARGET), horizon, A, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"population": 0}, "population"),
        ({"iterations": 0}, "iterations"),
        ({"noise_std": 0.0}, "noise_std"),
        ({"noise_std": torch.ones(3, 3)}, "noise_std"),
        ({"generator": 0}, "generator"),
    ],
)
def test_mppi_refuses_bad_input_naming_the_argument(overrides, name):
    with pytest.raises(UserError, match=name):
        run_mppi(**({"iterations": 2} | overrides))


@pytest.mark.parametrize("run", [run_cem, run_mppi])
def test_a_score_of_the_wrong_shape_or_non_finite_is_refused(run):
    with pytest.raises(UserError, match=r"shape \(64,\)|shape \(128,\)") as info:
        run(lambda actions: -(actions**2).sum(dim=2), iterations=1)  # (N, H) instead of (N,)
    assert "got shape" in str(info.value)
    with pytest.raises(UserError, match="got float"):
        run(lambda actions: 1.0, iterations=1)
    with pytest.raises(UserError, match="non-finite"):
        run(lambda actions: torch.full((actions.shape[0],), float("nan")), iterations=1)
