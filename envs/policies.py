"""Data-collection policies: uniform random, temporally correlated noise, stable-baselines3.

A policy is built inside each collection worker from a :class:`PolicyConfig`, then for every
episode ``reset(rng, steps)`` is called with that episode's own generator and ``act(obs, info)``
returns an action in the env's units. Noise is drawn in [-1, 1] and scaled to the action bounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from selfflow_world.errors import UserError

POLICIES = ("noise", "random", "sb3")
NOISE_KINDS = ("colored", "ou")


@dataclass
class PolicyConfig:
    """What drives the robot during collection.

    Attributes:
        name: ``noise`` (temporally correlated, the default: smoother motion and better coverage than
            i.i.d. noise), ``random`` (uniform i.i.d.), or ``sb3`` (a stable-baselines3 policy .zip).
        noise_kind: ``colored`` (power-law spectrum 1/f^beta over the episode) or ``ou``
            (Ornstein-Uhlenbeck).
        noise_beta: spectral exponent of coloured noise (0 white, 1 pink, 2 red/brown).
        ou_theta, ou_sigma: OU mean reversion and step noise in normalised units.
        sb3_path: path of the stable-baselines3 .zip (required for ``sb3``).
        sb3_algo: algorithm class name (PPO, SAC, TD3, A2C, DDPG) or ``auto`` to try each.
        sb3_noise: weight of coloured noise mixed into the sb3 action (0 = pure policy).
    """

    name: str = "noise"
    noise_kind: str = "colored"
    noise_beta: float = 1.0
    ou_theta: float = 0.15
    ou_sigma: float = 0.3
    sb3_path: Optional[str] = None  # noqa: UP045 (OmegaConf needs Optional)
    sb3_algo: str = "auto"
    sb3_noise: float = 0.0

    def validate(self) -> None:
        if self.name not in POLICIES:
            raise UserError(f"unknown policy {self.name!r}; accepted: {', '.join(POLICIES)}")
        if self.noise_kind not in NOISE_KINDS:
            raise UserError(f"unknown noise_kind {self.noise_kind!r}; accepted: {', '.join(NOISE_KINDS)}")
        if self.name == "sb3":
            if not self.sb3_path:
                raise UserError("policy=sb3 needs sb3_path=<path to a stable-baselines3 .zip>")
            if not Path(self.sb3_path).is_file():
                raise UserError(
                    f"sb3_path {self.sb3_path!r} is not a file; expected a stable-baselines3 .zip"
                )
            if not 0.0 <= self.sb3_noise <= 1.0:
                raise UserError(f"sb3_noise must be in [0, 1], got {self.sb3_noise}")


class Policy(Protocol):
    def reset(self, rng: np.random.Generator, steps: int) -> None: ...

    def act(self, obs: np.ndarray, info: dict) -> np.ndarray: ...


def colored_noise(rng: np.random.Generator, beta: float, steps: int, dim: int) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f^beta, unit variance per dimension: (steps, dim)."""
    freqs = np.fft.rfftfreq(steps)
    freqs[0] = freqs[1] if steps > 1 else 1.0
    scale = freqs ** (-beta / 2.0)
    spectrum = scale[:, None] * (
        rng.standard_normal((len(freqs), dim)) + 1j * rng.standard_normal((len(freqs), dim))
    )
    signal = np.fft.irfft(spectrum, n=steps, axis=0)
    return (signal - signal.mean(0)) / (signal.std(0) + 1e-8)


