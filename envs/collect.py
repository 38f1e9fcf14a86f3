"""Parallel, crash-safe collection of action-conditioned video from a pixel env.

Episode ``i`` of a collection with seed ``s`` is fully determined by ``(s, i)``: its env reset seed
and its policy's generator both come from ``numpy.random.SeedSequence([s, i])``. Workers write
episodes themselves (atomically, see :mod:`selfflow_world.episodes`), so a killed collection leaves
only complete episodes, and rerunning the same command collects exactly the missing indices: the
result equals an uninterrupted run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from selfflow_world import __version__
from selfflow_world.envs.pixel_env import PixelEnv, make
from selfflow_world.envs.policies import PolicyConfig, make_policy
from selfflow_world.envs.registry import defaults_for
from selfflow_world.episodes import (
    MANIFEST,
    SCHEMA_VERSION,
    list_episodes,
    read_manifest,
    remove_partial_episodes,
    write_episode,
    write_json_atomic,
)
from selfflow_world.errors import UserError, check_positive


@dataclass
class CollectConfig:
    """``sfw collect`` settings (values live in configs/collect.yaml).

    Attributes:
        env: env name (``sfw envs`` lists them).
        episodes: number of episodes the dataset should hold.
        steps: agent steps per episode (fewer if the env terminates or truncates first).
        out: dataset directory; rerunning with the same settings continues an interrupted run.
        seed: collection seed; episode i uses SeedSequence([seed, i]).
        workers: parallel worker processes (1 = collect in this process).
        size: render size (square).
        camera: camera id or name; null takes the curated default.
        action_repeat: null takes the curated default.
        policy: what drives the robot.
    """

    env: str = "dmc/reacher-easy"
    episodes: int = 200
    steps: int = 100
    out: str = "data/reacher"
    seed: int = 0
    workers: int = 2
    size: int = 64
    camera: Any = None
    action_repeat: Optional[int] = None  # noqa: UP045 (OmegaConf needs Optional)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def validate(self) -> None:
        for name in ("episodes", "steps", "workers", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.action_repeat is not None:
            check_positive("action_repeat", self.action_repeat)
        defaults_for(self.env)  # unknown env -> UserError
        self.policy.validate()


def episode_seeds(seed: int, index: int) -> tuple[int, np.random.Generator]:
    """(env reset seed, policy generator) of episode ``index``."""
    env_ss, policy_ss = np.random.SeedSequence([seed, index]).spawn(2)
    return int(env_ss.generate_state(1)[0]), np.random.default_rng(policy_ss)


def run_episode(
    env: PixelEnv, policy, seed: int, index: int, steps: int
) -> tuple[dict[str, np.ndarray], int]:
    """Roll out one episode; returns its arrays and its env reset seed."""
    env_seed, rng = episode_seeds(seed, index)
    obs, info = env.reset(seed=env_seed)
    policy.reset(rng, steps)
    frames, states = [obs], [info["physics_state"]]
    actions, rewards, terminated, truncated = [], [], [], []
    for k in range(steps):
        action = policy.act(obs, info)
        obs, reward, term, trunc, info = env.step(action)
        trunc = trunc or (k == steps - 1 and not term)  # the episode length is a time limit
        frames.append(obs)
        states.append(info["physics_state"])
        actions.append(action)
        rewards.append(reward)
        terminated.append(term)
        truncated.append(trunc)
        if term or trunc:
            break
    arrays = {
        "frames": np.stack(frames).astype(np.uint8),
        "actions": np.stack(actions).astype(np.float32),
        "rewards": np.asarray(rewards, np.float32),
        "terminated": np.asarray(terminated, bool),
        "truncated": np.asarray(truncated, bool),
        "states": np.stack(states).astype(np.float64),
    }
    return arrays, env_seed


class _Collector:
    """Owns one env and one policy; collects episodes by index and writes them."""

    def __init__(self, cfg: CollectConfig):
        self.cfg = cfg
        self.env = make(cfg.env, size=cfg.size, camera=cfg.camera, action_repeat=cfg.action_repeat)
        self.policy = make_policy(cfg.policy, self.env.action_space.low, self.env.action_space.high)

    def __call__(self, index: int) -> int:
        cfg = self.cfg
        arrays, env_seed = run_episode(self.env, self.policy, cfg.seed, index, cfg.steps)
        meta = {
            "env": cfg.env,
            "seed": cfg.seed,
            "env_seed": env_seed,
            "policy": asdict(cfg.policy),
            "size": list(self.env.size),
            "camera": self.env.camera,
            "action_repeat": self.env.action_repeat,
            "action_low": self.env.action_space.low.tolist(),
            "action_high": self.env.action_space.high.tolist(),
            "library_version": __version__,
        }
        write_episode(Path(cfg.out), index, arrays, meta)
        return len(arrays["actions"])

    def close(self) -> None:
        self.env.close()


_WORKER: _Collector | None = None


def _init_worker(cfg: CollectConfig) -> None:
    global _WORKER
    if cfg.policy.name == "sb3":
        import torch

        torch.set_num_threads(1)  # one core per worker process (never in the caller's process)
    _WORKER = _Collector(cfg)


def _work(index: int) -> int:
    assert _WORKER is not None
    return _WORKER(index)


def _manifest(cfg: CollectConfig) -> dict[str, Any]:
    env = make(cfg.env, size=cfg.size, camera=cfg.camera, action_repeat=cfg.action_repeat)
    try:
        return {
            "schema_version": SCHEMA_VERSION,
            "env": cfg.env,
            "size": list(env.size),
            "camera": env.camera,
            "action_repeat": env.action_repeat,
            "action_dim": int(env.action_space.shape[0]),
            "action_low": env.action_space.low.tolist(),
            "action_high": env.action_space.high.tolist(),
            "state_dim": env.state_size,
            "seed": cfg.seed,
            "steps": cfg.steps,
            "policy": asdict(cfg.policy),
            "library_version": __version__,
        }
    finally:
        env.close()


# keys that must match for a rerun to continue a dataset (episodes may grow)
_RESUME_KEYS = ("env", "size", "camera", "action_repeat", "seed", "steps", "policy")


def prepare_dataset(cfg: CollectConfig) -> list[int]:
    """Create or check the dataset directory; returns the episode indices still to collect."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a directory; give a new or dataset directory")
    wanted = _manifest(cfg)
    if (out / MANIFEST).exists():
        have = read_manifest(out)
        diff = [k for k in _RESUME_KEYS if have.get(k) != wanted[k]]
        if diff:
            details = ", ".join(f"{k}: {have.get(k)!r} on disk vs {wanted[k]!r} now" for k in diff)
            raise UserError(
                f"{out} holds a dataset collected with other settings ({details}); "
                "rerun with the same settings to continue it, or choose another out="
            )
    else:
        if out.exists() and any(out.iterdir()):
            raise UserError(
                f"out={out} is a non-empty directory without {MANIFEST}; choose a new or dataset directory"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / MANIFEST, wanted)
    remove_partial_episodes(out)
    done = {index for index, _ in list_episodes(out)}
    return [i for i in range(cfg.episodes) if i not in done]


def _run(cfg: CollectConfig, todo: list[int]) -> Iterator[int]:
    """Yields the number of steps of each finished episode."""
    if cfg.workers == 1 or len(todo) <= 1:
        collector = _Collector(cfg)
        try:
            for index in todo:
                yield collector(index)
        finally:
            collector.close()
        return
    # spawn: each worker creates its own GL context; safe whatever the parent has imported.
    # One llvmpipe thread per worker: the workers already use the cores.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(cfg.workers, len(todo)), initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap_unordered(_work, todo)


def collect(cfg: CollectConfig, *, progress: bool = True) -> dict[str, Any]:
    """Collect the missing episodes of ``cfg.out``; returns a summary (episodes, frames, seconds)."""
    cfg.validate()
    todo = prepare_dataset(cfg)
    start, frames = time.perf_counter(), 0
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="ep", desc=f"collect {cfg.env}", dynamic_ncols=True)
    try:
        for steps in _run(cfg, todo):
            frames += steps
            if bar is not None:
                bar.update(1)
                bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    return {
        "collected": len(todo),
        "skipped_existing": cfg.episodes - len(todo),
        "frames": frames,
        "seconds": seconds,
        "frames_per_s": frames / seconds if seconds > 0 else 0.0,
    }
