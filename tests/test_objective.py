"""Behaviour of the Self-Flow objective: noise path, dual timesteps, teacher input, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfflow_world import rollout as rollouts
from selfflow_world.errors import UserError
from selfflow_world.model import WorldDiT, expand_t, model_config
from selfflow_world.objective import (
    ObjectiveConfig,
    Projector,
    compute_loss,
    ema_decay_at,
    ema_update,
    imagined_history_batch,
    make_noisy,
    make_teacher,
    sample_times,
)

B, T, A, HISTORY = 4, 3, 2, 2


def tiny_model(seed: int = 0) -> WorldDiT:
    cfg = model_config("tiny", action_dim=A, max_frames=T)
    return WorldDiT(cfg, generator=torch.Generator().manual_seed(seed))


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frames": torch.rand(B, T, 3, 16, 16, generator=g) * 2 - 1,
        "actions": torch.rand(B, T, A, generator=g) * 2 - 1,
    }


def loss_of(cfg: ObjectiveConfig, seed: int = 0, model_seed: int = 0):
    model = tiny_model(model_seed)
    teacher, projector = make_teacher(model), Projector(model.config.width)
    g = torch.Generator().manual_seed(seed)
    return compute_loss(model, tiny_batch(), cfg, g, teacher=teacher, projector=projector, history=HISTORY)


class Recorder(nn.Module):
    """Delegates to a model and keeps the inputs of each call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.tokens_per_frame = model.tokens_per_frame
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, actions, prev, **kwargs):
        self.calls.append((x.detach().clone(), t.detach().clone(), prev.detach().clone()))
        return self.model(x, t, actions, prev, **kwargs)


def test_noisy_input_follows_the_time_convention():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(2, 2, 3, 16, 16, generator=g), torch.randn(2, 2, 3, 16, 16, generator=g)
    assert torch.equal(make_noisy(x, eps, torch.zeros(2), patch=4), x)
    assert torch.equal(make_noisy(x, eps, torch.ones(2), patch=4), eps)
    mid = make_noisy(x, eps, torch.tensor([0.25, 0.5]), patch=4)
    assert torch.allclose(mid[0], 0.75 * x[0] + 0.25 * eps[0])
    # per-frame levels: frame 0 clean, frame 1 pure noise
    mixed = make_noisy(x, eps, torch.tensor([[0.0, 1.0]]).expand(2, 2), patch=4)
    assert torch.equal(mixed[:, 0], x[:, 0]) and torch.equal(mixed[:, 1], eps[:, 1])


def test_sample_times_in_range_and_shift_moves_mass_to_noise():
    g = torch.Generator().manual_seed(0)
    for dist in ("uniform", "logit_normal"):
        t = sample_times(4000, ObjectiveConfig(time_dist=dist), g, "cpu")
        assert t.shape == (4000,) and t.min() >= 0 and t.max() <= 1
        assert abs(t.mean().item() - 0.5) < 0.03
    shifted = sample_times(4000, ObjectiveConfig(shift=3.0), torch.Generator().manual_seed(0), "cpu")
    plain = sample_times(4000, ObjectiveConfig(), torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.mean() > plain.mean() + 0.1


def test_student_sees_clean_history_and_two_timesteps_on_targets():
    model = Recorder(tiny_model())
    cfg = ObjectiveConfig(mode="dts", mask_ratio=0.5)
    batch = tiny_batch()
    compute_loss(model, batch, cfg, torch.Generator().manual_seed(0), history=HISTORY)
    ((x, t, prev),) = model.calls
    n_hist = HISTORY * model.tokens_per_frame
    assert torch.equal(x[:, :HISTORY], batch["frames"][:, :HISTORY])
    assert t[:, :n_hist].eq(0).all()
    assert torch.equal(prev[:, 1:], batch["frames"][:, :-1]) and prev[:, 0].eq(0).all()
    for row in t[:, n_hist:]:
        assert len(row.unique()) == 2  # each example: its t on some tokens, its s on the others


def test_flow_mode_uses_one_level_per_example_and_history_noise_stays_small():
    model = Recorder(tiny_model())
    cfg = ObjectiveConfig(mode="flow", history_noise=0.1)
    compute_loss(model, tiny_batch(), cfg, torch.Generator().manual_seed(0), history=HISTORY)
    ((_, t, _),) = model.calls
    n_hist = HISTORY * model.tokens_per_frame
    assert all(len(row.unique()) == 1 for row in t[:, n_hist:])
    assert t[:, :n_hist].max() <= 0.1 and t[:, :n_hist].max() > 0


def test_teacher_sees_every_target_token_at_the_cleaner_level_without_gradient():
    student, teacher = Recorder(tiny_model()), Recorder(make_teacher(tiny_model()))
    teacher.model.requires_grad_(True)  # even so, no gradient may reach it
    projector = Projector(32)
    batch = tiny_batch()
    cfg = ObjectiveConfig(mode="selfflow", mask_ratio=0.5)
    loss, metrics = compute_loss(
        student,
        batch,
        cfg,
        torch.Generator().manual_seed(0),
        teacher=teacher,
        projector=projector,
        history=HISTORY,
    )
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in projector.parameters())
    assert student.model.patch_embed.weight.grad is not None

    ((x_s, t_s, prev_s),) = student.calls
    ((x_t, t_t, prev_t),) = teacher.calls
    n_hist = HISTORY * student.tokens_per_frame
    cleaner = t_s[:, n_hist:].min(dim=1).values  # min(t, s) per example
    assert torch.equal(t_t[:, n_hist:], cleaner[:, None].expand_as(t_t[:, n_hist:]))
    assert (t_t <= t_s).all() and (t_t < t_s).any()  # the cleaner level, not max
    assert torch.equal(t_t[:, :n_hist], t_s[:, :n_hist]) and torch.equal(prev_t, prev_s)
    # same noise: x_teacher - x == (t_teacher / t_student) * (x_student - x), token by token
    frames = batch["frames"]
    ratio = expand_t(t_t / t_s.clamp(min=1e-12), frames.shape, patch=4)
    assert torch.allclose((x_t - frames)[:, HISTORY:], (ratio * (x_s - frames))[:, HISTORY:], atol=1e-5)
    assert 0 < metrics["rep_loss"] and metrics["teacher_t_mean"] <= metrics["t_mean"]


