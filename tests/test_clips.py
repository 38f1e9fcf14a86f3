"""Training clips: item layout, action/reward alignment, clip counts, episode split, DataLoader."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from selfflow_world.clips import ClipDataset, ClipSpec, split_episodes
from selfflow_world.episodes import MANIFEST, list_episodes, load_episode
from selfflow_world.errors import UserError


def test_item_layout(tiny_dataset):
    clips = ClipDataset(tiny_dataset, ClipSpec(history=2, future=2), split="all")
    item = clips[3]
    expected = {
        "frames": (torch.uint8, (4, 3, 16, 16)),
        "actions": (torch.float32, (4, 2)),
        "rewards": (torch.float32, (4,)),
        "terminated": (torch.bool, (4,)),
        "truncated": (torch.bool, (4,)),
        "states": (torch.float32, (4, clips.state_dim)),
    }
    assert set(item) == {*expected, "episode", "start"}
    for key, (dtype, shape) in expected.items():
        assert item[key].dtype == dtype and tuple(item[key].shape) == shape, key
    assert clips.frame_shape == (16, 16, 3) and clips.action_dim == 2


@pytest.mark.parametrize("history, future, stride", [(2, 1, 1), (1, 3, 2), (4, 4, 3), (6, 7, 1)])
def test_clip_count(tiny_dataset, history, future, stride):
    clips = ClipDataset(tiny_dataset, ClipSpec(history, future, stride), split="all")
    steps = [load_episode(path)["actions"].shape[0] for _, path in list_episodes(tiny_dataset)]
    assert len(clips) == sum((s + 1 - (history + future)) // stride + 1 for s in steps)
    starts = sorted({int(clips[i]["start"]) for i in range(len(clips))})
    assert starts == list(range(0, 13 - history - future + 1, stride))


def test_clips_that_fit_no_episode_are_refused(tiny_dataset):
    with pytest.raises(UserError, match="do not fit"):
        ClipDataset(tiny_dataset, ClipSpec(history=10, future=4), split="all")


def test_alignment_of_actions_rewards_and_flags(tiny_dataset_copy):
    """actions[j] of a clip is the normalised a_{start+j-1} (zeros before the reset frame);
    rewards and flags follow the same rule; frames and states are frames start..start+T-1."""
    root = tiny_dataset_copy
    manifest = json.loads((root / MANIFEST).read_text())
    low, high = np.array([-1.0, 0.0], np.float32), np.array([3.0, 1.0], np.float32)  # asymmetric
    (root / MANIFEST).write_text(
        json.dumps({**manifest, "action_low": low.tolist(), "action_high": high.tolist()})
    )
    clips = ClipDataset(root, ClipSpec(history=2, future=2), split="all")
    raw = {i: load_episode(path, mmap=False) for i, path in list_episodes(root)}
    seen_first = seen_last = False
    for n in range(len(clips)):
        item = clips[n]
        ep, start = raw[int(item["episode"])], int(item["start"])
        np.testing.assert_array_equal(
            item["frames"].numpy(), ep["frames"][start : start + 4].transpose(0, 3, 1, 2)
        )
        np.testing.assert_allclose(item["states"].numpy(), ep["states"][start : start + 4].astype(np.float32))
        for j in range(4):
            k = start + j - 1  # the step that produced frame start + j
            if k < 0:
                assert (item["actions"][j] == 0).all() and item["rewards"][j] == 0
                assert not item["terminated"][j] and not item["truncated"][j]
                seen_first = True
                continue
            expected = 2 * (ep["actions"][k] - low) / (high - low) - 1
            np.testing.assert_allclose(item["actions"][j].numpy(), expected, rtol=1e-6, atol=1e-6)
            assert item["rewards"][j] == ep["rewards"][k]
            assert item["truncated"][j] == ep["truncated"][k] and item["terminated"][j] == ep["terminated"][k]
            seen_last |= bool(item["truncated"][j])
    assert seen_first and seen_last
    assert clips[0]["truncated"].tolist() == [False] * 4


def test_split_is_disjoint_covering_and_seeded():
    indices = list(range(3, 103))
    train, val = split_episodes(indices, 0.2, seed=0)
    assert len(val) == 20 and not set(train) & set(val) and sorted(train + val) == indices
    assert split_episodes(indices, 0.2, seed=0) == (train, val)
    assert split_episodes(indices, 0.2, seed=1)[1] != val
    assert split_episodes([7, 9], 0.01, seed=0)[1] != []  # at least one validation episode
    assert split_episodes([7], 0.5, seed=0) == ([7], [])  # never an empty training set


def test_train_and_val_clips_come_from_disjoint_episodes(tiny_dataset):
    val_sets = []
    for seed in range(4):
        spec = ClipSpec(val_fraction=0.4, split_seed=seed)
        train, val = ClipDataset(tiny_dataset, spec, "train"), ClipDataset(tiny_dataset, spec, "val")
        train_eps = {int(train[i]["episode"]) for i in range(len(train))}
        val_eps = {int(val[i]["episode"]) for i in range(len(val))}
        assert len(val_eps) == 2 and not train_eps & val_eps and train_eps | val_eps == {0, 1, 2, 3, 4}
        assert len(train) + len(val) == len(ClipDataset(tiny_dataset, spec, "all"))
        assert val_eps == {int(ep.index) for ep in ClipDataset(tiny_dataset, spec, "val").episodes}
        val_sets.append(val_eps)
    assert len({frozenset(s) for s in val_sets}) > 1


@pytest.mark.parametrize(
    "spec, split",
    [(ClipSpec(history=0), "train"), (ClipSpec(val_fraction=1.0), "train"), (ClipSpec(), "test")],
)
def test_bad_clip_settings(tiny_dataset, spec, split):
    with pytest.raises(UserError):
        ClipDataset(tiny_dataset, spec, split)


def collate(dataset: ClipDataset, **loader_kwargs) -> dict[str, torch.Tensor]:
    batches = list(DataLoader(dataset, batch_size=4, shuffle=False, **loader_kwargs))
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def test_dataloader_workers_give_the_same_items(tiny_dataset):
    clips = ClipDataset(tiny_dataset, ClipSpec(history=2, future=1, stride=2), split="all")
    clips[0]  # maps an episode in this process; workers must map their own
    serial = collate(clips)
    parallel = collate(clips, num_workers=2)
    assert serial.keys() == parallel.keys() and len(serial["frames"]) == len(clips)
    for key in serial:
        assert torch.equal(serial[key], parallel[key]), key
    copy = pickle.loads(pickle.dumps(clips))
    assert copy._cache == {} and torch.equal(copy[5]["frames"], clips[5]["frames"])
