"""`sfw plan`: the goal protocol, the harness (simulator as the model), the report, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from selfflow_world.errors import UserError
from selfflow_world.plan import (
    PixelDistance,
    PlanConfig,
    ProbeDistance,
    SumDistance,
    TargetDistance,
    box_blur,
    feature_distance,
    joint_distance,
    pixel_distance,
    proportion_ci,
    reached,
    run_plan,
)


def _state(shoulder: float, wrist: float) -> np.ndarray:
    return np.array([0.0, shoulder, wrist, 0.0, 0.0])  # time, qpos (2), qvel (2)


def test_goal_success_check_on_known_states():
    env = "dmc/reacher-easy"
    assert reached(env, _state(0.0, 0.0), _state(0.04, -0.04), 0.05)
    assert not reached(env, _state(0.0, 0.0), _state(0.04, 0.06), 0.05)
    # angles wrap: 3.13 and -3.13 rad are 0.013 rad apart
    assert reached(env, _state(3.13, 0.0), _state(-3.13, 0.0), 0.05)
    assert np.allclose(joint_distance(env, _state(np.pi - 0.01, 0), _state(-np.pi + 0.01, 0)), [0.02, 0.0])
    with pytest.raises(UserError, match="task=goal is defined for"):
        joint_distance("dmc/cartpole-swingup", np.zeros(5), np.zeros(5))


def test_wilson_interval():
    rate, lo, hi = proportion_ci(8, 10)
    assert rate == 0.8 and abs(lo - 0.490) < 0.005 and abs(hi - 0.943) < 0.005
    assert proportion_ci(0, 5)[1] < 1e-12 and proportion_ci(5, 5)[2] > 1 - 1e-12


def test_feature_distance_is_zero_at_the_goal_and_grows_away():
    goal = torch.randn(4, 8)
    feats = torch.stack([goal, goal + 0.1 * torch.randn(4, 8), torch.randn(4, 8)])
    d = feature_distance(feats, goal)
    assert d[0] < 1e-6 < d[1] < d[2]


def _arm_frame(column: int, size: int = 32) -> torch.Tensor:
    """A dark frame with a bright vertical bar (an 'arm') 2 pixels wide at ``column``."""
    frame = -torch.ones(3, size, size)
    frame[:, 4:28, column : column + 2] = 1.0
    return frame


def test_sharp_pixel_distance_is_the_mean_squared_error():
    frames, goal = torch.rand(3, 3, 16, 16), torch.rand(3, 16, 16)
    expected = (frames - goal).pow(2).mean((1, 2, 3))
    assert torch.allclose(pixel_distance(frames, goal), expected)
    assert torch.allclose(pixel_distance(frames, goal, [0]), expected)
    assert pixel_distance(goal[None], goal, [0, 2, 4, 8]).abs().max() < 1e-12


def test_box_blur_is_a_normalised_square_mean():
    frame = torch.rand(1, 2, 9, 9)
    blurred = box_blur(frame, 1)
    assert torch.allclose(blurred[0, :, 4, 4], frame[0, :, 3:6, 3:6].mean((1, 2)))
    assert torch.allclose(blurred[0, :, 0, 0], frame[0, :, :2, :2].mean((1, 2)))  # corner: 4 pixels
    assert torch.allclose(box_blur(torch.ones(1, 1, 5, 5), 3), torch.ones(1, 1, 5, 5))


def test_blurred_pixel_distance_ranks_a_nearer_non_overlapping_arm_as_nearer():
    goal = _arm_frame(4)
    near, far = _arm_frame(10), _arm_frame(24)  # neither overlaps the goal's bar
    sharp = pixel_distance(torch.stack([near, far]), goal)
    assert torch.isclose(sharp[0], sharp[1])  # sharp, they are equally far
    blurred = pixel_distance(torch.stack([near, far]), goal, [0, 2, 4, 8])
    assert blurred[0] < blurred[1]


class _PositionProbe(torch.nn.Module):
    """A stand-in state probe: reads the bar's column (``_arm_frame``) as the one joint position."""

    def __init__(self):
        super().__init__()
        self.register_buffer("state_mean", torch.zeros(1))

    def forward(self, frames):
        return (frames[:, 0, 10] > 0).float().argmax(-1).float()[:, None]