def test_selfflow_without_mask_and_weight_equals_flow_for_one_seed():
    flow, _ = loss_of(ObjectiveConfig(mode="flow", t_one=0.25))
    selfflow, metrics = loss_of(ObjectiveConfig(mode="selfflow", mask_ratio=0.0, gamma=0.0))
    assert torch.equal(flow, selfflow) and metrics["rep_loss"] > 0
    # a fresh residual model copies the previous frame whatever the noise, so only a weighting that
    # depends on the noise level (velocity) tells the two timesteps apart here
    velocity_flow, _ = loss_of(ObjectiveConfig(mode="flow", t_one=0.25, weighting="velocity"))
    dts, _ = loss_of(ObjectiveConfig(mode="dts", mask_ratio=0.5, weighting="velocity"))
    assert not torch.equal(velocity_flow, dts)


def test_at_t_one_one_dts_is_flow_and_the_teacher_sees_what_the_student_sees():
    # every target at t = s = 1: the second timestep has nothing to mask, so DTS is plain flow, and
    # Self-Flow's teacher gets the same pure-noise targets as the student (no information gap)
    flow, _ = loss_of(ObjectiveConfig(mode="flow", t_one=1.0, weighting="velocity"))
    with pytest.warns(UserWarning, match="plain flow"):  # the config says so too
        dts_cfg = ObjectiveConfig(mode="dts", t_one=1.0, weighting="velocity", mask_ratio=0.5)
        selfflow_cfg = ObjectiveConfig(mode="selfflow", t_one=1.0)
    dts, metrics = loss_of(dts_cfg)
    assert torch.equal(flow, dts) and metrics["s_frac"] > 0
    _, metrics = loss_of(selfflow_cfg)
    assert metrics["teacher_t_mean"] == metrics["t_mean"] == 1.0


def test_same_seed_same_loss():
    cfg = ObjectiveConfig(mode="selfflow")
    assert torch.equal(loss_of(cfg)[0], loss_of(cfg)[0])
    assert not torch.equal(loss_of(cfg)[0], loss_of(cfg, seed=1)[0])
    assert not torch.equal(loss_of(cfg)[0], loss_of(cfg, model_seed=1)[0])


