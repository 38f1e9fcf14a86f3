"""Env names, pixel envs (both families) and collection policies."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from selfflow_world.envs import defaults_for, list_envs, make, parse_name
from selfflow_world.envs.policies import PolicyConfig, colored_noise, make_policy
from selfflow_world.episodes import list_episodes, load_episode
from selfflow_world.errors import UserError

SIZE = 16


@pytest.fixture(params=["dmc/reacher-easy", "gym/Reacher-v5"])
def env(request):
    env = make(request.param, size=SIZE)
    yield env
    env.close()


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dmc/reacher-easy", ("dmc", "reacher-easy")),
        ("dmc/ball_in_cup-catch", ("dmc", "ball_in_cup-catch")),
        ("gym/Reacher-v5", ("gym", "Reacher-v5")),
    ],
)
def test_names_resolve(name, expected):
    assert parse_name(name) == expected
    assert name in list_envs()


def test_list_envs_holds_every_suite_task_and_gym_mujoco_ids():
    from dm_control import suite

    names = set(list_envs())
    assert {f"dmc/{domain}-{task}" for domain, task in suite.ALL_TASKS} <= names
    for base in (
        "Ant",
        "HalfCheetah",
        "Hopper",
        "Humanoid",
        "InvertedPendulum",
        "Pusher",
        "Reacher",
        "Walker2d",
    ):
        assert f"gym/{base}-v5" in names
    assert "gym/CartPole-v1" not in names  # not MuJoCo
    assert "gym/Reacher-v2" not in names  # needs mujoco_py, which cannot run here
    assert all(parse_name(name) for name in names)


@pytest.mark.parametrize(
    "name", ["dmc/reacher-nope", "reacher-easy", "gym/NotAnEnv-v0", "foo/bar", "gym/CartPole-v1"]
)
def test_unknown_name_is_a_one_line_user_error(name):
    with pytest.raises(UserError) as err:
        make(name)
    message = str(err.value)
    assert "\n" not in message and "sfw envs" in message and name in message


def test_curated_defaults():
    assert defaults_for("dmc/reacher-easy").action_repeat == 4
    assert defaults_for("dmc/reacher-hard").action_repeat == 4
    assert defaults_for("dmc/cartpole-swingup").action_repeat == 8
    assert defaults_for("gym/Reacher-v5").action_repeat == 2
    env = make("dmc/reacher-easy", size=SIZE)
    try:
        assert env.action_repeat == 4
    finally:
        env.close()


# -- pixel env -----------------------------------------------------------------------------------


def test_observation_and_info(env):
    obs, info = env.reset(seed=0)
    for _ in range(2):
        assert obs.dtype == np.uint8 and obs.shape == (SIZE, SIZE, 3)
        assert env.observation_space.contains(obs)
        assert obs.std() > 0  # a rendered scene, not a blank frame
        assert {"qpos", "qvel", "physics_state", "native_obs"} <= set(info)
        assert info["physics_state"].shape == (env.state_size,)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert isinstance(reward, float) and not terminated and not truncated


def test_non_square_size():
    env = make("gym/Reacher-v5", size=(16, 24))
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (16, 24, 3) and env.observation_space.contains(obs)
    finally:
        env.close()


def test_same_seed_same_frames(env):
    def rollout(seed):
        env.action_space.seed(seed)
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        for _ in range(4):
            frames.append(env.step(env.action_space.sample())[0])
        return np.stack(frames)

    first, again, other = rollout(3), rollout(3), rollout(4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.filterwarnings("ignore:.*not having a spec")  # made by make(), not gymnasium.make
def test_gymnasium_env_checker(env):
    from gymnasium.utils.env_checker import check_env

    check_env(env, skip_render_check=False)


def test_action_repeat_sums_rewards():
    name = "gym/Reacher-v5"  # dense reward, so every simulator step contributes
    repeated, single = make(name, size=SIZE, action_repeat=2), make(name, size=SIZE, action_repeat=1)
    try:
        rng = np.random.default_rng(0)
        repeated.reset(seed=1)
        single.reset(seed=1)
        for _ in range(3):
            action = rng.uniform(-1, 1, 2).astype(np.float32)
            obs, reward, *_, info = repeated.step(action)
            rewards = [single.step(action)[1] for _ in range(2)]
            assert reward == pytest.approx(sum(rewards), abs=1e-9) and rewards[0] != rewards[1]
        np.testing.assert_array_equal(info["physics_state"], single.get_physics_state())
        np.testing.assert_array_equal(obs, single.render())
    finally:
        repeated.close()
        single.close()


@pytest.mark.parametrize("name", ["dmc/reacher-easy", "gym/Reacher-v5"])
def test_restore_and_replay_reproduce_recorded_frames(name, collect_config, tmp_path):
    """Restoring a recorded state shows the recorded frame; replaying the recorded actions from the
    recorded start reproduces every recorded frame exactly."""
    from selfflow_world.envs.collect import collect

    cfg = collect_config(
        tmp_path / "d", env=name, episodes=1, steps=10, size=32, policy=PolicyConfig("random")
    )
    collect(cfg, progress=False)
    ((_, path),) = list_episodes(cfg.out)
    ep = load_episode(path, mmap=False)
    seed = json.loads((path / "meta.json").read_text())["env_seed"]
    env = make(name, size=32)
    try:
        for k in range(len(ep["frames"])):
            np.testing.assert_array_equal(
                env.restore(ep["states"][k], seed=seed), ep["frames"][k], err_msg=f"frame {k}"
            )
        env.restore(ep["states"][0], seed=seed)
        for k, action in enumerate(ep["actions"]):
            obs, reward, *_, info = env.step(action)
            np.testing.assert_array_equal(obs, ep["frames"][k + 1], err_msg=f"replayed frame {k + 1}")
            np.testing.assert_array_equal(info["physics_state"], ep["states"][k + 1])
            assert np.float32(reward) == ep["rewards"][k]
    finally:
        env.close()


def test_step_before_reset_and_bad_action_shape():
    env = make("gym/Reacher-v5", size=SIZE)
    try:
        with pytest.raises(RuntimeError):
            env.step(np.zeros(2, np.float32))
        env.reset(seed=0)
        with pytest.raises(UserError):
            env.step(np.zeros(3, np.float32))
    finally:
        env.close()


def test_close_is_clean():
    """Closing twice is fine and the interpreter exits without EGL errors."""
    code = (
        "from selfflow_world.envs import make\n"
        "for name in ('dmc/reacher-easy', 'gym/Reacher-v5'):\n"
        "    env = make(name, size=16); env.reset(seed=0); env.step(env.action_space.sample())\n"
        "    env.close(); env.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr and "Exception" not in result.stderr, result.stderr


# -- policies ------------------------------------------------------------------------------------

LOW, HIGH = np.array([-2.0, 0.0], np.float32), np.array([1.0, 3.0], np.float32)  # asymmetric bounds


def run_policy(cfg: PolicyConfig, steps: int = 200, seed: int = 0) -> np.ndarray:
    policy = make_policy(cfg, LOW, HIGH)
    policy.reset(np.random.default_rng(seed), steps)
    obs, info = np.zeros((SIZE, SIZE, 3), np.uint8), {}
    return np.stack([policy.act(obs, info) for _ in range(steps)])


def lag1_autocorrelation(actions: np.ndarray) -> float:
    x = actions - actions.mean(0)
    return float(((x[1:] * x[:-1]).sum(0) / (x * x).sum(0)).mean())


@pytest.mark.parametrize(
    "cfg",
    [PolicyConfig("random"), PolicyConfig("noise", "colored"), PolicyConfig("noise", "ou")],
    ids=["random", "colored", "ou"],
)
def test_policies_stay_within_bounds_and_are_seeded(cfg):
    actions = run_policy(cfg)
    assert actions.dtype == np.float32 and actions.shape == (200, 2)
    assert (actions >= LOW).all() and (actions <= HIGH).all()
    spread = actions.max(0) - actions.min(0)
    assert (spread > 0.5 * (HIGH - LOW)).all()  # uses the range, not a corner of it
    np.testing.assert_array_equal(actions, run_policy(cfg))
    assert not np.array_equal(actions, run_policy(cfg, seed=1))


def test_noise_policies_are_temporally_correlated():
    white = lag1_autocorrelation(run_policy(PolicyConfig("random")))
    assert abs(white) < 0.2
    for kind in ("colored", "ou"):
        assert lag1_autocorrelation(run_policy(PolicyConfig("noise", kind))) > white + 0.4, kind


def test_colored_noise_spectrum():
    rng = np.random.default_rng(0)
    white, red = colored_noise(rng, 0.0, 512, 3), colored_noise(rng, 2.0, 512, 3)
    for x in (white, red):
        np.testing.assert_allclose(x.std(0), 1.0, atol=1e-6)
    assert lag1_autocorrelation(red) > 0.9 and abs(lag1_autocorrelation(white)) < 0.15


def test_bad_policy_configs():
    with pytest.raises(UserError, match="unknown policy"):
        make_policy(PolicyConfig("nope"), LOW, HIGH)
    with pytest.raises(UserError, match="noise_kind"):
        make_policy(PolicyConfig("noise", "purple"), LOW, HIGH)
    with pytest.raises(UserError, match="sb3_path"):
        make_policy(PolicyConfig("sb3"), LOW, HIGH)
    with pytest.raises(UserError, match="not a file"):
        make_policy(PolicyConfig("sb3", sb3_path="/nonexistent/model.zip"), LOW, HIGH)


@pytest.fixture(scope="module")
def ppo_zip(tmp_path_factory):
    """A (barely) trained PPO on Reacher-v5's native observation vector."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO

    threads = torch.get_num_threads()
    env = gym.make("Reacher-v5")
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(64)
    path = tmp_path_factory.mktemp("sb3") / "ppo.zip"
    model.save(path)
    env.close()
    torch.set_num_threads(threads)
    return path