def test_probe_distance_says_which_arm_is_nearer():
    goal = _arm_frame(20)
    frames = torch.stack([_arm_frame(20), _arm_frame(16), _arm_frame(4)])
    d = ProbeDistance(_PositionProbe(), goal)(frames)
    assert torch.allclose(d, torch.tensor([0.0, 16.0, 256.0]))
    # sharp pixels cannot tell the nearer of two arms that miss the goal arm
    px = pixel_distance(frames[1:], goal)
    assert torch.allclose(px[0], px[1])
    both = SumDistance([(1.0, ProbeDistance(_PositionProbe(), goal)), (2.0, PixelDistance(goal))])
    assert torch.allclose(both(frames), d + 2 * pixel_distance(frames, goal))


def _pixel_world_model(size: int = 32):
    """An untrained model of the reacher's frames and actions: enough for the simulator arm, which
    only uses its frame size and action bounds."""
    from selfflow_world.model import WorldDiT, model_config
    from selfflow_world.world_model import WorldModel

    model = WorldDiT(model_config("tiny", image_size=size, patch=8, action_dim=2, max_frames=3))
    meta = {
        "action_low": [-1.0, -1.0],
        "action_high": [1.0, 1.0],
        "env": "dmc/reacher-easy",
        "render": {"camera": 0, "action_repeat": 4, "size": [size, size]},
        "config": {"history": 2},
    }
    return WorldModel(model, meta, torch.device("cpu"), bf16=False)


@pytest.mark.slow
def test_simulator_as_the_model_reaches_most_goals(tmp_path):
    cfg = PlanConfig(
        out=str(tmp_path),
        episodes=3,
        arms=["simulator", "random"],
        score="pixels",
        goal_offset=4,
        budget=12,
        horizon=3,
        population=16,
        iterations=2,
        elites=4,
        videos=0,
    )
    report = run_plan(cfg, wm=_pixel_world_model(), progress=False)
    assert report["arms"]["simulator"]["successes"] >= 2, report["arms"]
    assert report["arms"]["simulator"]["success"] > report["arms"]["random"]["success"]


def test_plan_smoke_on_a_tiny_model_writes_the_report(tiny_run, tmp_path):
    out = tmp_path / "plan"
    cfg = PlanConfig(
        ckpt=str(tiny_run),
        out=str(out),
        episodes=2,
        budget=3,
        horizon=2,
        population=6,
        iterations=1,
        elites=2,
        videos=1,
        baseline_episodes=1,
    )
    report = run_plan(cfg, progress=False)
    assert set(report["arms"]) == {"model", "random", "simulator"}
    assert report["arms"]["model"]["episodes"] == 2 and report["arms"]["simulator"]["episodes"] == 1
    assert report["arms"]["model"]["imagined_frames_per_plan"] == 6 * 2
    for name in ("report.json", "report.md", "arms.png", "episode_0000.mp4", "episodes/model_0001.json"):
        assert (out / name).is_file(), name
    assert "success" in (out / "report.md").read_text()
    first = json.loads((out / "episodes/random_0000.json").read_text())
    again = run_plan(cfg, progress=False)  # resumes: finished episodes are read back
    assert again["arms"]["random"] == report["arms"]["random"]
    assert json.loads((out / "episodes/random_0000.json").read_text()) == first


def _tiny_state_plan(ckpt, out, **overrides) -> PlanConfig:
    """A one-episode, two-step goal plan with score=state that fits a tiny probe."""
    settings = dict(score="state", probe_frames=120, episodes=1, budget=2, horizon=2, population=4)
    settings.update(iterations=1, elites=2, videos=0, arms=["model"], probe_imagined=0)
    return PlanConfig(ckpt=str(ckpt), out=str(out), **{**settings, **overrides})


