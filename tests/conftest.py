"""Shared fixtures.

``tiny_dataset`` is a real dataset collected once per test session (dm_control reacher-easy, 16x16
frames, 5 episodes of 12 steps, coloured-noise policy, seed 0, one worker: about two seconds).
Training, clip and data tests reuse it. It is shared, so treat it as read-only; a test that
damages or extends a dataset takes ``tiny_dataset_copy`` (a private copy under ``tmp_path``).
``collect_config`` builds a :class:`CollectConfig` with the tiny settings, for tests that collect
the same data again (determinism, resume, crash safety) and compare it with ``tiny_dataset``.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco renders

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# The tiny dataset's settings (CollectConfig fields).
TINY = {"env": "dmc/reacher-easy", "episodes": 5, "steps": 12, "size": 16, "seed": 0, "workers": 1}


@pytest.fixture(scope="session")
def collect_config() -> Callable[..., object]:
    """Factory: ``collect_config(out, **overrides)`` -> CollectConfig with the tiny settings."""
    from selfflow_world.envs.collect import CollectConfig

    def build(out: str | Path, **overrides) -> CollectConfig:
        return CollectConfig(**{**TINY, "out": str(out), **overrides})

    return build


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, collect_config) -> Path:
    """Path of a dataset directory with 5 complete episodes (reacher-easy, 16x16, 12 steps each,
    action dim 2). Read-only: use ``tiny_dataset_copy`` to modify one."""
    from selfflow_world.envs.collect import collect

    root = tmp_path_factory.mktemp("tiny") / "reacher"
    collect(collect_config(root), progress=False)
    return root


@pytest.fixture
def tiny_dataset_copy(tiny_dataset, tmp_path) -> Path:
    """A private, writable copy of ``tiny_dataset``."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "reacher"))


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    """Run directory of a `tiny` selfflow model trained for 3 steps on ``tiny_dataset`` (read-only)."""
    from selfflow_world.config import load_config
    from selfflow_world.train import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    overrides = [
        f"data={tiny_dataset}",
        f"out={out}",
        "model=tiny",
        "objective=selfflow",
        "steps=3",
        "batch_size=4",
        "tensorboard=false",
        "val_every=100",
        "sample_every=100",
        "ckpt_every=100",
    ]
    Trainer(load_config("train", overrides, TrainConfig)).fit()
    return out


@pytest.fixture(scope="session")
def heads_run(tiny_run, tiny_dataset, tmp_path_factory) -> Path:
    """A copy of ``tiny_run`` with reward/termination heads fitted on it (a few steps; read-only)."""
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.heads import HeadsConfig, fit_heads

    run = tmp_path_factory.mktemp("heads") / "run"
    shutil.copytree(resolve_checkpoint(tiny_run), run / "checkpoints" / "step_00000003")
    fit_heads(
        HeadsConfig(ckpt=str(run), data=str(tiny_dataset), examples=40, steps=5, batch_size=8), progress=False
    )
    return run