def test_sb3_policy_collects_within_bounds(ppo_zip, tmp_path):
    import torch

    from selfflow_world.config import load_config
    from selfflow_world.envs.collect import CollectConfig, collect

    threads = torch.get_num_threads()
    runs = {}
    for noise in (0.0, 0.5):
        out = tmp_path / f"noise{noise}"
        overrides = [
            "env=gym/Reacher-v5",
            "episodes=1",
            "steps=8",
            "size=16",
            "workers=1",
            f"out={out}",
            "policy=sb3",
            f"policy.sb3_path={ppo_zip}",
            f"policy.sb3_noise={noise}",
        ]
        cfg = load_config("collect", overrides, CollectConfig)
        assert cfg.policy.name == "sb3" and cfg.policy.sb3_noise == noise
        assert collect(cfg, progress=False)["collected"] == 1
        ((_, path),) = list_episodes(out)
        runs[noise] = actions = np.asarray(load_episode(path)["actions"])
        assert actions.shape == (8, 2) and (np.abs(actions) <= 1.0).all()  # Reacher bounds: [-1, 1]
    assert not np.allclose(runs[0.0], runs[0.5])
    assert torch.get_num_threads() == threads  # collecting in this process leaves torch's settings alone


def test_sb3_policy_mixing_and_shape_mismatch(ppo_zip):
    cfg = PolicyConfig("sb3", sb3_path=str(ppo_zip), sb3_noise=0.5)
    obs = np.zeros((SIZE, SIZE, 3), np.uint8)
    policy = make_policy(cfg, LOW, HIGH)
    policy.reset(np.random.default_rng(0), 50)
    info = {"native_obs": np.zeros(10, np.float32)}
    actions = np.stack([policy.act(obs, info) for _ in range(50)])
    assert (actions >= LOW).all() and (actions <= HIGH).all() and actions.std(0).min() > 0
    with pytest.raises(UserError, match="expects observations of shape"):
        policy.act(obs, {"native_obs": np.zeros(3, np.float32)})