def test_state_score_fits_the_probe_once_and_plans_with_it(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "plan"
    cfg = _tiny_state_plan(tiny_run, out, probe_epochs=2)
    report = run_plan(cfg, progress=False)
    assert report["arms"]["model"]["episodes"] == 1
    assert report["state_probe"]["data"] == str(tiny_dataset)
    assert "sin and cos" in report["state_probe"]["state_dims"]
    assert "qvel" not in report["state_probe"]["state_dims"]  # positions only
    assert "Probe (score state)" in (out / "report.md").read_text()
    saved = (out / "state_probe.pt").read_bytes()
    (out / "episodes" / "model_0000.json").unlink()
    again = run_plan(cfg, progress=False)  # the kept probe is loaded, not fitted again
    assert (out / "state_probe.pt").read_bytes() == saved
    assert again["state_probe"] == report["state_probe"]
    with_imagined = PlanConfig(**{**cfg.__dict__, "probe_imagined": 3})
    (out / "episodes" / "model_0000.json").unlink()
    third = run_plan(with_imagined, progress=False)  # other probe settings: fitted again
    assert (out / "state_probe.pt").read_bytes() != saved
    assert third["state_probe"]["imagined_clips"] == 3
    missing = PlanConfig(
        **{**cfg.__dict__, "out": str(tmp_path / "p2"), "probe_data": str(tmp_path / "nope")}
    )
    with pytest.raises(UserError, match="probe_data=.*nope is not a directory.*sfw collect"):
        run_plan(missing, progress=False)


def test_a_probe_shipped_with_the_model_is_used_without_data(tiny_run, tmp_path):
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.plan import ship_probe

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(tiny_run), ckpt)
    cfg = _tiny_state_plan(ckpt, tmp_path / "fit", probe_epochs=1)
    fitted = run_plan(cfg, progress=False)
    ship_probe(tmp_path / "fit" / "state_probe.pt", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["data"] = str(tmp_path / "gone")  # the training data is not on this machine
    (ckpt / "meta.json").write_text(json.dumps(meta))
    again = PlanConfig(**{**cfg.__dict__, "out": str(tmp_path / "shipped")})
    report = run_plan(again, progress=False)
    assert report["state_probe"]["shipped_with_model"]
    assert report["state_probe"]["floor_rmse"] == fitted["state_probe"]["floor_rmse"]
    assert not (tmp_path / "shipped" / "state_probe.pt").exists()  # nothing fitted
    assert "shipped with the model" in (tmp_path / "shipped" / "report.md").read_text()


def test_a_given_probe_reads_another_models_frames_without_data(tiny_run, tmp_path):
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.plan import ship_probe

    cfg = _tiny_state_plan(tiny_run, tmp_path / "fit", probe_epochs=1)
    fitted = run_plan(cfg, progress=False)
    kept = tmp_path / "fit" / "state_probe.pt"
    shipper = tmp_path / "shipper"  # a model that ships the probe
    shutil.copytree(resolve_checkpoint(tiny_run), shipper)
    ship_probe(kept, shipper)
    other = tmp_path / "other"  # another model, whose training data is not on this machine
    shutil.copytree(resolve_checkpoint(tiny_run), other)
    meta = json.loads((other / "meta.json").read_text())
    meta["config"]["data"] = str(tmp_path / "gone")
    (other / "meta.json").write_text(json.dumps(meta))
    for n, source in enumerate([kept, shipper]):
        given = PlanConfig(
            **{**cfg.__dict__, "ckpt": str(other), "out": str(tmp_path / f"p{n}"), "probe": str(source)}
        )
        report = run_plan(given, progress=False)
        assert report["state_probe"]["probe_from"] == str(source)
        assert report["state_probe"]["floor_rmse"] == fitted["state_probe"]["floor_rmse"]
        assert not (tmp_path / f"p{n}" / "state_probe.pt").exists()  # nothing fitted
    for source, message in [
        (tmp_path / "nope.pt", "neither a kept probe file"),
        (tmp_path / "other", "neither a kept probe file"),  # a model without one
    ]:
        bad = PlanConfig(
            **{**cfg.__dict__, "ckpt": str(other), "out": str(tmp_path / "bad"), "probe": str(source)}
        )
        with pytest.raises(UserError, match=message):
            run_plan(bad, progress=False)
    target = PlanConfig(
        **{
            **cfg.__dict__,
            "ckpt": str(other),
            "out": str(tmp_path / "t"),
            "task": "reward",
            "score": "target",
        }
    )
    with pytest.raises(UserError, match="is a state probe, score=target needs a target one"):
        run_plan(PlanConfig(**{**target.__dict__, "probe": str(kept)}), progress=False)


def test_imagined_probe_frames_are_the_models_rollouts_paired_with_recorded_states(tiny_run, tiny_dataset):
    from selfflow_world.clips import ClipDataset, ClipSpec
    from selfflow_world.evaluate import StateMap, imagined_probe_data, probe_splits
    from selfflow_world.world_model import WorldModel

    wm = WorldModel.load(str(tiny_run))
    train_set, _ = probe_splits(wm, str(tiny_dataset))
    state_map = StateMap(2, 2, [0], velocities=False)  # reacher: shoulder unlimited, wrist limited
    frames, states = imagined_probe_data(wm, train_set, 10**6, 3, state_map, seed=0)
    spec = ClipSpec(
        history=wm.history,
        future=3,
        val_fraction=train_set.spec.val_fraction,
        split_seed=train_set.spec.split_seed,
    )
    clips = ClipDataset(tiny_dataset, spec, "train")
    items = [clips[i] for i in range(len(clips))]  # every clip, in order
    assert frames.dtype == torch.uint8 and frames.shape == (3 * len(clips), 3, 16, 16)
    h = wm.history
    recorded = torch.stack([it["states"][h:] for it in items])  # the states of frames h .. h+2
    assert torch.allclose(states, state_map(recorded).flatten(0, 1))
    context = torch.stack([it["frames"][:h] for it in items]).float() / 127.5 - 1.0
    acts = clips.denormalize_actions(torch.stack([it["actions"] for it in items]).numpy())
    again = wm.imagine(
        context, acts[:, h:], context_actions=acts[:, :h], steps=1, generator=torch.Generator().manual_seed(0)
    )
    expected = ((again + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).flatten(0, 1)
    assert torch.equal(frames, expected)  # what the model imagines under the recorded actions
    assert imagined_probe_data(wm, train_set, 4, 3, state_map, seed=0)[0].shape[0] == 12


def _tiny_reward_plan(ckpt, out, **overrides) -> PlanConfig:
    """A one-episode, three-step reward plan with a tiny search."""
    settings = dict(task="reward", episodes=1, reward_steps=3, horizon=2, population=4, iterations=1)
    settings.update(elites=2, videos=0)
    return PlanConfig(ckpt=str(ckpt), out=str(out), **{**settings, **overrides})


def test_reward_planning_needs_heads_and_uses_them(tiny_run, tiny_dataset, tmp_path):
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.heads import HeadsConfig, fit_heads

    run = tmp_path / "run"
    shutil.copytree(resolve_checkpoint(tiny_run), run / "checkpoints" / "step_00000003")
    cfg = _tiny_reward_plan(run, tmp_path / "p", score="reward", arms=["model", "random"])
    with pytest.raises(UserError, match="sfw heads ckpt="):
        run_plan(cfg, progress=False)
    fit_heads(
        HeadsConfig(ckpt=str(run), data=str(tiny_dataset), examples=40, steps=5, batch_size=8), progress=False
    )
    report = run_plan(cfg, progress=False)
    assert report["arms"]["model"]["episodes"] == 1 and "return_mean" in report["arms"]["model"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"horizon": 0}, "horizon must be a positive integer"),
        ({"population": -1}, "population must be a positive integer"),
        ({"iterations": 0}, "iterations must be a positive integer"),
        ({"elites": 9, "population": 8}, "elites"),
        ({"task": "dance"}, "task must be one of"),
        ({"planner": "grid"}, "planner must be one of"),
        ({"act": "median"}, "act must be one of"),
        ({"near_planner": "grid"}, "near_planner must be one of"),
        ({"near_distance": 0.0}, "near_distance must be"),
        ({"task": "reward", "score": "pixels"}, "does not fit"),
        ({"task": "reward", "score": "state"}, "does not fit"),
        ({"task": "goal", "score": "target"}, "does not fit"),
        ({"probe_epochs": 0}, "probe_epochs must be a positive integer"),
        ({"pixel_weight": -1.0}, "pixel_weight must be a number >= 0"),
        ({"action_cost": -0.01}, "action_cost must be a number >= 0"),
        ({"action_cost": float("nan")}, "action_cost must be a number >= 0"),
        ({"probe_imagined": -3}, "probe_imagined must be an integer >= 0"),
        ({"arms": ["oracle"]}, "arms must be"),
        ({"out": "???"}, "out= is required"),
        ({"pixel_blur": []}, "pixel_blur must be a non-empty list"),
        ({"pixel_blur": [-1, 2]}, "pixel_blur must be a non-empty list"),
    ],
)
def test_bad_settings_are_refused(overrides, message, tmp_path):
    cfg = PlanConfig(**{"out": str(tmp_path), **overrides})
    with pytest.raises(UserError, match=message):
        cfg.check()


