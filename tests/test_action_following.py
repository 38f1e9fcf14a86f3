"""Action following: the loss weighting, the action conditioning, the sensitivity figures, and a
synthetic world where only the action decides the next frame."""

from __future__ import annotations

import math

import pytest
import torch

from selfflow_world.action_following import action_sensitivity, following_ratio
from selfflow_world.conditioning import FEATURES, Conditioning, action_features, action_frequencies
from selfflow_world.config import load_config
from selfflow_world.model import WorldDiT, model_config, shift_frames
from selfflow_world.objective import ObjectiveConfig, compute_loss, flow_error, sample_times
from selfflow_world.sampler import renoise, rollout
from selfflow_world.train import TrainConfig

A = 2


def tiny(seed: int = 0, **overrides) -> WorldDiT:
    cfg = model_config("tiny", action_dim=A, max_frames=3, **overrides)
    return WorldDiT(cfg, generator=torch.Generator().manual_seed(seed))


# -- the weighting, pinned on known inputs ---------------------------------------------------------
def test_flow_error_weightings_on_known_inputs():
    frames = torch.zeros(1, 1, 3, 4, 4)
    eps = torch.ones(1, 1, 3, 4, 4)
    prev = torch.zeros(1, 1, 3, 4, 4)
    t = torch.full((1, 1, 1, 4, 4), 0.5)
    x_t = 0.5 * frames + 0.5 * eps
    pred = torch.full_like(frames, 0.2)  # x-prediction off by 0.2 everywhere
    velocity = flow_error(pred, x_t, frames, eps, t, prev, ObjectiveConfig(weighting="velocity"), "x", 0.05)
    x_only = flow_error(pred, x_t, frames, eps, t, prev, ObjectiveConfig(weighting="x"), "x", 0.05)
    # velocity space: (x_t - x_hat) / t - (eps - x) = (0.5 - 0.2) / 0.5 - 1 = -0.4
    assert torch.allclose(velocity, torch.full_like(velocity, 0.16))
    # clean-frame space: 0.2^2 whatever t
    assert torch.allclose(x_only, torch.full_like(x_only, 0.04))
    # at t = 0.5 the velocity weighting is the clean-frame error over t^2
    assert torch.allclose(velocity, x_only / 0.25)
    moved = frames.clone()
    moved[..., 0, 0] = 1.0  # one pixel changed from the previous frame
    weighted = flow_error(
        pred, x_t, moved, eps, t, prev, ObjectiveConfig(weighting="x", motion_weight=3.0), "x", 0.05
    )
    plain = flow_error(pred, x_t, moved, eps, t, prev, ObjectiveConfig(weighting="x"), "x", 0.05)
    assert torch.allclose(weighted[..., 0, 0], 4 * plain[..., 0, 0])
    assert torch.allclose(weighted[..., 1:, :], plain[..., 1:, :])


def test_default_objective_is_the_measured_choice():
    # docs/study.md: flow at t_one 1 (the shipped models' recipe) against t_one 0.25 and selfflow
    cfg = ObjectiveConfig()
    assert (cfg.mode, cfg.weighting, cfg.t_one, cfg.time_dist, cfg.shift) == (
        "flow",
        "x",
        1.0,
        "uniform",
        1.0,
    )
    assert load_config("train", [], TrainConfig).objective == cfg  # sfw train's default is the same
    # DTS and Self-Flow keep partly noisy targets by default: at t_one = 1 they would be plain flow
    for mode in ("dts", "selfflow"):
        assert ObjectiveConfig(mode=mode).t_one == 0.25
        assert load_config("train", [f"objective={mode}"], TrainConfig).objective.t_one == 0.25


def test_dts_at_t_one_one_warns_that_it_is_plain_flow():
    with pytest.warns(UserWarning, match="plain flow matching plus self-distillation"):
        ObjectiveConfig(mode="selfflow", t_one=1.0)
    with pytest.warns(UserWarning, match="plain flow matching; use t_one < 1"):
        ObjectiveConfig(mode="dts", t_one=1.0)


