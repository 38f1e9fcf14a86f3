"""sfw imagine and sfw eval: files written, documented report keys, replay fidelity, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfflow_world.cli import main
from selfflow_world.clips import per_frame as per_frame_actions
from selfflow_world.config import load_config
from selfflow_world.episodes import list_episodes, load_episode
from selfflow_world.evaluate import EvalConfig, run_eval, summary_text
from selfflow_world.model import WorldDiT

REPORT_KEYS = {
    "checkpoint",
    "step",
    "env",
    "episodes",
    "split",
    "horizon",
    "psnr",
    "ssim",
    "psnr_gain_over_copy_last",
    "controllability",
    "replay",
    "counterfactual",
    "history_use",
    "state_probe",
    "representation_r2",
    "plots",
    "summary_text",
}


def test_per_frame_actions_alignment():
    acts = np.arange(10, dtype=np.float32).reshape(5, 2)  # a_0..a_4
    out = per_frame_actions(acts, first=2, count=3)  # frames 2, 3, 4 were produced by a_1, a_2, a_3
    assert np.array_equal(out, acts[1:4])
    assert np.array_equal(per_frame_actions(acts, 0, 2), np.stack([np.zeros(2), acts[0]]))


@pytest.mark.parametrize("compile", ["false", "true"])
def test_imagine_writes_side_by_side_videos(tiny_run, tiny_dataset, tmp_path, compile, monkeypatch):
    # compile=true must reach the model; compiled rollouts themselves are tested in test_world_model
    import imageio.v3 as iio

    compiled = []
    monkeypatch.setattr(WorldDiT, "compile_rollouts", lambda self, freeze=False: compiled.append(freeze))
    out = tmp_path / "img"
    assert (
        main(
            [
                "imagine",
                f"ckpt={tiny_run}",
                f"data={tiny_dataset}",
                f"out={out}",
                "horizon=4",
                "episodes=2",
                "split=all",
                f"compile={compile}",
            ]
        )
        == 0
    )
    assert compiled == ([True] if compile == "true" else [])  # frozen graphs on CPU
    gifs, mp4s = sorted(out.glob("ep_*.gif")), sorted(out.glob("ep_*.mp4"))
    assert len(gifs) == 2 and len(mp4s) == 2
    # one start under the recorded and three alternative action sequences: four labelled rows
    grid = iio.imread(out / "actions.gif")
    assert grid.shape[0] == 4 and grid.shape[1] == 4 * (12 + 2 * 16)
    frames = iio.imread(gifs[0])
    assert frames.shape[0] == 4 and frames.shape[2] > 3 * frames.shape[1] - 10  # three panels side by side


def test_eval_writes_documented_report(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    cfg = load_config(
        "eval",
        [
            f"ckpt={tiny_run}",
            f"data={tiny_dataset}",
            f"out={out}",
            "horizon=4",
            "probe_epochs=2",
            "probe_frames=64",
        ],
        EvalConfig,
    )
    report = run_eval(cfg)
    saved = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "state error @4 <= 3x floor" in saved["summary_text"]  # the bar, in what `sfw eval` prints
    assert "\n- state error @4 <= 3x floor" in md  # and as a list in the report
    n = len(saved["episodes"])  # the printed bar says over how many rollouts, and warns when few
    assert f"bar on these {n} rollouts (few rollouts give wide intervals" in saved["summary_text"]
    many = summary_text({**saved, "episodes": list(range(20))})
    assert "bar on these 20 rollouts:" in many and "few rollouts" not in many
    assert REPORT_KEYS <= set(saved)
    assert set(saved["psnr"]) == {"model", "copy_last", "untrained"}
    assert len(saved["psnr"]["model"]["per_horizon"]["mean"]) == report["horizon"] == 4
    assert saved["replay"]["replay_matches_recording"] is True  # the simulator replays the recording exactly
    assert {"floor_rmse", "model", "copy_last", "frechet_transitions"} <= set(saved["state_probe"])
    sp = saved["state_probe"]["model"]
    per_dim = np.asarray(sp["relative_to_floor_per_dim"])
    assert per_dim.shape == (4, len(saved["state_probe"]["floor_rmse"]))
    assert np.allclose(per_dim.mean(-1), sp["relative_to_floor_per_horizon"])
    assert set(saved["representation_r2"]["model"]) == {"1", "2"}
    c = saved["controllability"]
    assert c["gap"] == pytest.approx(c["error_shuffled"] - c["error_true"], abs=1e-9)
    cf = saved["counterfactual"]
    assert cf["alternatives"] == ["other_episode", "uniform", "zero"]
    for name in cf["alternatives"]:
        row = cf["per_alternative"][name]
        assert len(row["following_ratio"]["per_horizon"]["mean"]) == 4
        assert len(row["psnr_vs_simulator"]["per_horizon"]["mean"]) == 4
        assert len(row["state_error_relative_to_floor_per_horizon"]) == 4
        assert all(c > 0 for c in row["following_ratio"]["simulator_change_per_horizon"])
    assert len(cf["following_ratio"]["per_horizon"]["low"]) == 4
    assert "action_following_vs_horizon.png" in saved["plots"]
    assert "Following actions" in md and "action-following ratio" in saved["summary_text"]
    # copy-last scores 0 on motion use by construction; the figure is finite with a 2-frame context
    assert saved["history_use"]["true_frame_change"] > 0
    assert saved["history_use"]["simulator_ratio"] > 0  # the simulator's next frame depends on velocity
    for plot in saved["plots"]:
        assert (out / plot).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "copy_last" in md and "Controllability" in md
    # the paired gain is the per-rollout difference, so its mean is the difference of the means
    gain = saved["psnr_gain_over_copy_last"]["per_horizon"]["mean"]
    for j, g in enumerate(gain):
        p = saved["psnr"]
        assert g == pytest.approx(
            p["model"]["per_horizon"]["mean"][j] - p["copy_last"]["per_horizon"]["mean"][j], abs=1e-4
        )
    assert "paired" in md
    # copying the last context frame scores the same as computing it by hand
    assert saved["psnr"]["copy_last"]["per_horizon"]["mean"][0] > 10


def test_eval_reports_the_heads_without_changing_the_imagined_frames(
    tiny_run, heads_run, tiny_dataset, tmp_path
):
    def report(ckpt, out):
        args = [f"ckpt={ckpt}", f"data={tiny_dataset}", f"out={out}", "horizon=4", "probe_epochs=1"]
        args += ["probe_frames=32", "replay=false", "representation=false"]
        return run_eval(load_config("eval", args, EvalConfig))

    plain, with_heads = report(tiny_run, tmp_path / "a"), report(heads_run, tmp_path / "b")
    assert "heads" not in plain
    # the heads' rollout is the same rollout: same noise, same frames, same PSNR
    assert with_heads["psnr"]["model"] == plain["psnr"]["model"]
    heads = with_heads["heads"]
    assert len(heads["imagined"]["reward_mae_per_horizon"]["mean"]) == 4
    assert heads["imagined"]["reward_mae"]["mean"] >= 0 and heads["recorded_frames"]["examples"] > 0
    assert "Reward and termination heads" in (tmp_path / "b" / "report.md").read_text()
    assert "reward heads" in with_heads["summary_text"]


def _copy_last_psnr_at_1(real_frames, copy_frames) -> float:
    """Mean PSNR (frames in [-1, 1]) of copying each rollout's last context frame, uint8 (B, h, w, 3)."""
    real = torch.from_numpy(np.stack(real_frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    copy = torch.from_numpy(np.stack(copy_frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    mse = (real - copy).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4 / mse)).mean())


def test_eval_from_a_shorter_context_than_the_models(tiny_run, tiny_dataset, tmp_path):
    cfg = load_config(
        "eval",
        [f"ckpt={tiny_run}", f"data={tiny_dataset}", f"out={tmp_path / 'e'}", "horizon=3", "context=1"]
        + ["probe_epochs=1", "probe_frames=32", "representation=false"],
        EvalConfig,
    )
    report = run_eval(cfg)
    assert report["context_frames"] == 1 and report["horizon"] == 3
    # the rollouts start one frame earlier than the model's 2-frame context would: copy-last repeats
    # each episode's first frame, and the first frame imagined is the episode's second
    paths = dict(list_episodes(tiny_dataset))
    first = [load_episode(paths[i])["frames"] for i in report["episodes"]]
    assert all(s == 0 for s in report["segment_starts"])
    expected = _copy_last_psnr_at_1([f[1] for f in first], [f[0] for f in first])
    assert report["psnr"]["copy_last"]["per_horizon"]["mean"][0] == pytest.approx(expected, abs=1e-3)


def test_eval_takes_several_rollouts_per_episode(tiny_run, tiny_dataset, tmp_path):
    cfg = load_config(
        "eval",
        [f"ckpt={tiny_run}", f"data={tiny_dataset}", f"out={tmp_path / 'e'}", "horizon=3", "split=all"]
        + ["episodes=2", "per_episode=2", "probe_epochs=1", "probe_frames=32", "representation=false"],
        EvalConfig,
    )
    report = run_eval(cfg)
    # two episodes, two consecutive non-overlapping segments of 2 context + 3 imagined frames each
    first, second = report["episodes"][0], report["episodes"][2]
    assert report["episodes"] == [first, first, second, second]
    assert report["segment_starts"] == [0, 5, 0, 5]
    # each rollout's context is its own segment's: copy-last repeats frame start + 1 of the episode
    paths = dict(list_episodes(tiny_dataset))
    frames = {i: load_episode(paths[i])["frames"] for i in (first, second)}
    pairs = list(zip(report["episodes"], report["segment_starts"], strict=True))
    expected = _copy_last_psnr_at_1(
        [frames[i][s + 2] for i, s in pairs], [frames[i][s + 1] for i, s in pairs]
    )
    assert report["psnr"]["copy_last"]["per_horizon"]["mean"][0] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    "args, match",
    [
        (["horizon=0"], "horizon must be a positive"),
        (["ckpt=/nonexistent"], "no checkpoint"),
        (["split=bogus"], "split must be train, val or all"),
        (["context=0"], "context must be a whole number of frames from 1 to 2"),
        (["context=3"], "context must be a whole number of frames from 1 to 2"),
        (["per_episode=0"], "per_episode must be a whole number of rollouts per episode, 1 or more"),
    ],
)
def test_eval_bad_input(tiny_run, tiny_dataset, tmp_path, capsys, args, match):
    base = [f"ckpt={tiny_run}", f"data={tiny_dataset}", f"out={tmp_path / 'e'}"]
    assert main(["eval", *base, *args]) == 2
    assert match in capsys.readouterr().err