class _Scaled:
    """Maps actions in [-1, 1] to the env's bounds."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.dim = self.low.shape[0]

    def scale(self, unit: np.ndarray) -> np.ndarray:
        unit = np.clip(unit, -1.0, 1.0)
        return (self.low + (unit + 1.0) * 0.5 * (self.high - self.low)).astype(np.float32)


class RandomPolicy(_Scaled):
    """Uniform i.i.d. actions."""

    def reset(self, rng: np.random.Generator, steps: int) -> None:
        self.rng = rng

    def act(self, obs: np.ndarray, info: dict) -> np.ndarray:
        return self.scale(self.rng.uniform(-1.0, 1.0, self.dim))


class NoisePolicy(_Scaled):
    """Temporally correlated noise: coloured (whole episode drawn at reset) or Ornstein-Uhlenbeck."""

    def __init__(self, low, high, cfg: PolicyConfig):
        super().__init__(low, high)
        self.cfg = cfg

    def reset(self, rng: np.random.Generator, steps: int) -> None:
        self.rng, self.k = rng, 0
        if self.cfg.noise_kind == "colored":
            # std 0.5 keeps ~95% of actions inside the bounds before clipping
            self.sequence = 0.5 * colored_noise(rng, self.cfg.noise_beta, max(steps, 2), self.dim)
        else:
            self.x = rng.uniform(-1.0, 1.0, self.dim)

    def act(self, obs: np.ndarray, info: dict) -> np.ndarray:
        if self.cfg.noise_kind == "colored":
            unit = self.sequence[min(self.k, len(self.sequence) - 1)]
        else:
            self.x = (
                self.x - self.cfg.ou_theta * self.x + self.cfg.ou_sigma * self.rng.standard_normal(self.dim)
            )
            unit = self.x
        self.k += 1
        return self.scale(unit)


_SB3_ALGOS = ("PPO", "SAC", "TD3", "A2C", "DDPG")


def load_sb3_model(path: str, algo: str = "auto"):
    """Load a stable-baselines3 model from its .zip on the CPU."""
    import stable_baselines3 as sb3

    names = _SB3_ALGOS if algo == "auto" else (algo,)
    if algo != "auto" and algo not in _SB3_ALGOS:
        raise UserError(f"unknown sb3_algo {algo!r}; accepted: auto, {', '.join(_SB3_ALGOS)}")
    errors = []
    for name in names:
        try:
            return getattr(sb3, name).load(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - try the next algorithm class
            errors.append(f"{name}: {err.__class__.__name__}")
    raise UserError(f"could not load {path} as a stable-baselines3 model ({'; '.join(errors)})")


def dream_settings(sb3_path: str | Path) -> dict | None:
    """The settings of the ``sfw rl`` run that saved ``sb3_path`` (its ``report.json`` beside the
    .zip) if its policy observes a world model's view of the frames (``features`` or ``probes``),
    else None."""
    report = Path(sb3_path).parent / "report.json"
    if not report.is_file():
        return None
    try:
        settings = json.loads(report.read_text()).get("settings", {})
    except (json.JSONDecodeError, AttributeError):
        return None
    return settings if settings.get("observation") in ("features", "probes") else None


class SB3Policy(_Scaled):
    """A stable-baselines3 policy, fed pixels or the simulator's own observation vector (whichever
    its observation space matches), optionally mixed with coloured noise. A policy ``sfw rl``
    trained on the model's features or probe readings (its run's ``report.json`` beside the .zip
    says so) is fed those, computed from the real frames of the episode so far as ``sfw rl``'s own
    evaluation does (:func:`selfflow_world.envs.dream.real_observer`); the env must render as the
    model was trained (size, camera, action repeat)."""

    def __init__(self, low, high, cfg: PolicyConfig):
        super().__init__(low, high)
        self.cfg = cfg
        self.model = load_sb3_model(cfg.sb3_path, cfg.sb3_algo)
        self.obs_shape = tuple(self.model.observation_space.shape)
        self.noise = NoisePolicy(low, high, PolicyConfig(noise_beta=cfg.noise_beta))
        self.observer = None
        settings = dream_settings(cfg.sb3_path)
        if settings is not None:
            from selfflow_world.envs.dream import real_observer

            self.observer = real_observer(
                settings["ckpt"], settings["observation"], settings.get("reward", "heads")
            )
            if self.observer.observation_space.shape != self.obs_shape:
                raise UserError(
                    f"{cfg.sb3_path} observes {self.obs_shape}, but {settings['observation']} of "
                    f"{settings['ckpt']} (its run's report.json) gives {self.observer.observation_space.shape}"
                )
        self.frames: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []

    def reset(self, rng: np.random.Generator, steps: int) -> None:
        self.noise.reset(rng, steps)
        self.frames, self.actions = [], []

    def _policy_obs(self, obs: np.ndarray, info: dict) -> np.ndarray:
        if self.observer is not None:
            return self._observe(obs)
        if obs.shape == self.obs_shape:
            return obs
        if obs.transpose(2, 0, 1).shape == self.obs_shape:
            return obs.transpose(2, 0, 1)
        native = info.get("native_obs")
        if native is not None and native.shape == self.obs_shape:
            return native
        raise UserError(
            f"sb3 policy expects observations of shape {self.obs_shape}; this env gives frames {obs.shape} "
            f"and a native observation of shape {None if native is None else native.shape} (a policy "
            "sfw rl trained on model features or probes needs its run's report.json beside the .zip)"
        )

    def _observe(self, frame: np.ndarray) -> np.ndarray:
        """The dream env's observation of the real frames so far (``frame`` the newest): the
        reset frame counts as produced by the mid-range action, each later one by the action
        returned before it, as in ``sfw rl``'s real episodes."""
        from selfflow_world.envs.dream import mid_action

        wm = self.observer.wm
        size = wm.config.image_size
        if frame.shape != (size, size, 3):
            raise UserError(
                f"{self.cfg.sb3_path} acts on what {wm.source} sees in {size}x{size} frames; this env "
                f"renders {frame.shape}: collect with size={size} (and the model's camera and action repeat)"
            )
        if not self.frames:
            self.actions.append(mid_action(wm.action_low, wm.action_high))
        self.frames.append(frame)
        keep = self.observer.history + 1
        del self.frames[:-keep], self.actions[:-keep]
        return self.observer.observe_real(np.stack(self.frames), np.stack(self.actions))

    def act(self, obs: np.ndarray, info: dict) -> np.ndarray:
        action, _ = self.model.predict(self._policy_obs(obs, info), deterministic=True)
        action = np.asarray(action, np.float32).reshape(self.dim)
        if self.cfg.sb3_noise > 0:
            unit = 2.0 * (action - self.low) / (self.high - self.low) - 1.0
            noise_unit = 2.0 * (self.noise.act(obs, info) - self.low) / (self.high - self.low) - 1.0
            action = self.scale((1.0 - self.cfg.sb3_noise) * unit + self.cfg.sb3_noise * noise_unit)
        action = np.clip(action, self.low, self.high)
        if self.observer is not None:
            self.actions.append(action)  # it produces the next frame
        return action


def make_policy(cfg: PolicyConfig, low: np.ndarray, high: np.ndarray) -> Policy:
    """Build the policy named by ``cfg`` for an action space with these bounds."""
    cfg.validate()
    if cfg.name == "random":
        return RandomPolicy(low, high)
    if cfg.name == "noise":
        return NoisePolicy(low, high, cfg)
    return SB3Policy(low, high, cfg)
