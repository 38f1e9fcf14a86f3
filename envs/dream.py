"""Dream envs: reinforcement learning inside a world model's imagination.

    from selfflow_world.envs import DreamEnv, DreamVecEnv
    env = DreamEnv("reacher-easy", horizon=50)                 # a Gymnasium env
    venv = DreamVecEnv("reacher-easy", num_envs=64)            # a stable-baselines3 VecEnv
    PPO("MlpPolicy", DreamVecEnv("reacher-easy", observation="features")).learn(100_000)

An episode starts from ``history`` context frames (the model's trained context): by default those
of the real env (``start="env"``: the env reset with the episode's seed, then ``history - 1``
mid-range actions, as ``sfw plan`` starts its reward episodes), or a random window of a recorded
dataset (``start=DATASET_DIR``). Each step imagines the next frame under the action
(:meth:`~selfflow_world.world_model.WorldModel.step`); the reward and the termination come from the
model's reward/termination heads (``sfw heads``; terminated when the predicted probability exceeds
0.5) and the episode is truncated after ``horizon`` steps (a time limit, kept apart from
termination as Gymnasium does).

Observations: ``"frames"``, the imagined frame, uint8 ``(h, w, 3)``; or ``"features"``, the
model's own features of it (the heads' block, mean-pooled over the frame's tokens), float32
``(D,)``: small enough for an MLP policy on a CPU; or ``"probes"``, what the probes shipped beside
the model's weights (``sfw probe``: a state probe, and for reacher a
finger-to-target probe) read off the frame and off the frame before it, float32 ``(2K,)``: a
compact, physically meaningful vector where pooled features lose where things are. Rewards:
``"heads"`` (default) or ``"target"``, minus the finger-to-target distance the target probe reads
off the imagined frame (the planner's ``target`` score, dense where the env's reward is sparse;
needs no heads, never terminates). To act in the real env with a policy trained
here, compute the same observation from real frames with :meth:`DreamEnv.observe_real` (frames:
the newest one; features: :meth:`~selfflow_world.world_model.WorldModel.clip_features` of the last
``history + 1`` real frames and their actions, which is what :meth:`step` computes for an imagined
frame from the history before it).

:class:`DreamVecEnv` steps ``num_envs`` rollouts in one batched model call per step; rows that end
start over from fresh contexts in the same step (:meth:`~selfflow_world.world_model.WorldModel.restart`)
while the others continue unchanged, and report their episodes as SB3's ``Monitor`` and
``DummyVecEnv`` do (``info["episode"]``, ``info["terminal_observation"]``,
``info["TimeLimit.truncated"]``).

Seeding: a seed fixes everything an episode draws (its start context and the sampler's noise), so
the same seed and the same actions imagine the same episode. In :class:`DreamEnv` the seed given to
``reset`` is the episode's seed: with ``start="env"`` the real env is reset with it, so
``DreamEnv.reset(seed=s)`` starts where ``PixelEnv.reset(seed=s)`` does. In :class:`DreamVecEnv`,
``seed(s)`` then ``reset()`` starts row ``i`` from seed ``s + i`` (SB3 2.x semantics) and fixes the
seeds of every later automatic restart and the batch's sampler noise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv

from selfflow_world.errors import UserError

if TYPE_CHECKING:
    from selfflow_world.world_model import WorldModel

OBSERVATIONS = ("frames", "features", "probes")
REWARDS = ("heads", "target")
_SEED_RANGE = 2**31 - 1


def mid_action(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The middle of the action range (zero in the model's normalised units): the action of the
    context steps and of the reset frame, which no action precedes."""
    return ((np.asarray(low, np.float32) + np.asarray(high, np.float32)) / 2).astype(np.float32)