def test_imagine_dataset_of_other_size_is_refused(tiny_run, tmp_path, collect_config, capsys):
    from selfflow_world.envs.collect import collect

    other = tmp_path / "big"
    collect(collect_config(other, size=32, episodes=2), progress=False)
    assert main(["imagine", f"ckpt={tiny_run}", f"data={other}", f"out={tmp_path / 'i'}"]) == 2
    assert "model expects (16, 16, 3)" in capsys.readouterr().err


def test_simulator_motion_use_is_zero_at_rest_and_positive_in_motion(tiny_dataset):
    """The motion-use reference zeroes the joint velocities of the restored pose: from a pose that is
    already at rest it reproduces the real next frame (0), from a moving one it does not (> 0)."""
    from selfflow_world.envs import make_like
    from selfflow_world.episodes import inspect_episode, read_manifest
    from selfflow_world.evaluate import StateMap, replay, simulator_motion_use

    index, path = list_episodes(tiny_dataset)[0]
    info, arrays = inspect_episode(index, path), load_episode(path)
    env = make_like(read_manifest(tiny_dataset))
    state_map = StateMap(env.nq, env.nv, env.wrapped_qpos())
    try:
        k = 6  # a frame in mid-motion under the coloured-noise policy
        moving = np.asarray(arrays["states"][k : k + 1], dtype=np.float64)
        assert np.abs(moving[0, 1 + env.nq : 1 + env.nq + env.nv]).max() > 0
        actions = np.asarray(arrays["actions"][k : k + 2], dtype=np.float32)[None]
        ctx = np.asarray(arrays["frames"][k : k + 1])[None]  # the last context frame
        nxt, _ = replay(env, [info], moving, actions)
        assert (
            simulator_motion_use(env, [info], state_map, moving, actions, nxt, ctx)["simulator_ratio"] > 0.05
        )
        at_rest = moving.copy()
        at_rest[:, 1 + env.nq : 1 + env.nq + env.nv] = 0.0
        nxt_rest, _ = replay(env, [info], at_rest, actions)
        assert (
            simulator_motion_use(env, [info], state_map, at_rest, actions, nxt_rest, ctx)["simulator_ratio"]
            == 0.0
        )
    finally:
        env.close()


