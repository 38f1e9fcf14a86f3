"""Simulators with pixels, policies and data collection.

    from selfflow_world.envs import make, list_envs
    env = make("dmc/reacher-easy")          # observation: uint8 (64, 64, 3)
"""

from selfflow_world.envs.pixel_env import PixelEnv, make, make_like
from selfflow_world.envs.registry import defaults_for, list_envs, parse_name

__all__ = ["PixelEnv", "defaults_for", "list_envs", "make", "make_like", "parse_name"]
