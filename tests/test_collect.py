"""Collection: determinism, action alignment, crash safety, resume, parallel workers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from selfflow_world.envs import make
from selfflow_world.envs.collect import collect, episode_seeds
from selfflow_world.episodes import EPISODES, MANIFEST, list_episodes, load_episode
from selfflow_world.errors import UserError


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file of a dataset (episodes and manifest), keyed by relative path."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def episode_digest(root: Path) -> dict[str, str]:
    return {k: v for k, v in digest(root).items() if k.startswith(EPISODES)}


def temp_entries(root: Path) -> list[str]:
    return [p.name for p in (Path(root) / EPISODES).iterdir() if p.name.startswith(".tmp-")]


def test_episode_layout(tiny_dataset):
    episodes = list_episodes(tiny_dataset)
    assert [i for i, _ in episodes] == [0, 1, 2, 3, 4]
    for index, path in episodes:
        ep = load_episode(path)
        meta = json.loads((path / "meta.json").read_text())
        assert ep["frames"].dtype == np.uint8 and ep["frames"].shape == (13, 16, 16, 3)
        assert ep["actions"].dtype == np.float32 and ep["actions"].shape == (12, 2)
        assert (np.abs(ep["actions"]) <= 1.0).all()  # reacher's bounds
        assert ep["rewards"].shape == (12,) and ep["states"].shape[0] == 13
        # the step limit is a truncation, never a termination
        assert not ep["terminated"].any() and ep["truncated"][-1] and not ep["truncated"][:-1].any()
        assert meta["index"] == index and meta["steps"] == 12 and meta["action_repeat"] == 4
        assert meta["env_seed"] == episode_seeds(0, index)[0]
        assert set(meta["sha256"]) == {"frames", "actions", "rewards", "terminated", "truncated", "states"}
    manifest = json.loads((tiny_dataset / MANIFEST).read_text())
    assert (
        manifest["env"] == "dmc/reacher-easy" and manifest["size"] == [16, 16] and manifest["action_dim"] == 2
    )


def test_same_seed_same_dataset(tiny_dataset, collect_config, tmp_path):
    collect(collect_config(tmp_path / "again", episodes=2), progress=False)
    reference = episode_digest(tiny_dataset)
    again = episode_digest(tmp_path / "again")
    assert again and all(reference[k] == v for k, v in again.items())
    collect(collect_config(tmp_path / "other", episodes=1, seed=1), progress=False)
    other = load_episode(list_episodes(tmp_path / "other")[0][1])
    first = load_episode(list_episodes(tiny_dataset)[0][1])
    assert not np.array_equal(other["actions"], first["actions"])
    assert not np.array_equal(other["frames"], first["frames"])


def test_action_alignment(tiny_dataset):
    """Frame k+1 is what applying a_k to the state shown in frame k gives."""
    (_, path), *_ = list_episodes(tiny_dataset)
    ep = load_episode(path, mmap=False)
    seed = json.loads((path / "meta.json").read_text())["env_seed"]
    env = make("dmc/reacher-easy", size=16)
    try:
        for k in range(0, 11, 2):
            env.restore(ep["states"][k], seed=seed)
            obs, reward, *_ = env.step(ep["actions"][k])
            np.testing.assert_array_equal(
                obs, ep["frames"][k + 1], err_msg=f"a_{k} does not give frame {k + 1}"
            )
            assert np.float32(reward) == ep["rewards"][k]
            env.restore(ep["states"][k], seed=seed)  # the neighbouring action gives another frame
            assert not np.array_equal(env.step(ep["actions"][k + 1])[0], ep["frames"][k + 1])
    finally:
        env.close()


@pytest.mark.parametrize("target, fail_at", [("numpy.save", 2 * 6 + 3), ("os.rename", 3)])
def test_crash_mid_write_leaves_no_episode(
    target, fail_at, tiny_dataset, collect_config, tmp_path, monkeypatch
):
    """A writer that dies inside episode 2 leaves only a temporary directory; the next run removes
    it and the dataset equals an uninterrupted one."""
    real = {"numpy.save": np.save, "os.rename": os.rename}[target]
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError("simulated crash")
        return real(*args, **kwargs)

    out = tmp_path / "d"
    monkeypatch.setattr(target, crashing)
    with pytest.raises(OSError, match="simulated crash"):
        collect(collect_config(out, episodes=3), progress=False)
    monkeypatch.undo()
    assert [i for i, _ in list_episodes(out)] == [0, 1]
    assert not (out / EPISODES / "ep_000002").exists()
    (leftover,) = temp_entries(out)
    assert leftover.startswith(".tmp-ep_000002-")
    # the next run is another process: its temporary directories have other names
    (out / EPISODES / leftover).rename(out / EPISODES / ".tmp-ep_000002-1")

    assert collect(collect_config(out, episodes=3), progress=False)["collected"] == 1
    assert temp_entries(out) == []
    reference = episode_digest(tiny_dataset)
    resumed = episode_digest(out)
    assert len(resumed) == 3 * 7 and all(reference[k] == v for k, v in resumed.items())


@pytest.mark.slow
def test_killed_collection_resumes_to_the_same_dataset(collect_config, tmp_path):
    """SIGKILL `sfw collect` (two workers) after a few episodes, rerun it: same dataset as one run."""
    out = tmp_path / "killed"
    args = ["env=dmc/reacher-easy", "episodes=12", "steps=20", "size=16", "seed=0", "workers=2", f"out={out}"]
    command = [sys.executable, "-m", "selfflow_world.cli", "collect", *args]
    proc = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    try:
        while len(list_episodes(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the parent and its workers
        proc.wait()
    interrupted = len(list_episodes(out))
    assert proc.returncode == -signal.SIGKILL and 3 <= interrupted < 12

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({interrupted} already there)" in rerun.stdout

    whole = tmp_path / "whole"
    collect(collect_config(whole, episodes=12, steps=20), progress=False)
    assert temp_entries(out) == []
    assert episode_digest(out).keys() == episode_digest(whole).keys()
    assert episode_digest(out) == episode_digest(whole)


def test_rerun_with_same_settings_collects_nothing(tiny_dataset_copy, collect_config):
    before = digest(tiny_dataset_copy)
    summary = collect(collect_config(tiny_dataset_copy), progress=False)
    assert summary["collected"] == 0 and summary["skipped_existing"] == 5
    assert digest(tiny_dataset_copy) == before


def test_more_episodes_adds_only_the_missing_ones(tiny_dataset_copy, collect_config):
    before = digest(tiny_dataset_copy)
    summary = collect(collect_config(tiny_dataset_copy, episodes=6), progress=False)
    assert summary["collected"] == 1 and summary["frames"] == 12
    after = digest(tiny_dataset_copy)
    assert {k: after[k] for k in before} == before
    assert sorted({Path(k).parts[1] for k in set(after) - set(before)}) == ["ep_000005"]


@pytest.mark.parametrize("change", [{"seed": 1}, {"env": "dmc/reacher-hard"}, {"steps": 20}, {"size": 32}])
def test_rerun_with_other_settings_is_refused(change, tiny_dataset_copy, collect_config):
    before = digest(tiny_dataset_copy)
    with pytest.raises(UserError, match=f"other settings.*{next(iter(change))}"):
        collect(collect_config(tiny_dataset_copy, **change), progress=False)
    assert digest(tiny_dataset_copy) == before


def test_out_must_be_a_dataset_or_new(collect_config, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        collect(collect_config(tmp_path / "file"), progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="non-empty"):
        collect(collect_config(tmp_path / "busy"), progress=False)
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_two_workers_give_the_same_dataset(tiny_dataset, collect_config, tmp_path):
    summary = collect(collect_config(tmp_path / "two", workers=2), progress=False)
    assert summary["collected"] == 5 and summary["frames"] == 5 * 12
    assert episode_digest(tmp_path / "two") == episode_digest(tiny_dataset)
    assert digest(tmp_path / "two")[MANIFEST] == digest(tiny_dataset)[MANIFEST]
