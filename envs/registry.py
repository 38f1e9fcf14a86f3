"""Env names: every dm_control suite task as ``dmc/<domain>-<task>`` and every Gymnasium MuJoCo env
as ``gym/<Id>``, resolved without a file per env.

Curated defaults (camera, action repeat) make the robot fill a 64x64 frame and make one agent step
change the frame visibly (../docs/method.md); any env not listed gets the family default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from selfflow_world.errors import UserError

LIST_HINT = "run `sfw envs` to list valid names"


@dataclass(frozen=True)
class EnvDefaults:
    """Rendering and stepping defaults for one env."""

    camera: int | str | None
    action_repeat: int
    make_kwargs: dict[str, Any] = field(default_factory=dict)  # extra gymnasium.make kwargs


# dm_control: action repeats follow common pixel-control practice (PlaNet/Dreamer): 8 for cartpole,
# 4 for reacher, cheetah and ball_in_cup, 2 for finger and walker.
# cartpole: camera 1 ("lookatcart") turns to follow the cart, whose position shows in the rail and
# floor. The fixed camera 0 sees about |x| < 1.6 of the +-1.8 rail at 64x64, and exploration noise
# (uniform or pink, 100 steps at repeat 8) keeps the cart beyond that in 33-42% of frames.
_DMC_DEFAULTS: dict[str, EnvDefaults] = {
    "reacher": EnvDefaults(camera=0, action_repeat=4),
    "cartpole": EnvDefaults(camera=1, action_repeat=8),
    "cheetah": EnvDefaults(camera=0, action_repeat=4),
    "ball_in_cup": EnvDefaults(camera=0, action_repeat=4),
    "finger": EnvDefaults(camera=0, action_repeat=2),
    "walker": EnvDefaults(camera=0, action_repeat=2),
    "pendulum": EnvDefaults(camera=0, action_repeat=4),
    "acrobot": EnvDefaults(camera=0, action_repeat=4),
    "hopper": EnvDefaults(camera=0, action_repeat=4),
    "quadruped": EnvDefaults(camera=2, action_repeat=2),
}
_DMC_FALLBACK = EnvDefaults(camera=0, action_repeat=2)

# Gymnasium: keys are the id without its version suffix; camera None = the env's own default view.
_GYM_DEFAULTS: dict[str, EnvDefaults] = {
    # top-down view of the arena instead of the default distant oblique one
    "Reacher": EnvDefaults(
        camera=None,
        action_repeat=2,
        make_kwargs={
            "default_camera_config": {
                "trackbodyid": 0,
                "distance": 0.6,
                "elevation": -90.0,
                "azimuth": 90.0,
                "lookat": (0.0, 0.0, 0.0),
            }
        },
    ),
    "InvertedPendulum": EnvDefaults(camera=None, action_repeat=2),
    "InvertedDoublePendulum": EnvDefaults(camera=None, action_repeat=2),
    "HalfCheetah": EnvDefaults(camera=None, action_repeat=2),
    "Hopper": EnvDefaults(camera=None, action_repeat=2),
    "Walker2d": EnvDefaults(camera=None, action_repeat=2),
}
_GYM_FALLBACK = EnvDefaults(camera=None, action_repeat=1)


@lru_cache(maxsize=1)
def dmc_names() -> tuple[str, ...]:
    """All dm_control suite tasks as ``dmc/<domain>-<task>``."""
    from dm_control import suite

    return tuple(f"dmc/{domain}-{task}" for domain, task in suite.ALL_TASKS)


@lru_cache(maxsize=1)
def gym_names() -> tuple[str, ...]:
    """All registered Gymnasium MuJoCo env ids (newest registered versions included) as ``gym/<Id>``."""
    import gymnasium as gym

    names = []
    for env_id, spec in gym.registry.items():
        entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
        if entry.startswith("gymnasium.envs.mujoco") and "mujoco_py" not in entry:
            names.append(f"gym/{env_id}")
    return tuple(sorted(names))


def list_envs() -> list[str]:
    """Every valid env name, dm_control first."""
    return [*dmc_names(), *gym_names()]


def parse_name(name: str) -> tuple[str, str]:
    """Split ``family/rest`` and check it names a known env.

    Returns ``("dmc", "domain-task")`` or ``("gym", "Id")``; raises :class:`UserError` otherwise.
    """
    if not isinstance(name, str) or "/" not in name:
        raise UserError(f"unknown env {name!r}: names look like dmc/<domain>-<task> or gym/<Id>; {LIST_HINT}")
    family, rest = name.split("/", 1)
    if family == "dmc" and name in dmc_names():
        return family, rest
    if family == "gym" and name in gym_names():
        return family, rest
    raise UserError(f"unknown env {name!r}; {LIST_HINT}")


def defaults_for(name: str) -> EnvDefaults:
    """Curated camera and action repeat for a valid env name."""
    family, rest = parse_name(name)
    if family == "dmc":
        domain = rest.split("-", 1)[0]
        return _DMC_DEFAULTS.get(domain, _DMC_FALLBACK)
    base = rest.rsplit("-v", 1)[0]
    return _GYM_DEFAULTS.get(base, _GYM_FALLBACK)


def dmc_domain_task(rest: str) -> tuple[str, str]:
    """``'ball_in_cup-catch'`` -> ``('ball_in_cup', 'catch')`` (domains contain '_', never '-')."""
    domain, task = rest.split("-", 1)
    return domain, task
