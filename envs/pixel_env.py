"""MuJoCo simulators as Gymnasium envs whose observation is the rendered frame.

Both families (dm_control suite, Gymnasium MuJoCo) share one wrapper, :class:`PixelEnv`: action
repeat, seeding, physics state in ``info`` and restoring a recorded physics state. A small backend
per family does the stepping and the rendering.

Observation: uint8 ``(H, W, 3)``. ``info`` holds ``qpos``, ``qvel``, ``native_obs`` (the task's own
observation vector) and ``physics_state`` (MuJoCo's full physics state, ``mjSTATE_FULLPHYSICS``:
time, qpos, qvel, act, mocap, userdata, plugin state).

Replaying from a recorded start: task randomisation that lives in the *model* rather than the state
(dm_control reacher's target, for instance) comes from ``reset(seed=...)``; so restore with
``env.reset(seed=episode_seed)`` then ``env.set_physics_state(state)`` (or ``env.restore(state,
seed=episode_seed)``, which does both).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from selfflow_world.envs.registry import defaults_for, dmc_domain_task, parse_name
from selfflow_world.errors import UserError, check_positive

FULL_STATE = mujoco.mjtState.mjSTATE_FULLPHYSICS


def get_physics_state(model: mujoco.MjModel, data: mujoco.MjData) -> np.ndarray:
    """Full physics state as a float64 vector."""
    state = np.empty(mujoco.mj_stateSize(model, FULL_STATE), dtype=np.float64)
    mujoco.mj_getState(model, data, state, FULL_STATE)
    return state


def set_physics_state(model: mujoco.MjModel, data: mujoco.MjData, state: np.ndarray) -> None:
    """Write a full physics state and recompute derived quantities (``mj_forward``)."""
    state = np.asarray(state, dtype=np.float64)
    expected = mujoco.mj_stateSize(model, FULL_STATE)
    if state.shape != (expected,):
        raise UserError(f"physics state has shape {state.shape}, this env expects ({expected},)")
    mujoco.mj_setState(model, data, state, FULL_STATE)
    mujoco.mj_forward(model, data)


class _DMCBackend:
    """dm_control suite task, rendered with ``mujoco.Renderer`` (same pixels as dm_control's own
    renderer, faster here, and no EGL errors at interpreter exit)."""

    def __init__(
        self, rest: str, height: int, width: int, camera: int | str | None, make_kwargs: dict[str, Any]
    ):
        from dm_control import suite

        domain, task = dmc_domain_task(rest)
        self.env = suite.load(domain, task, task_kwargs={"random": 0})
        spec = self.env.action_spec()
        self.low = np.asarray(spec.minimum, np.float32) * np.ones(spec.shape, np.float32)
        self.high = np.asarray(spec.maximum, np.float32) * np.ones(spec.shape, np.float32)
        physics = self.env.physics
        self.model, self.data = physics.model.ptr, physics.data.ptr
        self.camera = 0 if camera is None else camera
        self.renderer = mujoco.Renderer(self.model, height, width)

    def reset(self, rng: np.random.Generator) -> None:
        # dm_control draws task randomisation from task.random; reseed it from the env's generator.
        self.env.task._random = np.random.RandomState(int(rng.integers(2**31 - 1)))
        self._observation = self.env.reset().observation

    def native_obs(self) -> np.ndarray:
        """The task's own observation dict, flattened (what state-based agents are trained on)."""
        return np.concatenate([np.ravel(v) for v in self._observation.values()]).astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[float, bool, bool]:
        ts = self.env.step(action)
        self._observation = ts.observation
        reward = float(ts.reward or 0.0)
        if ts.last():
            terminated = ts.discount == 0.0
            return reward, terminated, not terminated
        return reward, False, False

    def render(self) -> np.ndarray:
        self.renderer.update_scene(self.data, camera=self.camera)
        return self.renderer.render()

    def forward(self) -> None:
        self.env.physics.forward()
        self._observation = self.env.task.get_observation(self.env.physics)

    def close(self) -> None:
        # Renderer.close frees its GL objects in whichever GL context is current: with several
        # envs in one process, closing one without making its own context current first would
        # free another env's objects (that env then renders wrong frames)
        context = getattr(self.renderer, "_gl_context", None)
        if context is not None:
            context.make_current()
        self.renderer.close()