def test_env_with_other_actions_is_refused_and_other_env_warns(tiny_run, tmp_path):
    with pytest.raises(UserError, match="action dimensions"):
        run_plan(
            PlanConfig(ckpt=str(tiny_run), env="dmc/cartpole-swingup", out=str(tmp_path)), progress=False
        )
    with pytest.warns(UserWarning, match="trained on dmc/reacher-easy"):
        run_plan(
            PlanConfig(
                ckpt=str(tiny_run),
                env="dmc/reacher-hard",
                out=str(tmp_path),
                episodes=1,
                budget=1,
                horizon=1,
                execute=1,
                population=2,
                iterations=1,
                elites=1,
                arms=["random"],
                videos=0,
            ),
            progress=False,
        )


def test_observation_labels_are_the_finger_to_target_vector_of_each_recorded_frame(tiny_dataset):
    from selfflow_world.clips import ClipDataset
    from selfflow_world.envs import make
    from selfflow_world.episodes import load_episode
    from selfflow_world.evaluate import ObservationMap

    env, check = make("dmc/reacher-easy", size=16), make("dmc/reacher-easy", size=16)
    labels = ObservationMap(env, [2, 3], "finger-to-target vector (x, y)")
    targets = []
    for info in ClipDataset(tiny_dataset, split="all").episodes:
        arrays = load_episode(info.path)
        got = labels.episode_labels(info, arrays)
        assert got.shape == (info.steps + 1, 2)
        physics = check._backend.env.physics
        check.reset(seed=info.meta["env_seed"])  # the episode's target placement
        for k in (0, info.steps // 2, info.steps):
            check.set_physics_state(arrays["states"][k], render=False)
            xpos = physics.named.data.geom_xpos
            expected = xpos["target"][:2] - xpos["finger"][:2]
            assert np.allclose(got[k].numpy(), expected, atol=1e-6)
        targets.append(float(physics.named.data.geom_xpos["target"][0]))
        assert labels.episode_labels(info, arrays) is got  # computed once per episode
    assert len(set(targets)) == len(targets)  # each episode's seed placed its own target


def test_target_distance_is_the_length_of_the_probed_vector():
    class _VectorProbe(torch.nn.Module):
        state_mean = torch.zeros(2)

        def forward(self, frames):
            return frames[:, 0, 0, :2]

    frames = torch.zeros(2, 3, 4, 4)
    frames[0, 0, 0, :2] = torch.tensor([3.0, 4.0])
    assert torch.allclose(TargetDistance(_VectorProbe())(frames), torch.tensor([5.0, 0.0]))


def test_target_score_sums_over_the_horizon_and_goal_scores_read_its_end(tiny_run):
    from selfflow_world.plan import ModelScorer
    from selfflow_world.world_model import WorldModel

    wm = WorldModel.load(str(tiny_run))
    context = np.zeros((wm.history, 16, 16, 3), np.uint8)
    actions = torch.zeros(3, 4, 2)
    for score, expected in (("target", -4.0), ("state", -1.0)):
        scorer = ModelScorer(
            wm, score, 1, torch.Generator().manual_seed(0), distance=lambda f: torch.ones(len(f))
        )
        scorer.begin(context, np.zeros((wm.history, 2), np.float32))
        assert torch.allclose(scorer(actions), torch.full((3,), expected))


def test_reward_task_plans_with_a_target_probe_fitted_then_shipped(tiny_run, tiny_dataset, tmp_path):
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.plan import ship_probe

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(tiny_run), ckpt)
    cfg = _tiny_reward_plan(  # score auto: target, as reacher has one
        ckpt,
        tmp_path / "fit",
        arms=["model", "simulator"],
        probe_frames=120,
        probe_epochs=1,
        probe_imagined=2,
    )
    report = run_plan(cfg, progress=False)
    assert report["score"] == "target"
    assert report["state_probe"]["score"] == "target"
    assert report["state_probe"]["state_dims"] == "finger-to-target vector (x, y)"
    assert report["arms"]["simulator"]["episodes"] == 1 and "return_mean" in report["arms"]["model"]
    assert "Probe (score target)" in (tmp_path / "fit" / "report.md").read_text()
    ship_probe(tmp_path / "fit" / "target_probe.pt", ckpt, score="target")
    assert (ckpt / "target_probe.safetensors").is_file() and not (ckpt / "state_probe.json").exists()
    shipped = run_plan(PlanConfig(**{**cfg.__dict__, "out": str(tmp_path / "shipped")}), progress=False)
    assert shipped["state_probe"]["shipped_with_model"]
    assert not (tmp_path / "shipped" / "target_probe.pt").exists()  # nothing fitted


