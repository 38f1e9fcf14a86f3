"""Training clips: ``history`` clean frames + ``future`` target frames with aligned actions.

Alignment (said once here, pinned by a test): frame ``k+1`` is the result of applying ``a_k`` to the
state shown in frame ``k``. A clip of frames ``k0 .. k0+T-1`` carries *per frame* the action that
produced it: ``actions[j] = a_{k0+j-1}``, and zeros for ``j = 0`` when the clip starts at the reset
frame. Rewards and the terminated/truncated flags follow the same rule (``rewards[j]`` was received
on arriving at frame ``j``). So the model conditions frame ``j``'s tokens on ``actions[j]``.

Episodes are memory-mapped lazily in whichever process reads them, so DataLoader workers share the
OS page cache instead of each holding a copy of the dataset.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from selfflow_world.episodes import EpisodeInfo, inspect_episode, list_episodes, load_episode, read_manifest
from selfflow_world.errors import UserError


def per_frame(steps: np.ndarray, first: int, count: int) -> np.ndarray:
    """Per-step values (``steps[k]`` belongs to the step from frame ``k`` to ``k+1``: an action, a
    reward, a flag) aligned to frames ``first .. first+count-1``: ``out[j] = steps[first+j-1]``, zero
    (False) for the reset frame, which no step precedes. ``(count, ...)``, the dtype of ``steps``."""
    out = np.zeros((count, *steps.shape[1:]), dtype=steps.dtype)
    lo = max(first - 1, 0)
    vals = np.asarray(steps[lo : first + count - 1])
    out[count - len(vals) :] = vals
    return out


@dataclass
class ClipSpec:
    """How to cut clips and split episodes.

    Attributes:
        history: clean context frames per clip (H).
        future: target frames per clip (F).
        stride: step between clip starts within an episode.
        val_fraction: fraction of episodes held out for validation (at least one when >= 2 episodes).
        split_seed: seed of the episode permutation that decides the split.
        skip_corrupt: skip unreadable episodes with a warning instead of stopping.
    """

    history: int = 2
    future: int = 1
    stride: int = 1
    val_fraction: float = 0.1
    split_seed: int = 0
    skip_corrupt: bool = False

    @property
    def length(self) -> int:
        return self.history + self.future

    def validate(self) -> None:
        if self.history < 1 or self.future < 1 or self.stride < 1:
            raise UserError(
                f"history, future and stride must be >= 1, got {self.history}, {self.future}, {self.stride}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def scan_dataset(root: Path, *, skip_corrupt: bool = False) -> tuple[dict, list[EpisodeInfo]]:
    """Manifest and header info of every usable episode; checks they agree with each other."""
    manifest = read_manifest(root)
    infos: list[EpisodeInfo] = []
    for index, path in list_episodes(root):
        try:
            infos.append(inspect_episode(index, path))
        except ValueError as err:
            if not skip_corrupt:
                raise UserError(f"corrupt episode: {err} (pass skip_corrupt=true to skip it)") from err
            warnings.warn(f"skipping corrupt episode: {err}", stacklevel=2)
    if not infos:
        raise UserError(
            f"dataset {root} holds no complete episodes; collect some with `sfw collect out={root}`"
        )
    first = infos[0]
    for info in infos[1:]:
        if info.frame_shape != first.frame_shape or info.action_dim != first.action_dim:
            raise UserError(
                f"episodes differ: {first.path.name} has frames {first.frame_shape} and action dim "
                f"{first.action_dim}, {info.path.name} has {info.frame_shape} and {info.action_dim}; "
                "one dataset must hold one render size and one action dim"
            )
    return manifest, infos


def split_episodes(indices: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic episode-level split: (train indices, validation indices), each sorted."""
    order = np.random.default_rng(seed).permutation(len(indices))
    n_val = int(round(val_fraction * len(indices)))
    if val_fraction > 0 and len(indices) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(indices) - 1)
    val = sorted(indices[i] for i in order[:n_val])
    train = sorted(indices[i] for i in order[n_val:])
    return train, val