def _bar_report(ratio8=0.9, gain_low=0.1, state8=2.5, alt8=(2.0, 2.2)):
    """A minimal evaluation report, 8 frames ahead, with the figures the bar reads."""
    h = 8
    curve = lambda mean, low: {"mean": [mean] * h, "low": [low] * h, "high": [mean + 0.1] * h}  # noqa: E731
    ratio = curve(0.8, 0.7)
    ratio["mean"][7], ratio["low"][7] = ratio8, ratio8 - 0.1
    gain = curve(1.0, 0.5)
    gain["low"][5] = gain_low
    per_alt = {
        name: {"state_error_relative_to_floor_per_horizon": [1.0] * 7 + [v]}
        for name, v in zip(("other_episode", "uniform"), alt8, strict=True)
    }
    return {
        "horizon": h,
        "counterfactual": {"following_ratio": {"per_horizon": ratio}, "per_alternative": per_alt},
        "psnr_gain_over_copy_last": {"per_horizon": gain},
        "state_probe": {
            "model": {"relative_to_floor_per_horizon": [1.0] * 7 + [state8]},
            "copy_last": {"relative_to_floor_per_horizon": [1.0] * 7 + [3.3]},
        },
    }


@pytest.mark.parametrize(
    "change, missed",
    [
        ({}, None),
        ({"ratio8": 0.45}, "following ratio"),
        ({"gain_low": -0.01}, "PSNR above copy-last"),
        ({"state8": 3.01}, "state error"),
        ({"alt8": (2.0, 3.2)}, "state error"),  # an alternative's error counts like the recorded one's
    ],
)
def test_bar_parts_say_which_part_is_missed(change, missed):
    from selfflow_world.evaluate import bar_parts

    parts = bar_parts(_bar_report(**change))
    assert len(parts) == 3
    for part in parts:
        assert part.split(":")[1].split()[0] == ("missed" if missed and part.startswith(missed) else "met"), (
            part
        )
    state = parts[2]
    assert "recorded actions" in state and "other episode" in state and "uniform" in state