def test_common_noise_gives_every_candidate_one_draw_per_step(tiny_run):
    from selfflow_world.plan import ModelScorer, PixelDistance
    from selfflow_world.world_model import WorldModel

    wm = WorldModel.load(str(tiny_run))
    seen = []
    step = wm.step

    def spy(state, actions, **kwargs):
        seen.append(kwargs.get("noise"))
        return step(state, actions, **kwargs)

    wm.step = spy
    context = np.zeros((wm.history, 16, 16, 3), np.uint8)
    distance = PixelDistance(torch.zeros(3, 16, 16))
    for common in (False, True):
        seen.clear()
        scorer = ModelScorer(
            wm, "pixels", 1, torch.Generator().manual_seed(0), distance=distance, common_noise=common
        )
        scorer.begin(context, np.zeros((wm.history, 2), np.float32))
        scorer(torch.zeros(4, 2, 2))
        if common:
            assert [tuple(n.shape) for n in seen] == [(1, 3, 16, 16)] * 2 and not torch.equal(*seen)
        else:
            assert seen == [None, None]  # each row draws its own noise


def test_step_with_given_noise_is_the_step_that_draws_it(tiny_run):
    from selfflow_world.world_model import WorldModel

    wm = WorldModel.load(str(tiny_run))
    context = torch.zeros(3, wm.history, 3, 16, 16)
    actions = torch.full((3, 2), 0.3)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    drawn = wm.step(wm.start(context), actions, generator=torch.Generator().manual_seed(5), steps=2)
    given = wm.step(wm.start(context), actions, noise=noise, steps=2)
    assert torch.equal(drawn, given)
    shared = wm.step(wm.start(context), actions, noise=noise[:1], steps=2)
    assert torch.equal(
        shared, wm.step(wm.start(context), actions, noise=noise[:1].repeat(3, 1, 1, 1), steps=2)
    )
    with pytest.raises(UserError, match="noise must be"):
        wm.step(wm.start(context), actions, noise=noise[:2])