class ClipDataset(Dataset):
    """Clips of one split of a dataset directory.

    Each item is a dict of tensors (T = history + future):
        ``frames`` uint8 (T, 3, H, W); ``actions`` float32 (T, A) normalised to [-1, 1] with the
        dataset's action bounds (``actions[j]`` produced frame ``j``); ``rewards`` float32 (T,);
        ``terminated``, ``truncated`` bool (T,); ``states`` float32 (T, S); ``episode``, ``start`` int.
    """

    def __init__(self, root: str | Path, spec: ClipSpec | None = None, split: str = "train"):
        self.root, self.spec = Path(root), spec or ClipSpec()
        self.spec.validate()
        if split not in ("train", "val", "all"):
            raise UserError(f"split must be train, val or all, got {split!r}")
        self.manifest, infos = scan_dataset(self.root, skip_corrupt=self.spec.skip_corrupt)
        train, val = split_episodes([i.index for i in infos], self.spec.val_fraction, self.spec.split_seed)
        keep = {"train": set(train), "val": set(val), "all": {i.index for i in infos}}[split]
        self.episodes = [info for info in infos if info.index in keep]
        self.frame_shape = infos[0].frame_shape
        self.action_dim = infos[0].action_dim
        self.state_dim = infos[0].state_dim
        low = np.asarray(self.manifest["action_low"], np.float32)
        high = np.asarray(self.manifest["action_high"], np.float32)
        self._action_center, self._action_half = (high + low) / 2, (high - low) / 2
        self.index: list[tuple[int, int]] = []  # (position in self.episodes, clip start frame)
        for pos, info in enumerate(self.episodes):
            last_start = info.steps + 1 - self.spec.length
            self.index.extend((pos, s) for s in range(0, last_start + 1, self.spec.stride))
        if self.episodes and not self.index:
            longest = max(info.steps + 1 for info in self.episodes)
            raise UserError(
                f"clips of {self.spec.length} frames (history + future) do not fit in any {split} episode "
                f"of {self.root} (the longest has {longest} frames); shorten the clips or collect longer episodes"
            )
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Env units -> [-1, 1] with the dataset's bounds."""
        return (actions - self._action_center) / self._action_half

    def denormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """[-1, 1] -> env units with the dataset's bounds (the inverse of :meth:`normalize_actions`)."""
        return actions * self._action_half + self._action_center

    def _arrays(self, pos: int) -> dict[str, np.ndarray]:
        if pos not in self._cache:  # opened lazily, so each worker maps the files itself
            self._cache[pos] = load_episode(self.episodes[pos].path, mmap=True)
        return self._cache[pos]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pos, start = self.index[i]
        arr = self._arrays(pos)
        end = start + self.spec.length
        frames = np.asarray(arr["frames"][start:end]).transpose(0, 3, 1, 2)  # (T, 3, H, W)

        n = self.spec.length
        actions = self.normalize_actions(per_frame(arr["actions"], start, n))
        if start == 0:
            actions[0] = 0.0  # no action precedes the reset frame (zero in normalised units)
        return {
            "frames": torch.from_numpy(np.ascontiguousarray(frames)),
            "actions": torch.from_numpy(actions.astype(np.float32)),
            "rewards": torch.from_numpy(per_frame(arr["rewards"], start, n).astype(np.float32)),
            "terminated": torch.from_numpy(per_frame(arr["terminated"], start, n)),
            "truncated": torch.from_numpy(per_frame(arr["truncated"], start, n)),
            "states": torch.from_numpy(np.asarray(arr["states"][start:end], dtype=np.float32)),
            "episode": torch.tensor(self.episodes[pos].index),
            "start": torch.tensor(start),
        }

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}  # never ship mapped arrays to workers
        return state