def test_t_one_puts_that_share_of_examples_at_pure_noise():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.rand(400, 3, 3, 16, 16) * 2 - 1, "actions": torch.zeros(400, 3, A)}
    cfg = ObjectiveConfig(mode="flow", t_one=0.3)
    _, metrics = compute_loss(model, batch, cfg, g, history=2)
    # t_mean = 0.3 * 1 + 0.7 * 0.5 for uniform p(t)
    assert abs(float(metrics["t_mean"]) - 0.65) < 0.04
    uniform = sample_times(10000, ObjectiveConfig(), torch.Generator().manual_seed(0), "cpu")
    assert abs(float(uniform.mean()) - 0.5) < 0.02


# -- the action conditioning ----------------------------------------------------------------------
def test_fourier_action_features_match_the_time_features_scale():
    freqs = action_frequencies(A)
    assert freqs.shape == (FEATURES // 2, A)
    assert torch.equal(freqs, action_frequencies(A))  # fixed: the same in every process
    feats = action_features(torch.rand(64, A) * 2 - 1, freqs)
    assert torch.allclose(feats.norm(dim=-1), torch.full((64,), math.sqrt(FEATURES // 2)), atol=1e-4)
    cond = Conditioning(32, A).requires_grad_(False)
    cond.reset_parameters(torch.Generator().manual_seed(0))
    t_norm = cond.embed_levels(torch.rand(256)).norm(dim=-1).mean()
    a_norm = cond.embed_actions(torch.rand(256, A) * 2 - 1).norm(dim=-1).mean()
    assert 0.3 < float(a_norm / t_norm) < 3.0  # same order; the linear embedding starts ~15x smaller
    legacy = Conditioning(32, A, "linear").requires_grad_(False)
    legacy.reset_parameters(torch.Generator().manual_seed(0))
    assert float(legacy.embed_actions(torch.rand(256, A) * 2 - 1).norm(dim=-1).mean() / t_norm) < 0.3


def test_bf16_cast_keeps_the_action_frequencies_in_float32():
    model = tiny().to(torch.bfloat16)
    assert model.conditioning._freqs.dtype == torch.float32


def test_action_modulation_receives_gradient_after_the_first_step():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {"frames": torch.rand(4, 3, 3, 16, 16) * 2 - 1, "actions": torch.rand(4, 3, A) * 2 - 1}
    cfg = ObjectiveConfig(mode="flow")
    # zero-initialised output and modulation: step 1 moves the output layer, step 2 the modulation,
    # and from step 3 the gradient reaches the conditioning
    for _ in range(3):
        opt.zero_grad()
        loss, _ = compute_loss(model, batch, cfg, torch.Generator().manual_seed(0), history=2)
        loss.backward()
        opt.step()
    action_grads = [p.grad.abs().sum() for p in model.conditioning.action_embed.parameters()]
    assert all(float(g) > 0 for g in action_grads)
    assert float(model.blocks[0].modulation[-1].weight.grad.abs().sum()) > 0


def test_fresh_model_is_still_the_identity_with_fourier_actions():
    model = tiny()
    frames = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    out = model(torch.randn_like(frames), torch.ones(2), torch.rand(2, 3, A) * 2 - 1, shift_frames(frames))
    assert torch.equal(out, shift_frames(frames))


# -- a world where only the action decides the next frame -----------------------------------------
def action_world(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Frames of one uniform grey level each: frame ``j`` shows the level that action ``j`` names
    (its first component, in [-1, 1]), whatever came before. Only the action decides the next
    frame; at low noise, though, the noisy target shows it too, which is why a weighting that
    leaves high noise levels out never needs the action."""
    actions = torch.rand(n, 3, A, generator=generator) * 2 - 1
    frames = actions[..., 0, None, None, None].expand(n, 3, 3, 16, 16).contiguous()
    return {"frames": frames, "actions": actions}


def sensitivity_after_training(cfg: ObjectiveConfig, steps: int = 100) -> float:
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data_gen, loss_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for _ in range(steps):
        loss, _ = compute_loss(model, action_world(32, data_gen), cfg, loss_gen, history=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    val = action_world(64, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(64, 3, 16, 16, generator=g)
    other = torch.rand(64, A, generator=g) * 2 - 1
    return action_sensitivity(model, val["frames"], val["actions"], 2, noise, other)["ratio"]


@pytest.mark.slow
def test_the_default_objective_learns_to_follow_actions_where_the_old_weighting_does_not():
    learned = sensitivity_after_training(ObjectiveConfig(mode="flow"))
    old = sensitivity_after_training(ObjectiveConfig(mode="flow", weighting="velocity", t_one=0.0))
    assert learned > 0.3, learned
    assert old < learned / 2, (old, learned)


# -- the figures ----------------------------------------------------------------------------------
def test_action_sensitivity_is_zero_for_a_model_that_ignores_actions():
    model = tiny(action_input_path=False)
    for p in model.conditioning.action_embed.parameters():
        torch.nn.init.zeros_(p)
    torch.nn.init.normal_(model.final.linear.weight, std=0.1)  # not the identity, but blind to actions
    frames = torch.rand(8, 3, 3, 16, 16) * 2 - 1
    actions = torch.rand(8, 3, A) * 2 - 1
    out = action_sensitivity(model, frames, actions, 2, torch.randn(8, 3, 16, 16), -actions[:, 2])
    assert out["mean_abs_change"] == 0.0 and out["ratio"] == 0.0
    assert out["true_frame_change"] > 0


def test_following_ratio_is_one_for_the_simulator_and_zero_for_copy_last():
    g = torch.Generator().manual_seed(0)
    sim_true, sim_alt = torch.rand(6, 4, 3, 8, 8, generator=g), torch.rand(6, 4, 3, 8, 8, generator=g)
    same = following_ratio(sim_true, sim_alt, sim_true, sim_alt)
    assert all(abs(m - 1) < 1e-9 for m in same["per_horizon"]["mean"])
    assert same["overall"]["low"] <= 1 <= same["overall"]["high"]
    still = sim_true[:, :1].expand_as(sim_true)
    none = following_ratio(still, still, sim_true, sim_alt)
    assert all(m == 0 for m in none["per_horizon"]["mean"])
    half = following_ratio(sim_true, sim_true + 0.5 * (sim_alt - sim_true), sim_true, sim_alt)
    assert all(abs(m - 0.5) < 1e-6 for m in half["per_horizon"]["mean"])
    # the effect error tells a right change from a wrong one of the same size
    assert all(e < 1e-9 for e in same["effect_error_per_horizon"])
    assert all(abs(e - 1) < 1e-6 for e in none["effect_error_per_horizon"])
    assert all(abs(e - 0.25) < 1e-6 for e in half["effect_error_per_horizon"])
    wrong = following_ratio(sim_true, sim_true - (sim_alt - sim_true), sim_true, sim_alt)
    assert all(abs(m - 1) < 1e-6 for m in wrong["per_horizon"]["mean"])  # as large as the simulator's
    assert all(abs(e - 4) < 1e-5 for e in wrong["effect_error_per_horizon"])  # but the opposite way


# -- history_level re-noises generated frames -----------------------------------------------------
def test_history_level_renoises_generated_frames():
    frame = torch.zeros(2, 3, 16, 16)
    assert renoise(frame, 0.0) is frame
    noisy = renoise(frame, 0.2, torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy, 0.2 * eps)
    model = tiny()
    torch.nn.init.normal_(model.final.linear.weight, std=0.1)
    ctx, ctx_a = torch.rand(2, 2, 3, 16, 16) * 2 - 1, torch.zeros(2, 2, A)
    acts = torch.rand(2, 3, A) * 2 - 1
    appended: list[tuple[torch.Tensor, object]] = []
    original = model.append

    def recording_append(cache, frames, actions, prev=None, *, t=0.0, return_hidden=()):
        appended.append((frames.clone(), t))
        return original(cache, frames, actions, prev, t=t, return_hidden=return_hidden)

    model.append = recording_append
    out = rollout(
        model, ctx, ctx_a, acts, steps=1, generator=torch.Generator().manual_seed(0), history_level=0.3
    )
    (first, t0), (second, t1), (third, t2) = appended  # the context, then imagined frames 0 and 1
    assert torch.equal(first, ctx) and t0 == 0.0
    assert t1 == 0.3 and t2 == 0.3
    residual = second - 0.7 * out[:, 0]  # = 0.3 * eps: noise of unit scale, not the frame itself
    assert 0.2 < float(residual.std()) < 0.4