def env_context(env, seed: int, history: int) -> tuple[np.ndarray, np.ndarray]:
    """A start context from the real env: ``env.reset(seed=seed)``, then ``history - 1`` steps of
    the mid-range action. Returns uint8 frames ``(history, h, w, 3)`` and their per-frame actions
    ``(history, A)`` (row 0, before the reset frame: the mid-range action, i.e. zero in the model's
    units, as training clips have it). An env that ends within those steps repeats its last frame."""
    mid = mid_action(env.action_space.low, env.action_space.high)
    obs, _ = env.reset(seed=int(seed))
    frames, actions, ended = [obs], [mid], False
    for _ in range(history - 1):
        if not ended:
            obs, _, terminated, truncated, _ = env.step(mid)
            ended = terminated or truncated
        frames.append(obs)
        actions.append(mid)
    return np.stack(frames), np.stack(actions)


class _EnvStarts:
    """Start contexts from resets of one real env, one per seed (a few ms each)."""

    def __init__(self, env, history: int):
        self.env, self.history = env, history

    def __call__(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return env_context(self.env, seed, self.history)


class _DatasetStarts:
    """Start contexts drawn from a recorded dataset: a random window of ``history`` frames (episode
    and position from the seed) with the actions that produced them."""

    def __init__(self, root: str | Path, wm: WorldModel):
        from selfflow_world.clips import scan_dataset

        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(
                f"start must be 'env' (contexts from the real env's resets) or a dataset directory, got "
                f"{str(root)!r} (no such directory)"
            )
        manifest, infos = scan_dataset(self.root, skip_corrupt=True)
        size = wm.config.image_size
        if infos[0].frame_shape != (size, size, 3) or infos[0].action_dim != wm.config.action_dim:
            raise UserError(
                f"dataset {self.root} has frames {infos[0].frame_shape} and action dim {infos[0].action_dim}; "
                f"the model expects ({size}, {size}, 3) and {wm.config.action_dim}"
            )
        self.history = wm.history
        # (episode, first frame) of every window of `history` frames
        self.windows = [(info, k) for info in infos for k in range(info.steps + 2 - self.history)]
        if not self.windows:
            raise UserError(f"no episode of {self.root} holds {self.history} frames (the model's context)")
        self.mid = mid_action(manifest["action_low"], manifest["action_high"])

    def __call__(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from selfflow_world.clips import per_frame
        from selfflow_world.episodes import load_episode

        info, first = self.windows[int(np.random.default_rng(seed).integers(len(self.windows)))]
        arrays = load_episode(info.path)
        frames = np.array(arrays["frames"][first : first + self.history])
        actions = per_frame(np.asarray(arrays["actions"], np.float32), first, self.history)
        if first == 0:
            actions[0] = self.mid  # no action precedes the reset frame: zero in the model's units
        return frames, actions


def _probes(wm: WorldModel, observation: str, reward: str) -> dict[str, torch.nn.Module]:
    """The probes shipped with ``wm`` that ``observation="probes"`` (all of them: the state probe,
    and the target probe where the env has a target) and ``reward="target"`` (the target probe) read
    frames with, by name, on the model's device."""
    from selfflow_world.plan import PROBE_FILES, shipped_probe

    if observation != "probes" and reward != "target":
        return {}
    found = {}
    for name in PROBE_FILES:
        shipped = shipped_probe(wm, name)
        if shipped is not None:
            found[name] = shipped[0].to(wm.device)
    how = (
        f"sfw probe ckpt={wm.source} data=DATA score={{name}} fits one and stores it beside the "
        "model's weights (DATA: a dataset of the model's env)"
    )
    if reward == "target" and "target" not in found:
        raise UserError(
            f"reward=target needs a target probe (the effector-to-target vector) beside the weights of "
            f"{wm.source}, which has none; " + how.format(name="target")
        )
    if observation == "probes" and "state" not in found:
        raise UserError(
            f"observation=probes needs at least a state probe beside the weights of {wm.source}, which "
            "has none; " + how.format(name="state")
        )
    return found


class _Dreamer:
    """What both dream envs share: the model and its heads, the start contexts, the spaces, and
    the observation of an imagined (or real) frame."""

    def __init__(
        self,
        world_model: WorldModel | str | Path,
        horizon: int,
        steps: int,
        start: str | Path | None,
        observation: str,
        device: str | torch.device,
        reward: str = "heads",
    ):
        from selfflow_world.heads import missing_heads_message
        from selfflow_world.world_model import WorldModel

        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon <= 0:
            raise UserError(f"horizon must be a positive integer (agent steps per episode), got {horizon!r}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= 50:
            raise UserError(f"steps (sampler steps per imagined frame) must be in [1, 50], got {steps!r}")
        if observation not in OBSERVATIONS:
            raise UserError(f"observation must be one of {OBSERVATIONS}, got {observation!r}")
        if reward not in REWARDS:
            raise UserError(f"reward must be one of {REWARDS}, got {reward!r}")
        wm = (
            world_model
            if isinstance(world_model, WorldModel)
            else WorldModel.load(world_model, device=device)
        )
        if wm.heads is None and (reward == "heads" or observation == "features"):
            raise UserError(missing_heads_message(wm.source))
        self.wm, self.horizon, self.steps, self.observation = wm, int(horizon), int(steps), observation
        self.reward = reward
        self.history = wm.history
        self.layer = int(wm.heads_meta["layer"]) if wm.heads is not None else None
        self.probes = _probes(wm, observation, reward)
        self.real = None
        size = wm.config.image_size
        if start is None:  # an observer of real frames only (real_observer): no start contexts
            self.starts = None
            self.action_space = gym.spaces.Box(wm.action_low, wm.action_high, dtype=np.float32)
        elif str(start) == "env":
            from selfflow_world.envs.pixel_env import make

            env_name = wm.meta.get("env")
            if not env_name:
                raise UserError(
                    f"the model {wm.source} does not say which env it was trained on; use start=DATASET_DIR"
                )
            render = wm.meta.get("render", {})
            self.real = make(
                env_name, size=size, camera=render.get("camera"), action_repeat=render.get("action_repeat")
            )
            if self.real.action_space.shape != (wm.config.action_dim,):
                raise UserError(
                    f"{env_name} has {self.real.action_space.shape[0]} action dimensions, the model "
                    f"{wm.config.action_dim}"
                )
            self.starts: Any = _EnvStarts(self.real, self.history)
            self.action_space = gym.spaces.Box(
                self.real.action_space.low, self.real.action_space.high, dtype=np.float32
            )
        else:
            self.starts = _DatasetStarts(start, wm)
            self.action_space = gym.spaces.Box(wm.action_low, wm.action_high, dtype=np.float32)
        self.start = str(start)
        if observation == "frames":
            self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), dtype=np.uint8)
        elif observation == "probes":
            dims = 2 * sum(probe.state_dim for probe in self.probes.values())
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dims,), dtype=np.float32)
        else:
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (wm.config.width,), dtype=np.float32)

    def contexts(self, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Start contexts of ``seeds``: uint8 ``(R, history, h, w, 3)`` and actions ``(R, history, A)``."""
        made = [self.starts(seed) for seed in seeds]
        return np.stack([f for f, _ in made]), np.stack([a for _, a in made])

    def context_observations(self, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The observations ``(R, ...)`` of contexts ``(R, history, ...)``: their last frames, or
        their last frames' features given the frames before them."""
        if self.observation == "frames":
            return np.ascontiguousarray(frames[:, -1])
        if self.observation == "probes":
            return self.probe_observations(frames[:, -1], frames[:, -2 if frames.shape[1] > 1 else -1])
        feats = self.wm.clip_features(frames, actions, layer=self.layer)
        return feats.mean(1).cpu().numpy().astype(np.float32)

    def observe_real(self, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The observation a policy trained in this dream env needs, from real frames: uint8
        ``(T, h, w, 3)`` (oldest first, ``T >= 1``) and the per-frame actions ``(T, A)`` in env
        units (``actions[j]`` produced frame ``j``; the mid-range action for the reset frame).
        frames: the newest frame; features: those of the newest frame given up to ``history``
        frames before it (:meth:`~selfflow_world.world_model.WorldModel.clip_features`)."""
        frames, actions = np.asarray(frames), np.asarray(actions, np.float32)
        if frames.ndim != 4 or len(frames) < 1 or actions.shape != (len(frames), self.wm.config.action_dim):
            raise UserError(
                f"observe_real needs frames (T, h, w, 3) and actions (T, {self.wm.config.action_dim}), got "
                f"{frames.shape} and {actions.shape}"
            )
        keep = self.history + 1
        return self.context_observations(frames[None, -keep:], actions[None, -keep:])[0]

    @torch.no_grad()
    def read_probes(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """What each probe reads off uint8 frames ``(B, h, w, 3)``: ``{name: (B, k)}`` float32."""
        from selfflow_world.video import to_float

        x = to_float(frames)
        return {
            name: probe(x.to(probe.state_mean.device)).float().cpu().numpy()
            for name, probe in self.probes.items()
        }

    def probe_observations(self, frames: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The ``probes`` observation ``(B, 2K)``: every probe's reading of the frames, then of the
        frames before them (the difference says how the arm moves)."""
        now, before = self.read_probes(frames), self.read_probes(previous)
        return np.concatenate([*now.values(), *before.values()], axis=1).astype(np.float32)

    def target_rewards(self, frames: np.ndarray) -> np.ndarray:
        """The ``target`` reward ``(B,)``: minus the effector-to-target distance the target probe
        reads off each frame, a dense stand-in for the env's sparse reward (the planner's
        ``target`` score, one frame at a time)."""
        vector = self.read_probes(frames)["target"]
        return -np.linalg.norm(vector, axis=1).astype(np.float32)

    def advance(self, state, actions: np.ndarray, generator: torch.Generator, previous: np.ndarray):
        """One batched step from the current frames ``previous`` (uint8 ``(B, h, w, 3)``): (frames
        uint8 ``(B, h, w, 3)``, observations, rewards ``(B,)`` float32, terminated ``(B,)`` bool)."""
        heads = self.reward == "heads"
        out = self.wm.step(
            state,
            actions,
            steps=self.steps,
            generator=generator,
            features=self.layer if self.observation == "features" else False,
            rewards=heads,
        )
        frames = np.asarray(out if isinstance(out, np.ndarray) else out.frames)
        if self.observation == "features":
            obs = out.features.mean(1).cpu().numpy().astype(np.float32)
        elif self.observation == "probes":
            obs = self.probe_observations(frames, previous)
        else:
            obs = frames
        if heads:
            rewards = out.reward.float().cpu().numpy().astype(np.float32)
            terminated = (out.termination.float() > 0.5).cpu().numpy()
        else:
            rewards, terminated = self.target_rewards(frames), np.zeros(len(frames), bool)
        return frames, obs, rewards, terminated

    def clip(self, actions) -> np.ndarray:
        """Actions as float32 ``(B, A)`` clipped to the action space (``(A,)`` for ``B = 1``)."""
        a = np.asarray(actions, np.float32)
        dim = self.action_space.shape[0]
        if a.ndim == 1 and a.size == dim:
            a = a[None]
        return np.clip(a, self.action_space.low, self.action_space.high)

    def close(self) -> None:
        if self.real is not None:
            close_env(self.real)
            self.real = None


def real_observer(world_model, observation: str, reward: str = "heads", device: str = "cpu") -> _Dreamer:
    """What computes the observation of a policy trained in a dream env (``observation``
    ``features`` or ``probes``, with the ``reward`` it was trained with) from real frames, without
    start contexts or a second env: its :meth:`~_Dreamer.observe_real`. For acting with such a
    policy outside ``sfw rl``, e.g. ``sfw collect policy=sb3``."""
    return _Dreamer(world_model, 1, 1, None, observation, device, reward)


def close_env(env) -> None:
    """Close a pixel env without damaging the other envs' renderers.

    ``mujoco.Renderer.close`` frees its GL objects in whichever GL context is current, so closing
    one renderer while another's context is current (the last created or rendered) deletes the
    other's framebuffer: with EGL its frames then come out wrong (seen with three dm_control envs,
    one closed). Making the closing renderer's own context current first avoids that.
    """
    renderer = getattr(getattr(env, "_backend", None), "renderer", None)
    context = getattr(renderer, "_gl_context", None)
    if context is not None:
        context.make_current()
    env.close()


class DreamEnv(gym.Env):
    """One imagined episode at a time, as a Gymnasium env (see the module docstring).

    Args:
        world_model: a loaded :class:`~selfflow_world.world_model.WorldModel` with heads, or a
            shipped model's name, a run or a checkpoint directory (loaded on ``device``).
        horizon: agent steps per episode (truncation).
        steps: sampler steps per imagined frame (1 to 50; 1 is fastest).
        start: ``"env"`` (contexts from the real env's resets) or a dataset directory.
        observation: ``"frames"`` (uint8 ``(h, w, 3)``), ``"features"`` (float32 ``(D,)``) or
            ``"probes"`` (float32 ``(2K,)``: the shipped probes' readings of the frame and the one
            before it).
        reward: ``"heads"`` (the reward/termination heads) or ``"target"`` (minus the distance the
            shipped target probe reads off the frame; never terminates).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(
        self,
        world_model: WorldModel | str | Path,
        *,
        horizon: int = 50,
        steps: int = 1,
        start: str | Path = "env",
        observation: str = "frames",
        reward: str = "heads",
        device: str | torch.device = "cpu",
        render_mode: str | None = "rgb_array",
    ):
        if render_mode not in (None, "rgb_array"):
            raise UserError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.dream = _Dreamer(world_model, horizon, steps, start, observation, device, reward)
        self.wm, self.horizon, self.render_mode = self.dream.wm, self.dream.horizon, render_mode
        self.action_space, self.observation_space = self.dream.action_space, self.dream.observation_space
        self._state = None
        self._frame: np.ndarray | None = None
        self._length, self._return, self._done = 0, 0.0, True
        self.episode_seed: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode_seed = int(seed) if seed is not None else int(self.np_random.integers(_SEED_RANGE))
        frames, actions = self.dream.contexts([self.episode_seed])
        self._state = self.wm.start(frames, actions)
        self._generator = torch.Generator(self.wm.device).manual_seed(self.episode_seed)
        self._frame = frames[0, -1].copy()
        self._length, self._return, self._done = 0, 0.0, False
        obs = self.dream.context_observations(frames, actions)[0]
        return obs, {"episode_seed": self.episode_seed}

    def step(self, action):
        if self._done:
            raise RuntimeError("DreamEnv: call reset() before step() (and after an episode ends)")
        frames, obs, rewards, terminated = self.dream.advance(
            self._state, self.dream.clip(action), self._generator, self._frame[None]
        )
        self._frame = frames[0]
        self._length += 1
        self._return += float(rewards[0])
        term = bool(terminated[0])
        trunc = not term and self._length >= self.horizon
        self._done = term or trunc
        return obs[0], float(rewards[0]), term, trunc, {"imagined_steps": self._length}

    def render(self) -> np.ndarray | None:
        """The current imagined frame, uint8 ``(h, w, 3)`` (the last context frame after reset)."""
        if self.render_mode is None:
            return None
        if self._frame is None:
            raise RuntimeError("DreamEnv: call reset() before render()")
        return self._frame

    def observe_real(self, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The observation this env would give for real frames, for a policy trained here to act in
        the real env: ``frames`` uint8 ``(T, h, w, 3)`` oldest first, ``actions (T, A)`` in env units
        (``actions[j]`` produced frame ``j``; the mid-range action for the reset frame). frames: the
        newest frame; features: its features given up to ``history`` frames before it
        (:meth:`~selfflow_world.world_model.WorldModel.clip_features`, mean-pooled)."""
        return self.dream.observe_real(frames, actions)

    def close(self) -> None:
        self.dream.close()
        self._state = None


class DreamRow:
    """Row ``index`` of a :class:`DreamVecEnv` as ``get_attr``/``set_attr``/``env_method`` see it.

    Attributes set on a row (``set_attr``) stay that row's: ``horizon`` is read per row, so
    ``set_attr("horizon", 10, indices=[0])`` gives row 0 episodes of 10 steps. Anything else is the
    vec env's. Methods: :meth:`render` (the row's current frame), :meth:`reset` (start the row over).
    """

    def __init__(self, venv: DreamVecEnv, index: int):
        self.__dict__.update(_venv=venv, index=index)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.__dict__["_venv"], name)

    @property
    def episode_return(self) -> float:
        return float(self._venv._returns[self.index])

    @property
    def episode_length(self) -> int:
        return int(self._venv._lengths[self.index])

    @property
    def episode_seed(self) -> int:
        return int(self._venv._episode_seeds[self.index])

    def render(self) -> np.ndarray:
        return self._venv._frames[self.index]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start this row over from a fresh context (seeded); returns ``(obs, info)`` and puts the
        observation in the vec env's current observations. The other rows continue."""
        obs = self._venv._restart([self.index], [seed])
        return obs[0], dict(self._venv.reset_infos[self.index])


class DreamVecEnv(VecEnv):
    """``num_envs`` imagined episodes stepped together, as a stable-baselines3 ``VecEnv``.

    One batched :meth:`~selfflow_world.world_model.WorldModel.step` per ``step``; rows that end
    restart in the same step from fresh contexts (resets of one real env, or dataset windows, with
    seeds drawn from the env's seeded stream) while the others continue as if nothing happened. The arguments are
    :class:`DreamEnv`'s, plus ``num_envs`` and ``seed`` (the seeds of the first ``reset`` and of
    all that follows; None: fresh entropy).
    """

    def __init__(
        self,
        world_model: WorldModel | str | Path,
        num_envs: int = 64,
        *,
        horizon: int = 50,
        steps: int = 1,
        start: str | Path = "env",
        observation: str = "frames",
        reward: str = "heads",
        seed: int | None = None,
        device: str | torch.device = "cpu",
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs <= 0:
            raise UserError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.dream = _Dreamer(world_model, horizon, steps, start, observation, device, reward)
        self.wm, self.horizon, self.render_mode = self.dream.wm, self.dream.horizon, "rgb_array"
        n = int(num_envs)
        self._rows = [DreamRow(self, i) for i in range(n)]
        self.num_envs = n
        super().__init__(n, self.dream.observation_space, self.dream.action_space)
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": 25}
        self._rng = np.random.default_rng(seed)
        self._generator = torch.Generator(self.wm.device).manual_seed(int(self._rng.integers(_SEED_RANGE)))
        self._state = None
        size = self.wm.config.image_size
        self._frames = np.zeros((n, size, size, 3), np.uint8)  # the current frames, for render()
        self._obs = np.zeros((n, *self.observation_space.shape), self.observation_space.dtype)
        self._returns = np.zeros(n, np.float64)
        self._lengths = np.zeros(n, np.int64)
        self._episode_seeds = np.zeros(n, np.int64)
        self._actions: np.ndarray | None = None
        self._t_start = time.time()

    # -- the VecEnv contract ----------------------------------------------------------------------
    def reset(self) -> np.ndarray:
        """Start every row from a fresh context; seeds from :meth:`seed` (once) or the env's stream."""
        given = [s for s in self._seeds if s is not None]
        if given:  # a seed fixes everything after it: contexts, restarts, sampler noise
            self._rng = np.random.default_rng([int(s) for s in given])
            self._generator.manual_seed(int(self._rng.integers(_SEED_RANGE)))
        seeds = [int(s) if s is not None else int(self._rng.integers(_SEED_RANGE)) for s in self._seeds]
        frames, actions = self.dream.contexts(seeds)
        self._state = self.wm.start(frames, actions)
        self._set_rows(list(range(self.num_envs)), seeds, frames, actions)
        self._reset_seeds()
        self._reset_options()
        return self._obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        if self._state is None:
            raise RuntimeError("DreamVecEnv: call reset() before step()")
        if self._actions is None:
            raise RuntimeError("DreamVecEnv: step_wait() without step_async()")
        actions = self.dream.clip(self._actions.reshape(self.num_envs, -1))
        self._actions = None
        frames, obs, rewards, terminated = self.dream.advance(
            self._state, actions, self._generator, self._frames.copy()
        )
        self._frames[:] = frames
        self._obs[:] = obs
        self._returns += rewards
        self._lengths += 1
        horizons = np.array([row.horizon for row in self._rows])
        truncated = ~terminated & (self._lengths >= horizons)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{"TimeLimit.truncated": bool(t)} for t in truncated]
        ended = np.flatnonzero(dones).tolist()
        for i in ended:
            infos[i]["terminal_observation"] = self._obs[i].copy()
            infos[i]["episode"] = {
                "r": round(float(self._returns[i]), 6),
                "l": int(self._lengths[i]),
                "t": round(time.time() - self._t_start, 6),
            }
        if ended:
            self._restart(ended, [None] * len(ended))
        return self._obs.copy(), rewards.copy(), dones, infos

    def close(self) -> None:
        self.dream.close()
        self._state = None

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self._rows[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        for i in self._get_indices(indices):
            self._rows[i].__dict__[attr_name] = value

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        return [
            getattr(self._rows[i], method_name)(*method_args, **method_kwargs)
            for i in self._get_indices(indices)
        ]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices=None) -> list[bool]:
        """Rows report their episodes as SB3's ``Monitor`` does (``info["episode"]``), so they count
        as wrapped in it (what ``evaluate_policy`` asks); no other wrapper is there."""
        from stable_baselines3.common.monitor import Monitor

        wrapped = issubclass(wrapper_class, gym.Wrapper) and issubclass(Monitor, wrapper_class)
        return [wrapped for _ in self._get_indices(indices)]

    def get_images(self) -> list[np.ndarray]:
        return [frame for frame in self._frames]

    def observe_real(self, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """This env's observation computed from real frames (see :meth:`DreamEnv.observe_real`)."""
        return self.dream.observe_real(frames, actions)

    # -- rows -------------------------------------------------------------------------------------
    def _set_rows(self, rows: list[int], seeds: list[int], frames: np.ndarray, actions: np.ndarray) -> None:
        self._obs[rows] = self.dream.context_observations(frames, actions)
        self._frames[rows] = frames[:, -1]
        self._returns[rows], self._lengths[rows] = 0.0, 0
        self._episode_seeds[rows] = seeds
        for i, seed in zip(rows, seeds, strict=True):
            self.reset_infos[i] = {"episode_seed": int(seed)}

    def _restart(self, rows: list[int], seeds: list[int | None]) -> np.ndarray:
        """Start ``rows`` over from fresh contexts (their seeds, or the next of the env's stream),
        in place; returns their new observations."""
        if self._state is None:
            raise RuntimeError("DreamVecEnv: call reset() before restarting a row")
        seeds = [int(s) if s is not None else int(self._rng.integers(_SEED_RANGE)) for s in seeds]
        frames, actions = self.dream.contexts(seeds)
        self.wm.restart(self._state, rows, frames, actions)
        self._set_rows(rows, seeds, frames, actions)
        return self._obs[rows].copy()
