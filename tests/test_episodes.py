"""Episode files: atomic writes, validation (`check_dataset`), corrupt and inconsistent datasets,
config validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from selfflow_world.clips import ClipDataset, ClipSpec
from selfflow_world.config import load_config
from selfflow_world.envs.collect import CollectConfig
from selfflow_world.episodes import (
    EPISODES,
    MANIFEST,
    check_dataset,
    list_episodes,
    load_episode,
    manifest_fingerprint,
    read_manifest,
    write_episode,
)
from selfflow_world.errors import UserError


def episode_dir(root: Path, index: int) -> Path:
    return Path(root) / EPISODES / f"ep_{index:06d}"


def truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def flip_last_bytes(path: Path, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(1, n + 1):
        data[-i] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_episode(root: Path, source: int, index: int, **changes: np.ndarray) -> None:
    """Write episode ``index`` as a copy of ``source`` with some arrays replaced."""
    path = episode_dir(root, source)
    arrays = {k: np.asarray(v) for k, v in load_episode(path, mmap=False).items()}
    meta = json.loads((path / "meta.json").read_text())
    write_episode(root, index, {**arrays, **changes}, {k: v for k, v in meta.items() if k != "sha256"})


def test_good_dataset_checks_clean(tiny_dataset):
    good, bad = check_dataset(tiny_dataset)
    assert [info.index for info in good] == [0, 1, 2, 3, 4] and bad == []
    assert good[0].steps == 12 and good[0].frame_shape == (16, 16, 3) and good[0].action_dim == 2


def test_check_dataset_names_each_corrupt_file(tiny_dataset_copy):
    root = tiny_dataset_copy
    truncate(episode_dir(root, 1) / "frames.npy")
    flip_last_bytes(episode_dir(root, 2) / "actions.npy")
    (episode_dir(root, 3) / "meta.json").unlink()
    good, bad = check_dataset(root)
    assert [info.index for info in good] == [0, 4]
    assert len(bad) == 3
    for message, name in zip(
        bad, ["ep_000001/frames.npy", "ep_000002/actions.npy", "ep_000003/meta.json"], strict=True
    ):
        assert name in message and "\n" not in message
    assert "truncated" in bad[0] and "checksum" in bad[1]


def test_check_dataset_catches_missing_file_and_nan(tiny_dataset_copy):
    root = tiny_dataset_copy
    (episode_dir(root, 0) / "states.npy").unlink()
    actions = np.asarray(load_episode(episode_dir(root, 1))["actions"]).copy()
    actions[3, 0] = np.nan
    copy_episode(root, 1, 7, actions=actions)  # valid checksums, bad values
    good, bad = check_dataset(root)
    assert [info.index for info in good] == [1, 2, 3, 4]
    assert "ep_000000/states.npy" in bad[0] and "ep_000007/actions.npy" in bad[1] and "NaN" in bad[1]


@pytest.mark.parametrize("size", [None, 3, 0], ids=["half", "in-header", "empty"])
def test_clips_refuse_a_truncated_episode_or_skip_it(tiny_dataset_copy, size):
    truncate(episode_dir(tiny_dataset_copy, 1) / "frames.npy", size)
    with pytest.raises(UserError, match="ep_000001/frames.npy"):
        ClipDataset(tiny_dataset_copy, split="all")
    with pytest.warns(UserWarning, match="ep_000001/frames.npy"):
        clips = ClipDataset(tiny_dataset_copy, ClipSpec(skip_corrupt=True), split="all")
    assert [info.index for info in clips.episodes] == [0, 2, 3, 4]
    assert len(clips) == 4 * (13 - 3 + 1)
    assert clips[len(clips) - 1]["frames"].shape == (3, 3, 16, 16)


@pytest.mark.parametrize("what", ["size", "action_dim"])
def test_mixed_render_sizes_or_action_dims_are_refused(tiny_dataset_copy, what):
    root = tiny_dataset_copy
    ep = load_episode(episode_dir(root, 0), mmap=False)
    if what == "size":
        change = {"frames": np.zeros((13, 32, 32, 3), np.uint8)}
    else:
        change = {"actions": np.zeros((12, 3), np.float32)}
    assert ep["frames"].shape == (13, 16, 16, 3)
    copy_episode(root, 0, 5, **change)
    with pytest.raises(UserError, match="ep_000005") as err:
        ClipDataset(root, split="all")
    assert "one render size and one action dim" in str(err.value)
    good, bad = check_dataset(root)
    assert len(good) == 5 and len(bad) == 1 and "ep_000005" in bad[0] and "manifest" in bad[0]


def test_missing_empty_or_episodeless_directory(tmp_path, tiny_dataset_copy):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(UserError, match="sfw collect"):
            ClipDataset(root)
        with pytest.raises(UserError):
            check_dataset(root)
    for _, path in list_episodes(tiny_dataset_copy):
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    with pytest.raises(UserError, match="no complete episodes"):
        ClipDataset(tiny_dataset_copy)


def test_bad_manifest(tiny_dataset_copy):
    path = tiny_dataset_copy / MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(UserError, match="schema_version"):
        read_manifest(tiny_dataset_copy)
    path.write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_manifest(tiny_dataset_copy)


def test_write_episode_never_overwrites_and_checks_arrays(tiny_dataset_copy):
    root = tiny_dataset_copy
    fingerprint = manifest_fingerprint(root)
    before = (episode_dir(root, 0) / "frames.npy").read_bytes()
    with pytest.raises(FileExistsError):
        copy_episode(root, 1, 0)
    assert (episode_dir(root, 0) / "frames.npy").read_bytes() == before
    with pytest.raises(ValueError, match="rewards"):
        copy_episode(root, 1, 9, rewards=np.zeros(5, np.float32))
    assert not episode_dir(root, 9).exists()
    assert manifest_fingerprint(root) == fingerprint
    copy_episode(root, 1, 9)
    assert manifest_fingerprint(root) != fingerprint


@pytest.mark.parametrize("override", ["episodes=0", "steps=-1", "workers=0", "size=0"])
def test_non_positive_counts_are_user_errors(override):
    cfg = load_config("collect", [override], CollectConfig)
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"{key} must be a positive integer"):
        cfg.validate()


@pytest.mark.parametrize(
    "override, match",
    [
        ("stepz=3", "no such key"),
        ("steps=many", "steps: .*many"),
        ("policy=nope", "policy"),
        ("steps", "key=value"),
    ],
)
def test_bad_overrides_are_user_errors(override, match):
    with pytest.raises(UserError, match=match) as err:
        load_config("collect", [override], CollectConfig)
    assert "\n" not in str(err.value)


def test_config_defaults_come_from_yaml():
    cfg = load_config("collect", ["env=gym/Reacher-v5", "policy.noise_kind=ou"], CollectConfig)
    assert cfg.env == "gym/Reacher-v5" and cfg.workers == 2 and cfg.steps == 100
    assert cfg.policy.name == "noise" and cfg.policy.noise_kind == "ou"
    cfg.validate()
    with pytest.raises(UserError, match="sfw envs"):
        load_config("collect", ["env=dmc/nope-nope"], CollectConfig).validate()
