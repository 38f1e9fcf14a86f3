"""Simulators with pixels, policies and data collection; dream envs in a world model's imagination.

    from selfflow_world.envs import make, list_envs
    env = make("dmc/reacher-easy")          # observation: uint8 (64, 64, 3)
    env = DreamEnv("reacher-easy")          # imagined by a world model with reward heads

The dream envs (envs/dream.py) import torch and stable-baselines3 on first use only.
"""

from selfflow_world.envs.pixel_env import PixelEnv, make, make_like
from selfflow_world.envs.registry import defaults_for, list_envs, parse_name

__all__ = [
    "DreamEnv",
    "DreamVecEnv",
    "PixelEnv",
    "defaults_for",
    "list_envs",
    "make",
    "make_like",
    "parse_name",
]


def __getattr__(name: str):
    # lazy: collection workers import this package and need neither torch nor stable-baselines3
    if name in ("DreamEnv", "DreamVecEnv"):
        from selfflow_world.envs import dream

        return getattr(dream, name)
    raise AttributeError(f"module 'selfflow_world.envs' has no attribute {name!r}")
