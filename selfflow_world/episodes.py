"""Episodes on disk: one directory per episode, written atomically, plus a dataset manifest.

Layout of a dataset directory::

    manifest.json                 dataset-level facts (schema version, env, render size, action
                                  bounds, collection settings); written once, atomically
    episodes/ep_000017/           one complete episode (only complete ones ever carry this name)
        frames.npy                uint8   (T+1, H, W, 3)  frame 0 is the reset observation
        actions.npy               float32 (T, A)          raw env units; a_k takes frame k to k+1
        rewards.npy               float32 (T,)            r_k is received on arriving at frame k+1
        terminated.npy, truncated.npy  bool (T,)          Gymnasium semantics, kept separate
        states.npy                float64 (T+1, S)        MuJoCo full physics state per frame
        meta.json                 env, seed, policy, size, action repeat, action bounds, version,
                                  and the sha256 of every array file (for ``sfw data check``)

An episode is written into ``episodes/.tmp-ep_000017-<pid>/`` and renamed into place, so a killed
writer leaves either a complete episode or a temporary directory that the next collection removes.
Arrays are plain ``.npy`` so that training clips memory-map them: DataLoader workers share the page
cache instead of each holding a copy of the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfflow_world.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
EPISODES = "episodes"
ARRAYS = ("frames", "actions", "rewards", "terminated", "truncated", "states")
_EPISODE_RE = re.compile(r"^ep_(\d{6,})$")


def episode_name(index: int) -> str:
    return f"ep_{index:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_episode_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless the arrays form a consistent episode."""
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"missing arrays {missing}")
    frames, actions = arrays["frames"], arrays["actions"]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T+1, H, W, 3), got {frames.dtype} {frames.shape}")
    steps = frames.shape[0] - 1
    if steps < 1:
        raise ValueError("an episode needs at least one step (two frames)")
    expected = {
        "actions": (steps, actions.shape[-1] if actions.ndim == 2 else -1),
        "rewards": (steps,),
        "terminated": (steps,),
        "truncated": (steps,),
        "states": (steps + 1, arrays["states"].shape[-1] if arrays["states"].ndim == 2 else -1),
    }
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise ValueError(f"{key} has shape {arrays[key].shape}, expected {shape} for {steps} steps")