def test_overfitting_one_batch_drives_the_loss_down():
    model = tiny_model()
    teacher, projector = make_teacher(model), Projector(32)
    cfg = ObjectiveConfig(mode="selfflow", time_dist="logit_normal")
    opt = torch.optim.Adam([*model.parameters(), *projector.parameters()], lr=3e-3)
    batch, losses = tiny_batch(), []
    for _ in range(100):
        loss, metrics = compute_loss(
            model,
            batch,
            cfg,
            torch.Generator().manual_seed(0),
            teacher=teacher,
            projector=projector,
            history=HISTORY,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(teacher, model, 0.9)
        losses.append(metrics["flow_loss"].item())
    assert losses[-1] < 0.3 * losses[0]


def test_ema_helpers():
    cfg = ObjectiveConfig(ema_decay=0.99, ema_warmup=100)
    decays = [ema_decay_at(step, cfg) for step in (0, 50, 99, 100, 1000)]
    assert decays[0] == 0.0 and decays[-1] == decays[-2] == 0.99
    assert decays == sorted(decays)
    assert ema_decay_at(0, ObjectiveConfig(ema_decay=0.99, ema_warmup=0)) == 0.99
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    before = teacher.weight.detach().clone()
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, 0.75 * before + 0.25 * student.weight)
    ema_update(teacher, student, 0.0)
    assert torch.equal(teacher.weight, student.weight)


def test_layers_default_to_30_and_70_percent_of_depth():
    assert ObjectiveConfig().resolve_layers(12) == (4, 8)
    assert ObjectiveConfig().resolve_layers(6) == (2, 4)
    assert ObjectiveConfig().resolve_layers(2) == (1, 2)


def test_invalid_objective_settings_raise_user_errors():
    with pytest.raises(UserError, match="mask_ratio"):
        ObjectiveConfig(mask_ratio=0.7)
    with pytest.raises(UserError, match="mode"):
        ObjectiveConfig(mode="repa")
    with pytest.raises(UserError, match="time_dist"):
        ObjectiveConfig(time_dist="beta")
    with pytest.raises(UserError, match="student_layer < teacher_layer"):
        ObjectiveConfig(student_layer=4, teacher_layer=4).resolve_layers(6)
    with pytest.raises(UserError, match="depth 6"):
        ObjectiveConfig(student_layer=2, teacher_layer=7).resolve_layers(6)
    with pytest.raises(UserError):
        ObjectiveConfig().resolve_layers(1)
    with pytest.raises(UserError, match="teacher and a projector"):
        compute_loss(
            tiny_model(), tiny_batch(), ObjectiveConfig(mode="selfflow"), torch.Generator(), history=HISTORY
        )
    with pytest.raises(UserError, match="history"):
        compute_loss(tiny_model(), tiny_batch(), ObjectiveConfig(mode="flow"), torch.Generator(), history=T)


@pytest.mark.parametrize("prediction", ["x", "v"])
def test_flow_loss_is_velocity_mse_on_target_frames_only(prediction):
    cfg = model_config("tiny", action_dim=A, max_frames=T, prediction=prediction, residual=False)
    model = Recorder(WorldDiT(cfg))  # fresh: predicts exactly zero
    batch = tiny_batch()
    velocity = ObjectiveConfig(mode="dts", weighting="velocity", t_one=0.0)
    loss, _ = compute_loss(model, batch, velocity, torch.Generator().manual_seed(0), history=HISTORY)
    ((x_t, t, _),) = model.calls
    frames, t_pix = batch["frames"], expand_t(t, batch["frames"].shape, patch=4)
    v_true = ((x_t - frames) / t_pix)[:, HISTORY:]  # eps - x on target frames
    v_pred = (x_t / t_pix.clamp(min=0.05))[:, HISTORY:] if prediction == "x" else torch.zeros_like(v_true)
    assert torch.allclose(loss, (v_pred - v_true).pow(2).mean(), rtol=1e-4)

    class WrongOnHistory(nn.Module):
        """The same model, with arbitrary predictions for the history frames."""

        def __init__(self) -> None:
            super().__init__()
            self.config, self.tokens_per_frame, self.inner = cfg, model.tokens_per_frame, model.model

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            return torch.cat([out[:, :HISTORY] + 100.0, out[:, HISTORY:]], dim=1)

    wrong, _ = compute_loss(
        WrongOnHistory(), batch, velocity, torch.Generator().manual_seed(0), history=HISTORY
    )
    assert torch.equal(wrong, loss)
    # the clean-frame weighting: the same model's loss is the x error on target frames only
    model.calls.clear()
    x_loss, _ = compute_loss(
        model,
        batch,
        ObjectiveConfig(mode="dts", weighting="x"),
        torch.Generator().manual_seed(0),
        history=HISTORY,
    )
    ((x_t, t, _),) = model.calls
    t_pix = expand_t(t, batch["frames"].shape, patch=4)
    x_hat = torch.zeros_like(frames) if prediction == "x" else x_t  # v-prediction of 0: x_t - t * 0
    assert torch.allclose(x_loss, (x_hat - frames)[:, HISTORY:].pow(2).mean(), rtol=1e-4)