class _RecordingEnv:
    """Just enough of an env for :func:`control`: records the actions it is given."""

    def __init__(self):
        from gymnasium.spaces import Box

        self.action_space = Box(-1.0, 1.0, (2,), np.float32)
        self.actions = []

    def restore(self, physics, seed=None):
        self.actions = []

    def get_physics_state(self):
        return np.zeros(5)

    def step(self, action):
        self.actions.append(np.asarray(action))
        return np.zeros((32, 32, 3), np.uint8), 0.0, False, False, {}


class _IdleScorer:
    """What :func:`control` asks of a scorer when the planner is replaced: nothing is imagined."""

    frames = 0

    def begin(self, context, context_actions):
        pass


@pytest.mark.parametrize("act, expected", [("best", 0.5), ("mean", -0.5)])
def test_cem_executes_its_best_sequence_or_with_act_mean_its_elite_mean(act, expected, monkeypatch):
    import selfflow_world.plan as plan_module
    from selfflow_world.agents import Plan

    def fake_planner(cfg, scorer, action_dim, generator, init_mean, name=None):
        best, mean = torch.full((cfg.horizon, action_dim), 0.5), torch.full((cfg.horizon, action_dim), -0.5)
        return Plan(actions=best, best=best, mean=mean, std=torch.ones_like(mean), score=0.0)

    monkeypatch.setattr(plan_module, "_planner", fake_planner)
    cfg = PlanConfig(out="unused", planner="cem", act=act, horizon=3, execute=2)
    env, context = _RecordingEnv(), np.zeros((2, 32, 32, 3), np.uint8)
    out = plan_module.control(
        cfg,
        env,
        _pixel_world_model(),
        "model",
        _IdleScorer(),
        context,
        np.zeros((2, 2), np.float32),
        physics=None,
        env_seed=0,
        steps=4,
    )
    assert out["plans"] == 2  # replans after every `execute` actions
    assert np.allclose(np.stack(env.actions), expected)


