"""`sfw rl`: train in imagination, evaluate in the real env, the report, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from selfflow_world.cli import main
from selfflow_world.errors import UserError
from selfflow_world.rl import RLConfig, eval_seeds, run_rl


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's many small ops only slow down with more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sfw_rl_trains_in_imagination_and_reports_real_returns(heads_run, tmp_path, capsys):
    out = tmp_path / "rl"
    overrides = [
        f"ckpt={heads_run}",
        "algo=ppo",
        "steps=128",
        "envs=4",
        "n_steps=16",
        "batch_size=32",
        "n_epochs=2",
        "horizon=5",
        "eval_episodes=3",
        "device=cpu",
        f"out={out}",
    ]
    assert main(["rl", *overrides]) == 0
    text = capsys.readouterr().out
    assert "ppo (MlpPolicy on features) trained 128 steps in imagination (4 envs, horizon 5)" in text
    assert "policy  real return" in text and "random  real return" in text and "imagined" in text
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["agent_steps"] == 128 and report["training"]["imagined_episodes"] >= 16
    for arm in ("policy", "random"):
        entry = report["arms"][arm]
        assert entry["episodes"] == 3 and entry["steps_mean"] == 5
        assert entry["return_low"] <= entry["return_mean"] <= entry["return_high"]
        assert {"imagined_return_mean", "imagined_return_low", "imagined_return_high"} <= set(entry)
        assert entry["return_at_horizon_mean"] == pytest.approx(entry["return_mean"])  # eval_steps = horizon
        seeds = [e["env_seed"] for e in entry["per_episode"]]
        assert seeds == eval_seeds(RLConfig(eval_episodes=3))  # the same starts for both arms
    assert "| policy | 3 |" in (out / "report.md").read_text()
    gains = [
        p["return"] - r["return"]
        for p, r in zip(*(report["arms"][a]["per_episode"] for a in ("policy", "random")), strict=True)
    ]
    assert report["policy_minus_random"]["mean"] == pytest.approx(sum(gains) / 3)
    low, high = report["policy_minus_random"]["low"], report["policy_minus_random"]["high"]
    assert (
        low <= report["policy_minus_random"]["mean"] <= high
        and "policy minus random on the same starts" in text
    )
    for name in ("policy.zip", "report.md", "returns.png", "episode_0000.gif"):
        assert (out / name).is_file(), name
    assert list((out / "tb").rglob("events.out.tfevents.*"))

    from stable_baselines3 import PPO

    from selfflow_world.world_model import WorldModel

    agent = PPO.load(out / "policy.zip", device="cpu")  # the saved policy acts on the model's features
    assert agent.observation_space.shape == (WorldModel.load(heads_run).config.width,)

    # load= evaluates the saved policy again without training: the same episodes, nothing overwritten
    saved = (out / "policy.zip").read_bytes()
    again = tmp_path / "again"
    assert main(["rl", *overrides[:-1], f"load={out}", f"out={again}", "tensorboard=false"]) == 0
    assert "ppo (MlpPolicy on features) loaded from" in capsys.readouterr().out
    second = json.loads((again / "report.json").read_text())
    assert second["training"] is None and second["trained_here"] is False
    assert not (again / "policy.zip").exists() and (out / "policy.zip").read_bytes() == saved
    for arm in ("policy", "random"):
        assert [e["return"] for e in second["arms"][arm]["per_episode"]] == [
            e["return"] for e in report["arms"][arm]["per_episode"]
        ]
    assert (again / "returns.png").is_file() and "loaded from" in (again / "report.md").read_text()


def test_sac_on_frames_with_an_mlp_network(heads_run, tmp_path):
    cfg = RLConfig(
        ckpt=str(heads_run),
        algo="sac",
        observation="frames",
        network="mlp",
        steps=16,
        envs=4,
        horizon=3,
        eval_steps=7,  # real episodes longer than the imagined ones
        batch_size=8,
        learning_starts=4,
        eval_episodes=2,
        videos=0,
        tensorboard=False,
        device="cpu",
        out=str(tmp_path / "sac"),
    )
    report = run_rl(cfg, progress=False)
    assert report["training"]["agent_steps"] == 16 and report["videos"] == []
    assert report["arms"]["policy"]["episodes"] == 2 and report["settings"]["policy"] == "MlpPolicy"
    for arm in ("policy", "random"):
        entry = report["arms"][arm]
        assert entry["steps_mean"] == 7
        for episode in entry["per_episode"]:
            assert episode["imagined_steps"] == 3 and "return_at_horizon" in episode
    assert "real return" in report["summary_text"] and "(first 3 steps:" in report["summary_text"]

    saved = tmp_path / "sac" / "policy.zip"
    with pytest.raises(UserError, match="does not load as a ppo agent.*set algo= to the algorithm"):
        run_rl(replace(cfg, algo="ppo", load=str(saved), out=str(tmp_path / "ppo")), progress=False)
    wrong = r"the policy observes \(3, 16, 16\).*observation=features of .* gives \(\d+,\)"
    with pytest.raises(UserError, match=wrong):
        run_rl(replace(cfg, observation="features", load=str(saved), out=str(tmp_path / "f")), progress=False)


@pytest.mark.parametrize(
    "override,message",
    [
        ("envs=0", "envs must be a positive integer"),
        ("steps=-5", "steps must be a positive integer"),
        ("algo=dqn", "algo must be one of"),
        ("observation=pixels", "observation must be one of"),
        ("eval_episodes=0", "eval_episodes must be a positive integer"),
        ("eval_steps=0", "eval_steps must be a positive integer"),
        ("network=cnn", "network=cnn needs observation=frames"),
        ("network=resnet", "network must be auto, mlp or cnn"),
    ],
)
def test_bad_settings_are_refused_by_the_cli(override, message, heads_run, tmp_path, capsys):
    assert main(["rl", f"ckpt={heads_run}", f"out={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfw: error:") and message in err


def test_missing_heads_small_frames_and_mismatched_datasets_are_refused(
    tiny_run, heads_run, collect_config, tmp_path
):
    from selfflow_world.envs.collect import collect

    with pytest.raises(UserError, match=f"sfw heads ckpt={tiny_run} data="):
        run_rl(RLConfig(ckpt=str(tiny_run), out=str(tmp_path)), progress=False)
    with pytest.raises(UserError, match="CnnPolicy needs frames of at least 36x36"):
        run_rl(RLConfig(ckpt=str(heads_run), observation="frames", out=str(tmp_path)), progress=False)
    with pytest.raises(UserError, match="out= is required"):
        RLConfig().check()
    bigger = tmp_path / "bigger"
    collect(collect_config(bigger, size=24, episodes=1, steps=3), progress=False)
    with pytest.raises(
        UserError, match=r"has frames \(24, 24, 3\) and action dim 2; the model expects \(16, 16, 3\)"
    ):
        run_rl(RLConfig(ckpt=str(heads_run), start=str(bigger), envs=2, out=str(tmp_path)), progress=False)
    with pytest.raises(UserError, match="load=.*nothing.zip: no such file; give the policy.zip"):
        run_rl(RLConfig(ckpt=str(heads_run), load=str(tmp_path / "nothing.zip"), out=str(tmp_path)))
    cartpole = tmp_path / "cartpole"
    collect(collect_config(cartpole, env="dmc/cartpole-swingup", episodes=1, steps=3), progress=False)
    with pytest.raises(UserError, match="action dim 1; the model expects"):
        run_rl(RLConfig(ckpt=str(heads_run), start=str(cartpole), envs=2, out=str(tmp_path)), progress=False)


def test_sfw_collect_runs_a_policy_trained_on_model_features(heads_run, collect_config, tmp_path):
    """The policy.zip of sfw rl (observation=features) drives sfw collect policy=sb3: each recorded
    action is the policy's on the model's features of the recorded frames so far."""
    import numpy as np
    from stable_baselines3 import PPO

    from selfflow_world.envs.collect import collect
    from selfflow_world.envs.dream import real_observer
    from selfflow_world.envs.policies import PolicyConfig
    from selfflow_world.episodes import list_episodes, load_episode

    run = tmp_path / "rl"
    settings = ["algo=ppo", "steps=64", "envs=4", "n_steps=16", "batch_size=32", "n_epochs=1", "horizon=4"]
    rest = ["eval_episodes=1", "videos=0", "device=cpu", "tensorboard=false", f"out={run}"]
    assert main(["rl", f"ckpt={heads_run}", *settings, *rest]) == 0
    data = tmp_path / "data"
    policy = PolicyConfig("sb3", sb3_path=str(run / "policy.zip"))
    assert collect(collect_config(data, episodes=1, steps=5, policy=policy), progress=False)["collected"] == 1
    ((_, path),) = list_episodes(data)
    episode = load_episode(path)
    frames, actions = np.array(episode["frames"]), np.array(episode["actions"])
    observer, agent = real_observer(str(heads_run), "features"), PPO.load(run / "policy.zip", device="cpu")
    low, high = observer.action_space.low, observer.action_space.high
    produced = [(low + high) / 2]  # the reset frame's action, then each recorded one
    for k in range(len(actions)):
        keep = slice(max(0, k - observer.history), k + 1)
        obs = observer.observe_real(frames[keep], np.stack(produced[keep]))
        expected = np.clip(agent.predict(obs, deterministic=True)[0], low, high)
        assert np.allclose(actions[k], expected, atol=1e-5), k
        produced.append(actions[k])
    assert actions.std(0).max() > 0  # the policy acts on what it sees, not a constant

    # a collection that renders other frames than the model saw is refused by name
    with pytest.raises(UserError, match="collect with size=16"):
        collect(collect_config(tmp_path / "big", episodes=1, steps=2, size=24, policy=policy), progress=False)
