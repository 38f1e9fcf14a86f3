"""Dream envs: the Gymnasium and SB3 contracts, seeding, batched auto-reset, PPO on them, bad input."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from selfflow_world.envs import DreamEnv, DreamVecEnv, make
from selfflow_world.envs.dream import close_env, env_context
from selfflow_world.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models run many small ops, which extra threads only slow
    down on a busy machine (tens of times, when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wm(heads_run):
    from selfflow_world.world_model import WorldModel

    return WorldModel.load(heads_run)


def _real_context(wm, seed):
    render = wm.meta["render"]
    env = make(
        wm.meta["env"],
        size=wm.config.image_size,
        camera=render["camera"],
        action_repeat=render["action_repeat"],
    )
    try:
        return env_context(env, seed, wm.history)
    finally:
        close_env(env)


def _actions(n: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (steps, n, 2)).astype(np.float32)


@pytest.mark.parametrize("observation", ["frames", "features"])
def test_dream_env_passes_the_gymnasium_and_sb3_checkers(wm, observation):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = DreamEnv(wm, horizon=3, observation=observation)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unbounded feature box, 16x16 images, no spec: advice only
            check_env(env)
            sb3_check_env(env)
        obs, info = env.reset(seed=0)
        if observation == "frames":
            assert obs.shape == (16, 16, 3) and obs.dtype == np.uint8
        else:
            assert obs.shape == (wm.config.width,) and obs.dtype == np.float32
        assert env.render().shape == (16, 16, 3) and env.render().dtype == np.uint8
    finally:
        env.close()


def test_same_seed_same_imagined_episode_from_the_real_envs_start(wm):
    env = DreamEnv(wm, horizon=4)
    acts = _actions(1, 4)[:, 0]

    def episode(seed):
        first, info = env.reset(seed=seed)
        rows = [(first, 0.0, False, False)]
        rows += [env.step(a)[:4] for a in acts]
        return info, rows

    try:
        info, a = episode(5)
        _, b = episode(5)
        _, c = episode(6)
    finally:
        env.close()
    assert info == {"episode_seed": 5}
    for (fa, ra, ta, ua), (fb, rb, tb, ub) in zip(a, b, strict=True):
        assert np.array_equal(fa, fb) and ra == rb and ta == tb and ua == ub
    assert not np.array_equal(a[0][0], c[0][0])  # another seed: another start (the target moved)
    frames, _ = _real_context(wm, 5)
    assert np.array_equal(a[0][0], frames[-1])  # reset(seed=s) starts where the real env's reset(seed=s) does
    assert [row[3] for row in a] == [False, False, False, False, True]  # truncated at the horizon
    assert not any(row[2] for row in a)  # and that is no termination


def test_termination_comes_from_the_heads_and_ends_the_episode(wm, monkeypatch):
    class Terminal(torch.nn.Module):
        def forward(self, features):
            batch = features.shape[0]
            return torch.full((batch,), 0.5), torch.full((batch,), 0.9)

    monkeypatch.setattr(wm, "heads", Terminal())
    env = DreamEnv(wm, horizon=10)
    try:
        env.reset(seed=0)
        _, reward, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert reward == 0.5 and terminated and not truncated
        with pytest.raises(RuntimeError, match="call reset"):
            env.step(np.zeros(2, np.float32))
    finally:
        env.close()
    venv = DreamVecEnv(wm, 2, horizon=10, seed=0)
    try:
        venv.reset()
        _, rewards, dones, infos = venv.step(np.zeros((2, 2), np.float32))
        assert dones.tolist() == [True, True] and rewards.tolist() == [0.5, 0.5]
        assert all(not i["TimeLimit.truncated"] and i["episode"]["l"] == 1 for i in infos)
    finally:
        venv.close()


@pytest.mark.parametrize("observation", ["frames", "features"])
def test_vec_env_shapes_auto_reset_terminal_observation_and_episode_infos(wm, observation):
    venv = DreamVecEnv(wm, 3, horizon=2, observation=observation, seed=0)
    shape = (16, 16, 3) if observation == "frames" else (wm.config.width,)
    dtype = np.uint8 if observation == "frames" else np.float32
    try:
        obs = venv.reset()
        assert obs.shape == (3, *shape) and obs.dtype == dtype
        assert venv.observation_space.shape == shape and venv.action_space.shape == (2,)
        first_seeds = venv.get_attr("episode_seed")
        total = np.zeros(3)
        for k, actions in enumerate(_actions(3, 2)):
            obs, rewards, dones, infos = venv.step(actions)
            assert obs.shape == (3, *shape) and obs.dtype == dtype
            assert rewards.shape == (3,) and rewards.dtype == np.float32
            assert dones.shape == (3,) and dones.dtype == bool
            total += rewards
            if k == 0:
                assert not dones.any() and all(i == {"TimeLimit.truncated": False} for i in infos)
                stepped = obs.copy()
        assert dones.all()
        for i, info in enumerate(infos):
            assert info["TimeLimit.truncated"] is True
            assert info["terminal_observation"].shape == shape and info["terminal_observation"].dtype == dtype
            assert info["episode"]["l"] == 2 and info["episode"]["r"] == pytest.approx(total[i], abs=1e-5)
            assert info["episode"]["t"] >= 0
        # the rows started over: new seeds, and the observation is the new context's
        seeds = venv.get_attr("episode_seed")
        assert len(set(seeds) | set(first_seeds)) == 6
        if observation == "frames":
            for i, seed in enumerate(seeds):
                assert np.array_equal(obs[i], _real_context(wm, seed)[0][-1])
        assert not np.array_equal(obs, np.stack([i["terminal_observation"] for i in infos]))
        assert not np.array_equal(stepped, obs)
        assert venv.get_attr("episode_length") == [0, 0, 0]
    finally:
        venv.close()


@pytest.mark.parametrize("observation", ["frames", "features"])
def test_a_row_that_restarts_leaves_the_other_rows_unchanged(wm, observation):
    actions = _actions(3, 5)

    def run(short_row: bool):
        venv = DreamVecEnv(wm, 3, horizon=10, observation=observation, seed=3)
        if short_row:
            venv.set_attr("horizon", 2, indices=[0])  # row 0 alone restarts, after steps 2 and 4
        try:
            venv.reset()
            steps = [venv.step(a) for a in actions]
        finally:
            venv.close()
        return np.stack([s[0] for s in steps]), np.stack([s[1] for s in steps]), [s[2] for s in steps]

    plain_obs, plain_rewards, plain_dones = run(False)
    obs, rewards, dones = run(True)
    assert [d.tolist() for d in plain_dones] == [[False] * 3] * 5
    assert [d[0] for d in dones] == [False, True, False, True, False] and not any(d[1:].any() for d in dones)
    if observation == "frames":
        assert np.array_equal(obs[:, 1:], plain_obs[:, 1:])
    else:
        assert np.allclose(obs[:, 1:], plain_obs[:, 1:], atol=1e-5)
    assert np.allclose(rewards[:, 1:], plain_rewards[:, 1:], atol=1e-6)
    assert np.array_equal(obs[0, 0], plain_obs[0, 0])  # identical until row 0's episode ends
    assert not np.allclose(obs[2:, 0], plain_obs[2:, 0])


def test_vec_env_seeding_follows_sb3(wm):
    actions = _actions(2, 3)

    def run(seed):
        venv = DreamVecEnv(wm, 2, horizon=2)
        try:
            assert venv.seed(seed) == [seed, seed + 1]
            first = venv.reset()
            seeds = venv.get_attr("episode_seed")
            steps = [venv.step(a)[:2] for a in actions]  # a restart after step 2
        finally:
            venv.close()
        return first, seeds, steps

    a, b, c = run(11), run(11), run(12)
    assert a[1] == [11, 12] and c[1] == [12, 13]
    assert np.array_equal(a[0][0], _real_context(wm, 11)[0][-1])
    for (oa, ra), (ob, rb) in zip(a[2], b[2], strict=True):
        assert np.array_equal(oa, ob) and np.array_equal(ra, rb)
    assert np.array_equal(a[0][1], c[0][0])  # seed 12 is row 1 of one and row 0 of the other
    assert not np.array_equal(a[2][-1][0], c[2][-1][0])


def test_vec_env_get_attr_set_attr_env_method_wrapped_and_render(wm):
    from stable_baselines3.common.monitor import Monitor

    venv = DreamVecEnv(wm, 3, horizon=5, seed=0)
    try:
        assert venv.render_mode == "rgb_array" and venv.metadata["render_modes"] == ["rgb_array"]
        obs = venv.reset()
        assert venv.get_attr("horizon") == [5, 5, 5] and venv.get_attr("index", indices=[2]) == [2]
        assert venv.has_attr("horizon") and not venv.has_attr("no_such_attribute")
        venv.set_attr("horizon", 7, indices=1)
        assert venv.get_attr("horizon") == [5, 7, 5] and venv.horizon == 5
        assert np.array_equal(venv.env_method("render", indices=[1])[0], obs[1])
        assert venv.render().shape == (32, 32, 3)  # 3 frames tiled 2 x 2
        venv.step(_actions(3, 1)[0])
        before = venv.get_attr("episode_seed")
        ((row_obs, info),) = venv.env_method("reset", indices=[1], seed=99)
        assert info == {"episode_seed": 99} and venv.get_attr("episode_seed") == [before[0], 99, before[2]]
        assert np.array_equal(row_obs, _real_context(wm, 99)[0][-1])
        assert venv.get_attr("episode_length") == [1, 0, 1]
        assert venv.env_is_wrapped(Monitor) == [True] * 3  # episodes reported as Monitor does
        assert venv.env_is_wrapped(gym.wrappers.TimeLimit) == [False] * 3
        with pytest.raises(AttributeError):
            venv.get_attr("no_such_attribute")
    finally:
        venv.close()


def test_ppo_trains_on_the_dream_vec_env_unchanged(wm):
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy

    venv = DreamVecEnv(wm, 4, horizon=6, observation="features", seed=0)
    try:
        model = PPO("MlpPolicy", venv, n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu")
        model.learn(total_timesteps=256)
        assert model.num_timesteps == 256
        assert len(model.ep_info_buffer) >= 32  # the Monitor-style infos reached SB3's logger
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mean, _ = evaluate_policy(model, venv, n_eval_episodes=4)
        assert np.isfinite(mean)
        assert not [w for w in caught if "Monitor" in str(w.message)]  # it reads the episode infos
    finally:
        venv.close()


def test_dataset_starts_are_recorded_windows(wm, tiny_dataset):
    from selfflow_world.episodes import list_episodes, load_episode

    env = DreamEnv(wm, horizon=2, start=str(tiny_dataset))
    try:
        obs, _ = env.reset(seed=4)
        again, _ = env.reset(seed=4)
        env.step(np.zeros(2, np.float32))
    finally:
        env.close()
    assert np.array_equal(obs, again)
    recorded = np.concatenate([load_episode(path)["frames"] for _, path in list_episodes(tiny_dataset)])
    assert (recorded == obs).all(axis=(1, 2, 3)).any()


def test_bad_input_is_refused(wm, tiny_run, collect_config, tmp_path):
    from selfflow_world.envs.collect import collect

    with pytest.raises(UserError, match="sfw heads ckpt="):
        DreamEnv(str(tiny_run))
    with pytest.raises(UserError, match="horizon must be a positive integer"):
        DreamEnv(wm, horizon=0)
    with pytest.raises(UserError, match=r"steps \(sampler steps per imagined frame\) must be in \[1, 50\]"):
        DreamEnv(wm, steps=0)
    with pytest.raises(UserError, match="observation must be one of"):
        DreamEnv(wm, observation="pixels")
    with pytest.raises(UserError, match="num_envs must be a positive integer"):
        DreamVecEnv(wm, 0)
    with pytest.raises(UserError, match="start must be 'env'"):
        DreamEnv(wm, start=str(tmp_path / "nowhere"))
    bigger = tmp_path / "bigger"
    collect(collect_config(bigger, size=24, episodes=1, steps=3), progress=False)
    with pytest.raises(UserError, match=r"frames \(24, 24, 3\).*the model expects \(16, 16, 3\)"):
        DreamVecEnv(wm, 2, start=str(bigger))
    cartpole = tmp_path / "cartpole"
    collect(collect_config(cartpole, env="dmc/cartpole-swingup", episodes=1, steps=3), progress=False)
    with pytest.raises(UserError, match="action dim 1; the model expects"):
        DreamEnv(wm, start=str(cartpole))


def _with_probes(heads_run, tmp_path):
    """A copy of the heads model with a (random-weight) state and target probe shipped beside it."""
    import json
    import shutil

    from safetensors.torch import save_file

    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.plan import PROBE_FILES
    from selfflow_world.probe import StateProbe
    from selfflow_world.world_model import WorldModel

    ckpt = tmp_path / "probed"
    shutil.copytree(resolve_checkpoint(heads_run), ckpt)
    for name, dim in (("state", 4), ("target", 2)):
        torch.manual_seed(dim)
        probe = StateProbe(16, dim, 4)
        weights, meta = PROBE_FILES[name]
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(ckpt / weights))
        (ckpt / meta).write_text(json.dumps({"image_size": [16, 16], "state_dim": dim, "width": 4}))
    return WorldModel.load(ckpt)


def test_probe_observations_and_target_reward_read_the_shipped_probes(heads_run, tmp_path):
    from gymnasium.utils.env_checker import check_env

    probed = _with_probes(heads_run, tmp_path)
    env = DreamEnv(probed, horizon=3, observation="probes", reward="target")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_env(env)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (2 * (4 + 2),) and obs.dtype == np.float32
        obs, reward, *_ = env.step(np.zeros(2, np.float32))
        frame = env.render()[None]
        readings = env.dream.read_probes(frame)
        assert np.allclose(obs[:4], readings["state"][0], atol=1e-5)
        assert np.allclose(obs[4:6], readings["target"][0], atol=1e-5)
        assert reward == pytest.approx(-float(np.linalg.norm(readings["target"][0])), abs=1e-5)
    finally:
        env.close()


def test_probes_and_target_reward_need_shipped_probes(wm):
    with pytest.raises(
        UserError, match="observation=probes needs at least a state probe.*sfw probe ckpt=.*score=state"
    ):
        DreamEnv(wm, observation="probes")
    with pytest.raises(UserError, match="reward=target needs a target probe.*score=target"):
        DreamEnv(wm, reward="target")