class _DistanceScorer(_IdleScorer):
    """An idle scorer whose target distance reads the given values, one per call."""

    def __init__(self, distances):
        self.read = list(distances)
        self.calls = 0

    def distance(self, frames):
        self.calls += 1
        return torch.full((frames.shape[0],), self.read.pop(0))


@pytest.mark.parametrize(
    "planner, near_planner, expected",
    [
        ("cem", None, ["cem", "cem", "cem"]),
        ("cem", "mppi", ["cem", "mppi", "cem"]),
        ("mppi", "mppi", ["mppi", "mppi", "mppi"]),  # the same planner: plans near are still counted
    ],
)
def test_near_planner_plans_while_the_real_frame_is_near_the_target(
    planner, near_planner, expected, monkeypatch
):
    import selfflow_world.plan as plan_module
    from selfflow_world.agents import Plan

    used = []

    def fake_planner(cfg, scorer, action_dim, generator, init_mean, name=None):
        used.append(name or cfg.planner)
        zero = torch.zeros(cfg.horizon, action_dim)
        return Plan(actions=zero, best=zero, mean=zero, std=torch.ones_like(zero), score=0.0)

    monkeypatch.setattr(plan_module, "_planner", fake_planner)
    cfg = PlanConfig(
        out="unused",
        task="reward",
        planner=planner,
        near_planner=near_planner,
        near_distance=0.1,
        horizon=2,
        execute=1,
    )
    scorer = _DistanceScorer([0.3, 0.05, 0.1])  # far, near, at the switch distance (not below it)
    out = plan_module.control(
        cfg,
        _RecordingEnv(),
        _pixel_world_model(),
        "model",
        scorer,
        np.zeros((2, 32, 32, 3), np.uint8),
        np.zeros((2, 2), np.float32),
        physics=None,
        env_seed=0,
        steps=3,
    )
    assert used == expected
    assert out["near_plans"] == (1 if near_planner else 0)  # one of the three readings is near
    assert scorer.calls == (3 if near_planner else 0)  # the distance is only read to choose