def imagined_case(share: float, imagined: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = HISTORY + imagined + 1
    batch = {
        "frames": torch.rand(B, total, 3, 16, 16, generator=g) * 2 - 1,
        "actions": torch.rand(B, total, A, generator=g) * 2 - 1,
        "rewards": torch.arange(total, dtype=torch.float32).repeat(B, 1),
    }
    model = tiny_model()
    gen = torch.Generator().manual_seed(seed + 1)
    out, rows = imagined_history_batch(
        model, batch, history=HISTORY, imagined=imagined, share=share, generator=gen
    )
    return model, batch, out, rows


def test_imagined_history_is_what_a_rollout_of_the_model_makes_and_targets_stay_recorded():
    imagined = 3
    model, batch, out, rows = imagined_case(share=1.0, imagined=imagined)
    assert rows == B and out["frames"].shape == (B, HISTORY + 1, 3, 16, 16)
    # rewards 0, 1, 2, ... per frame tell each row's window start r in 1..imagined
    start = out["rewards"][:, 0].long()
    assert ((start >= 1) & (start <= imagined)).all()
    for i in range(B):
        r = int(start[i])
        window = slice(r, r + HISTORY + 1)
        assert torch.equal(out["actions"][i], batch["actions"][i, window])
        assert torch.equal(out["frames"][i, -1], batch["frames"][i, r + HISTORY])  # recorded target
        # the model's own rollout from the first HISTORY recorded frames under the recorded actions
        state = rollouts.start(
            model, batch["frames"][i : i + 1, :HISTORY], batch["actions"][i : i + 1, :HISTORY]
        )
        made = [
            rollouts.advance(model, state, batch["actions"][i : i + 1, HISTORY + k], steps=1)
            for k in range(r)
        ]
        for j in range(HISTORY):
            k = r + j  # clip frame index of history slot j
            expected = made[k - HISTORY][0] if k >= HISTORY else batch["frames"][i, k]
            assert torch.allclose(out["frames"][i, j], expected, atol=1e-5), (i, r, j)


def test_imagined_history_share_zero_is_the_recorded_clip_and_same_seed_same_batch():
    _, batch, out, rows = imagined_case(share=0.0)
    assert rows == 0
    assert torch.equal(out["frames"], batch["frames"][:, : HISTORY + 1])
    assert torch.equal(out["actions"], batch["actions"][:, : HISTORY + 1])
    _, _, a, rows_a = imagined_case(share=0.5, seed=3)
    _, _, b, rows_b = imagined_case(share=0.5, seed=3)
    assert rows_a == rows_b and all(torch.equal(a[k], b[k]) for k in a)


def test_imagined_history_settings_are_checked():
    model, batch = tiny_model(), tiny_batch()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(UserError, match="leave no target"):
        imagined_history_batch(model, batch, history=HISTORY, imagined=1, share=0.5, generator=gen)
    with pytest.raises(UserError, match="share in"):
        imagined_history_batch(model, batch, history=1, imagined=1, share=1.5, generator=gen)


class ActionRecorder(Recorder):
    """Also keeps the actions of each call."""

    def forward(self, x, t, actions, prev, **kwargs):
        self.actions = actions.detach().clone()
        return super().forward(x, t, actions, prev, **kwargs)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_context_action_dropout_zeroes_only_the_context_actions_of_dropped_clips(share):
    batch = tiny_batch()
    model = ActionRecorder(tiny_model())
    cfg = ObjectiveConfig(mode="flow", context_action_dropout=share)
    compute_loss(model, batch, cfg, torch.Generator().manual_seed(0), history=HISTORY)
    seen, given = model.actions, batch["actions"]
    assert torch.equal(seen[:, HISTORY:], given[:, HISTORY:])  # the target's action is always seen
    dropped = seen[:, :HISTORY].eq(0).flatten(1).all(1)
    kept = torch.equal(seen[~dropped], given[~dropped])
    assert kept and dropped.sum() == {0.0: 0, 1.0: B}.get(share, dropped.sum())
    if share == 1.0:  # the same loss as clips whose context actions were zero to begin with
        zeroed = {
            **batch,
            "actions": torch.cat([torch.zeros_like(given[:, :HISTORY]), given[:, HISTORY:]], 1),
        }
        off = ObjectiveConfig(mode="flow")
        a = compute_loss(tiny_model(), batch, cfg, torch.Generator().manual_seed(0), history=HISTORY)[0]
        b = compute_loss(tiny_model(), zeroed, off, torch.Generator().manual_seed(0), history=HISTORY)[0]
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="context_action_dropout"):
        ObjectiveConfig(context_action_dropout=1.5)
