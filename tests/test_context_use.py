"""bench/context_use.py: what a model reads from its context, one input changed at a time."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("context_use", ROOT / "bench" / "context_use.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_still_frames_figure_is_sfw_evals_motion_use(tiny_run, tiny_dataset):
    from selfflow_world.evaluate import motion_use
    from selfflow_world.imagine import load_segments
    from selfflow_world.world_model import WorldModel

    wm = WorldModel.load(tiny_run)
    out = _bench().context_use(wm, str(tiny_dataset), episodes=3, per_episode=2, seed=5)
    assert out["rollouts"] == 6
    for name in ("still_frames", "context_actions_zeroed", "next_action_zeroed"):
        assert math.isfinite(out[f"change_{name}"]) and out[f"change_{name}"] >= 0
        assert math.isfinite(out[f"mse_{name}"])
    # the same starts, noise and action as `sfw eval`'s motion use: the same figure
    seg = load_segments(wm, str(tiny_dataset), "all", 6, wm.history, 2, per_episode=2)
    ref = motion_use(wm, seg.context, seg.context_actions, seg.actions, seg.real, seed=5)
    assert np.isclose(out["change_still_frames"], ref["ratio"], rtol=1e-5)
    assert np.isclose(out["true_frame_change"], ref["true_frame_change"], rtol=1e-6)