@pytest.mark.parametrize(
    "near_planner, score, expected",
    [
        ("auto", "target", "mppi"),  # the default: CEM approaches the target, MPPI holds it
        ("auto", "reward", None),
        ("auto", "state", None),
        (None, "target", None),
        ("cem", "target", "cem"),
    ],
)
def test_auto_near_planner_is_mppi_with_the_target_score_only(near_planner, score, expected):
    cfg = PlanConfig(out="unused", task="reward", near_planner=near_planner)
    cfg.check()
    assert cfg.resolved_near_planner(score) == expected
    assert PlanConfig().near_planner == "auto" and PlanConfig().near_distance == 0.05


def test_near_planner_needs_the_target_score(tiny_run, tmp_path):
    with pytest.raises(UserError, match="near_planner .* needs task=reward with score=target"):
        run_plan(
            PlanConfig(ckpt=str(tiny_run), task="goal", near_planner="mppi", out=str(tmp_path)),
            progress=False,
        )


def test_sfw_probe_stores_a_probe_the_planner_and_dream_env_read(heads_run, tiny_dataset, tmp_path, capsys):
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.cli import main
    from selfflow_world.envs import DreamEnv
    from selfflow_world.plan import shipped_probe
    from selfflow_world.world_model import WorldModel

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(heads_run), ckpt)
    assert shipped_probe(str(ckpt)) is None
    args = [
        "probe",
        f"ckpt={ckpt}",
        f"data={tiny_dataset}",
        "frames=120",
        "epochs=1",
        "imagined=4",
        "horizon=2",
    ]
    assert main(args) == 0
    assert f"-> {ckpt}" in capsys.readouterr().out
    probe, meta = shipped_probe(str(ckpt))
    assert meta["fitted_from"] == {
        "data": str(tiny_dataset),
        "frames": 120,
        "epochs": 1,
        "seed": 0,
        "imagined_clips": 4,
        "horizon": 2,
        "sampler_steps": 1,
    }
    assert meta["report"]["score"] == "state" and len(meta["report"]["floor_rmse"]) == probe.state_dim
    assert not list(ckpt.glob("*.tmp"))
    # a plan with score=state reads it without data; a dream env observes through it
    report = run_plan(_tiny_state_plan(ckpt, tmp_path / "plan", probe_data=""), progress=False)
    assert report["state_probe"]["shipped_with_model"]
    env = DreamEnv(WorldModel.load(ckpt), horizon=2, observation="probes")
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (2 * probe.state_dim,)
        obs, *_ = env.step(env.action_space.sample())
        reading = env.dream.read_probes(env.render()[None])["state"][0]
        assert np.allclose(obs[: probe.state_dim], reading, atol=1e-5)
    finally:
        env.close()


def test_sfw_probe_bad_input(tiny_run, tiny_dataset, tmp_path):
    from selfflow_world.plan import ProbeConfig, run_probe

    base = dict(ckpt=str(tiny_run), data=str(tiny_dataset), out=str(tmp_path / "p"), frames=20, epochs=1)
    with pytest.raises(UserError, match="score must be one of"):
        run_probe(ProbeConfig(**base, score="joints"))
    with pytest.raises(UserError, match="imagined must be an integer >= 0"):
        run_probe(ProbeConfig(**base, imagined=-1))
    with pytest.raises(UserError, match="nope is not a directory"):
        run_probe(ProbeConfig(**{**base, "data": str(tmp_path / "nope")}))
    with pytest.raises(UserError, match="ckpt= is required"):
        run_probe(ProbeConfig(**{**base, "ckpt": "???"}))
    assert not (tmp_path / "p").exists()  # nothing written