def write_episode(root: Path, index: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write one episode atomically under ``root/episodes``; returns its final directory.

    Raises FileExistsError if the episode already exists (a complete episode is never overwritten).
    """
    _check_episode_arrays(arrays)
    episodes = Path(root) / EPISODES
    episodes.mkdir(parents=True, exist_ok=True)
    final = episodes / episode_name(index)
    if final.exists():
        raise FileExistsError(f"episode {final} already exists")
    tmp = episodes / f".tmp-{episode_name(index)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    hashes = {}
    for key in ARRAYS:
        path = tmp / f"{key}.npy"
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arrays[key]))
            f.flush()
            os.fsync(f.fileno())
        hashes[key] = _sha256(path)
    meta = {**meta, "index": index, "steps": int(arrays["actions"].shape[0]), "sha256": hashes}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    os.rename(tmp, final)  # atomic; fails rather than overwrite a complete episode
    _fsync_dir(episodes)
    return final


def remove_partial_episodes(root: Path) -> int:
    """Delete temporary directories left by killed writers; returns how many were removed."""
    episodes = Path(root) / EPISODES
    if not episodes.is_dir():
        return 0
    stale = [p for p in episodes.iterdir() if p.name.startswith(".tmp-")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def list_episodes(root: Path) -> list[tuple[int, Path]]:
    """Complete episodes of a dataset as sorted ``(index, directory)`` pairs."""
    episodes = Path(root) / EPISODES
    if not episodes.is_dir():
        return []
    found = []
    for path in episodes.iterdir():
        match = _EPISODE_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_manifest(root: Path) -> dict[str, Any]:
    """The dataset manifest; :class:`UserError` if the directory is not a dataset."""
    root = Path(root)
    if not root.exists():
        raise UserError(
            f"dataset directory {root} does not exist (make one with `sfw collect ... out={root}`)"
        )
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; expected a dataset directory made by `sfw collect`")
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} has no {MANIFEST}: not a dataset directory (make one with `sfw collect`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err.__class__.__name__}); expected a JSON manifest") from err
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path} has schema_version {version!r}; this version reads {SCHEMA_VERSION}")
    return manifest


def manifest_fingerprint(root: Path) -> str:
    """Short hash of the manifest and the list of complete episodes (recorded in checkpoints)."""
    manifest = read_manifest(root)
    names = [p.name for _, p in list_episodes(root)]
    blob = json.dumps({"manifest": manifest, "episodes": names}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class EpisodeInfo:
    """Header-level facts of an episode, read without loading its arrays."""

    index: int
    path: Path
    steps: int
    frame_shape: tuple[int, int, int]
    action_dim: int
    state_dim: int
    meta: dict[str, Any]


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an .npy header; ValueError if the file is truncated or not .npy."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)
        offset = f.tell()
    needed = offset + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < needed:
        raise ValueError(f"truncated: {size} bytes, needs {needed}")
    return tuple(shape), dtype


def inspect_episode(index: int, path: Path) -> EpisodeInfo:
    """Read meta.json and array headers; ValueError naming the bad file if anything is off."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'meta.json'}: unreadable ({err.__class__.__name__})") from err
    shapes = {}
    for key in ARRAYS:
        file = path / f"{key}.npy"
        try:
            shapes[key], _ = _npy_header(file)
        except (OSError, ValueError) as err:
            raise ValueError(f"{file}: {err}") from err
    frames = shapes["frames"]
    if len(frames) != 4 or frames[-1] != 3 or len(shapes["actions"]) != 2 or len(shapes["states"]) != 2:
        raise ValueError(f"{path}: array shapes {shapes} do not form an episode")
    steps = frames[0] - 1
    if shapes["actions"][0] != steps or shapes["rewards"] != (steps,) or shapes["states"][0] != steps + 1:
        raise ValueError(f"{path}: array lengths disagree {shapes}")
    return EpisodeInfo(index, path, steps, frames[1:], shapes["actions"][1], shapes["states"][1], meta)


def load_episode(path: Path, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """All arrays of an episode; memory-mapped (read-only) by default."""
    mode = "r" if mmap else None
    out = {}
    for key in ARRAYS:
        file = Path(path) / f"{key}.npy"
        try:
            out[key] = np.load(file, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"episode file {file} is corrupt or truncated ({err})") from err
    return out


def verify_episode(index: int, path: Path) -> EpisodeInfo:
    """Full check: headers, shapes, sha256 of every file, dtypes and finite values."""
    info = inspect_episode(index, path)
    hashes = info.meta.get("sha256", {})
    for key in ARRAYS:
        file = path / f"{key}.npy"
        if hashes.get(key) != _sha256(file):
            raise ValueError(f"{file}: checksum mismatch (file changed or damaged after writing)")
    arrays = {k: np.load(path / f"{k}.npy", allow_pickle=False) for k in ARRAYS}
    try:
        _check_episode_arrays(arrays)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    for key in ("actions", "rewards", "states"):
        if not np.isfinite(arrays[key]).all():
            raise ValueError(f"{path / (key + '.npy')}: contains NaN or infinite values")
    return info


def check_dataset(root: Path) -> tuple[list[EpisodeInfo], list[str]]:
    """Validate every episode of a dataset. Returns (good episodes, one message per bad one)."""
    manifest = read_manifest(root)
    good, bad = [], []
    for index, path in list_episodes(root):
        try:
            info = verify_episode(index, path)
        except ValueError as err:
            bad.append(str(err))
            continue
        if list(info.frame_shape[:2]) != list(manifest["size"]) or info.action_dim != manifest["action_dim"]:
            bad.append(
                f"{path}: frames {info.frame_shape} / action dim {info.action_dim} differ from the manifest "
                f"(size {manifest['size']}, action dim {manifest['action_dim']})"
            )
            continue
        good.append(info)
    return good, bad