class _GymBackend:
    """Gymnasium MuJoCo env rendered by its own ``rgb_array`` renderer at the requested size."""

    def __init__(
        self, env_id: str, height: int, width: int, camera: int | str | None, make_kwargs: dict[str, Any]
    ):
        kwargs: dict[str, Any] = {"render_mode": "rgb_array", "width": width, "height": height}
        for key, value in make_kwargs.items():  # tuples -> arrays (camera lookat)
            if isinstance(value, dict):
                value = {k: np.asarray(v) if isinstance(v, tuple) else v for k, v in value.items()}
            kwargs[key] = value
        if isinstance(camera, str):
            kwargs["camera_name"] = camera
        elif camera is not None:
            kwargs["camera_id"] = camera
        self.env = gym.make(env_id, **kwargs)
        self.low = self.env.action_space.low.astype(np.float32)
        self.high = self.env.action_space.high.astype(np.float32)
        inner = self.env.unwrapped
        self.model, self.data = inner.model, inner.data

    def reset(self, rng: np.random.Generator) -> None:
        self._observation, _ = self.env.reset(seed=int(rng.integers(2**31 - 1)))

    def native_obs(self) -> np.ndarray:
        return np.asarray(self._observation, dtype=np.float32)

    def step(self, action: np.ndarray) -> tuple[float, bool, bool]:
        self._observation, reward, terminated, truncated, _ = self.env.step(action)
        # mj_step leaves body poses (what the renderer draws) one substep behind qpos; recompute them
        # so the frame shows the physics state recorded with it, as after a restore. The trajectory
        # is unchanged: mj_step recomputes all of it and mj_forward leaves the warm start alone.
        mujoco.mj_forward(self.model, self.data)
        return float(reward), bool(terminated), bool(truncated)

    def render(self) -> np.ndarray:
        return self.env.render()

    def forward(self) -> None:
        mujoco.mj_forward(self.model, self.data)
        self._observation = self.env.unwrapped._get_obs()

    def close(self) -> None:
        self.env.close()


class PixelEnv(gym.Env):
    """A MuJoCo simulator seen through a camera. Build it with :func:`selfflow_world.envs.make`.

    Attributes:
        name: the env name, e.g. ``"dmc/reacher-easy"``.
        action_repeat: simulator steps per ``step`` call (rewards summed).
        size: ``(height, width)`` of the observation.
        camera: the camera id or name used (None: the env's default view).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(
        self,
        name: str,
        *,
        size: int | tuple[int, int] = 64,
        camera: int | str | None = None,
        action_repeat: int | None = None,
    ):
        family, rest = parse_name(name)
        defaults = defaults_for(name)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        check_positive("render size", height)
        check_positive("render size", width)
        self.action_repeat = defaults.action_repeat if action_repeat is None else int(action_repeat)
        check_positive("action_repeat", self.action_repeat)
        self.camera = defaults.camera if camera is None else camera
        self.name, self.size, self.render_mode = name, (int(height), int(width)), "rgb_array"
        backend = _DMCBackend if family == "dmc" else _GymBackend
        self._backend = backend(rest, int(height), int(width), self.camera, defaults.make_kwargs)
        self.action_space = gym.spaces.Box(self._backend.low, self._backend.high, dtype=np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (int(height), int(width), 3), dtype=np.uint8)
        self._frame: np.ndarray | None = None
        self._needs_reset = True

    # -- Gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._backend.reset(self.np_random)
        self._needs_reset = False
        return self._observe(), self._info()

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError(f"{self.name}: call reset() before step() (and after an episode ends)")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self.action_space.shape:
            raise UserError(
                f"{self.name}: action has shape {action.shape}, expected {self.action_space.shape}"
            )
        total, terminated, truncated = self.simulate(action)
        return self._observe(), total, terminated, truncated, self._info()

    def render(self) -> np.ndarray:
        return self._frame if self._frame is not None else self._observe()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    # -- physics state ---------------------------------------------------------------------------
    @property
    def nq(self) -> int:
        """Length of qpos: ``physics_state[1 : 1 + nq]`` (index 0 is the simulation time)."""
        return int(self._backend.model.nq)

    @property
    def nv(self) -> int:
        """Length of qvel: ``physics_state[1 + nq : 1 + nq + nv]``."""
        return int(self._backend.model.nv)

    def wrapped_qpos(self) -> list[int]:
        """qpos indices of hinge joints without limits: angles that wind up past +-pi."""
        m = self._backend.model
        return [
            int(m.jnt_qposadr[j])
            for j in range(m.njnt)
            if m.jnt_type[j] == mujoco.mjtJoint.mjJNT_HINGE and not m.jnt_limited[j]
        ]

    @property
    def state_size(self) -> int:
        return int(mujoco.mj_stateSize(self._backend.model, FULL_STATE))

    def get_physics_state(self) -> np.ndarray:
        """The full physics state now (float64 vector of length :attr:`state_size`)."""
        return get_physics_state(self._backend.model, self._backend.data)

    def set_physics_state(self, state: np.ndarray, *, render: bool = True) -> np.ndarray | None:
        """Put the simulator in a recorded physics state; returns the frame it shows (None with
        ``render=False``, which skips rendering it)."""
        set_physics_state(self._backend.model, self._backend.data, state)
        self._backend.forward()
        self._needs_reset = False
        self._frame = None
        return self._observe() if render else None

    def restore(
        self, state: np.ndarray, *, seed: int | None = None, render: bool = True
    ) -> np.ndarray | None:
        """Reset with ``seed`` (restores model-level task randomisation and the time limit's step
        count) then set ``state``; ``render=False`` renders neither frame (physics only)."""
        if render:
            self.reset(seed=seed)
        else:
            super().reset(seed=seed)
            self._backend.reset(self.np_random)
        return self.set_physics_state(state, render=render)

    def native_obs(self) -> np.ndarray:
        """The task's own observation vector now (what state-based agents see), float32."""
        return self._backend.native_obs()

    def simulate(self, action) -> tuple[float, bool, bool]:
        """:meth:`step` without rendering (physics only, for planning against the simulator):
        returns ``(reward, terminated, truncated)``; :meth:`render` then shows the new state."""
        if self._needs_reset:
            raise RuntimeError(f"{self.name}: call reset() before simulate() (and after an episode ends)")
        action = np.clip(np.asarray(action, dtype=np.float32), self.action_space.low, self.action_space.high)
        total, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):
            reward, terminated, truncated = self._backend.step(action)
            total += reward
            if terminated or truncated:
                break
        self._needs_reset = terminated or truncated
        self._frame = None
        return total, terminated, truncated

    # -- helpers ---------------------------------------------------------------------------------
    def _observe(self) -> np.ndarray:
        self._frame = np.ascontiguousarray(self._backend.render(), dtype=np.uint8)
        return self._frame

    def _info(self) -> dict[str, np.ndarray]:
        data = self._backend.data
        return {
            "qpos": data.qpos.copy(),
            "qvel": data.qvel.copy(),
            "physics_state": self.get_physics_state(),
            "native_obs": self._backend.native_obs(),
        }


def make(
    name: str,
    *,
    size: int | tuple[int, int] = 64,
    camera: int | str | None = None,
    action_repeat: int | None = None,
) -> PixelEnv:
    """Build a pixel env by name (``dmc/<domain>-<task>`` or ``gym/<Id>``; ``sfw envs`` lists them).

    Args:
        size: render size, an int for square frames or ``(height, width)``.
        camera: camera id or name; None takes the curated default for this env.
        action_repeat: simulator steps per agent step; None takes the curated default.
    """
    return PixelEnv(name, size=size, camera=camera, action_repeat=action_repeat)


def make_like(manifest: dict) -> PixelEnv:
    """The env a dataset was collected in, rendered the same way: ``manifest`` is the dataset's
    ``manifest.json`` (``env``, ``size``, ``camera``, ``action_repeat``)."""
    return make(
        manifest["env"],
        size=tuple(manifest["size"]),
        camera=manifest["camera"],
        action_repeat=manifest["action_repeat"],
    )
