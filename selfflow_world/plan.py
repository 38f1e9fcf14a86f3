"""``sfw plan``: model-predictive control in the real simulator, planning in imagination.

At every replanning step a planner (:mod:`selfflow_world.agents.planners`: CEM or MPPI) searches
over action sequences; each candidate is rolled out in the world model from the latest real frames
(:meth:`~selfflow_world.world_model.WorldModel.start` once, ``repeat`` per iteration, one batched
:meth:`~selfflow_world.world_model.WorldModel.step` per horizon step) and scored; the first
``execute`` actions of the best plan run in the real env, and the loop replans from what it sees.

Tasks:

- ``goal``: a start is a state of a fresh episode of the collection policy (env seed from ``seed``,
  so not the training episodes), the goal is the state ``goal_offset`` agent steps later in that
  episode and its rendered frame is the goal image; success means every goal joint within
  ``tolerance`` of the goal's (angles wrapped) within ``budget`` agent steps. Starts already within
  the tolerance are skipped. Scores, at the end of the horizon: ``features`` (distance to the goal
  image in the model's own feature space), ``pixels`` (pixel MSE) or ``state`` (distance between
  the joint positions a state probe reads off the imagined frame and off the goal image; the probe
  is a small conv net fitted on real frames and recorded states of a dataset, ``probe_data``).
- ``reward``: the env's own return over a full episode. Scores: ``target`` (default where the env
  has a target, :data:`TARGET_VECTORS`: the distance between the finger and the target that a
  probe reads off every imagined frame, summed over the horizon; a dense, learned stand-in for a
  sparse reward) or ``reward`` (the reward heads' predicted return).

Arms on the same starts: ``model`` (the world model), ``random`` (uniform random actions) and
``simulator`` (the same planner and score with the simulator as the model: each candidate replayed
from the restored physics state), so the share of the gap that the world model causes shows. One
result file per arm and episode under ``out/episodes/``, so a rerun continues (``resume``).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfflow_world.errors import UserError, check_count, check_positive

TASKS = ("goal", "reward")
PLANNERS = ("cem", "mppi")
ACTS = ("best", "mean")  # CEM: execute the best sequence scored, or the final (elite) mean
SCORES = ("auto", "features", "pixels", "state", "reward", "target")
GOAL_SCORES, REWARD_SCORES = ("features", "pixels", "state"), ("reward", "target")
ARMS = ("model", "random", "simulator")

# envs with a target to reach, for the ``target`` score of the reward task: (entries of the task's
# own observation vector that hold the vector from the effector to the target, what they are)
TARGET_VECTORS: dict[str, tuple[list[int], str]] = {
    "dmc/reacher-easy": ([2, 3], "finger-to-target vector (x, y)"),
    "dmc/reacher-hard": ([2, 3], "finger-to-target vector (x, y)"),
}

# a small CEM search that plans a goal episode within about a minute on 2 CPU cores (32 candidates
# x 5 steps x 2 iterations, two actions executed per plan), with the pixel score, which needs no
# state probe (any model plans with it at once); the demo and bench/study.py use it
QUICK_GOAL_SEARCH: dict[str, Any] = {
    "score": "pixels",
    "population": 32,
    "horizon": 5,
    "iterations": 2,
    "elites": 4,
    "execute": 2,
}

# goal joints per env: (qpos indices, names) whose distance decides goal success
GOAL_JOINTS: dict[str, tuple[list[int], list[str]]] = {
    "dmc/reacher-easy": ([0, 1], ["shoulder", "wrist"]),
    "dmc/reacher-hard": ([0, 1], ["shoulder", "wrist"]),
}


@dataclass
class PlanConfig:
    """Settings of ``sfw plan`` (documented in configs/plan.yaml)."""

    ckpt: str = "reacher-easy"
    env: str | None = None  # default: the env the model was trained on
    planner: str = "cem"
    task: str = "goal"
    score: str = "auto"  # goal: state (default), features or pixels; reward: target (default) or reward
    pixel_blur: list[int] = field(default_factory=lambda: [0])  # pixels: box-blur radii averaged
    probe_data: str = ""  # state: dataset whose real frames train the probe ("": the model's data)
    probe: str = ""  # state/target: read frames with this probe (a kept .pt, or a model that ships one)
    probe_frames: int = 12000
    probe_epochs: int = 15
    probe_imagined: int = 3000  # state: clips whose imagined frames (1..horizon steps) it also fits
    pixel_weight: float = 50.0  # state: plus this weight times the pixel distance (fine positioning)
    episodes: int = 50
    out: str = "???"
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    baseline_episodes: int | None = None  # episodes of the simulator arm (default: all)
    horizon: int = 3
    population: int = 32
    iterations: int = 2
    elites: int = 4
    # reward task, target score: plan with this planner (cem|mppi) while the finger-to-target distance
    # the probe reads off the latest real frame is below near_distance, with ``planner`` otherwise;
    # auto: mppi with the target score (it holds the target, CEM approaches it), none otherwise
    near_planner: str | None = "auto"
    near_distance: float = 0.05
    temperature: float = 0.1  # MPPI
    noise_std: float = 0.5  # MPPI sampling std (normalised units)
    noise_beta: float = 1.0  # temporally correlated sampling noise (iCEM), 0 = white
    execute: int = 2  # actions executed per plan
    action_cost: float = 0.0  # score minus this x the sum of squared (normalised) actions of a sequence
    act: str = "best"  # CEM: execute the best sequence scored (best) or the final elite mean (mean)
    common_noise: bool = False  # every candidate imagined from the same sampler noise per step
    sampler_steps: int = 1
    goal_offset: int = 25
    budget: int = 50
    tolerance: float = 0.05  # rad
    reward_steps: int | None = None  # agent steps of a reward episode (default: until the env ends)
    videos: int = 2  # episodes with a video of real execution beside what the model imagined
    seed: int = 1
    device: str = "auto"
    resume: bool = True

    def check(self) -> None:
        if self.out in ("???", "", None):
            raise UserError("out= is required (e.g. sfw plan ckpt=reacher-easy task=goal episodes=2 out=DIR)")
        if self.task not in TASKS:
            raise UserError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.planner not in PLANNERS:
            raise UserError(f"planner must be one of {PLANNERS}, got {self.planner!r}")
        if self.near_planner is not None and self.near_planner not in (*PLANNERS, "auto"):
            raise UserError(
                f"near_planner must be one of {(*PLANNERS, 'auto')} or null, got {self.near_planner!r}"
            )
        if self.act not in ACTS:
            raise UserError(f"act must be one of {ACTS}, got {self.act!r}")
        if self.score not in SCORES:
            raise UserError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.score != "auto" and self.score not in (GOAL_SCORES if self.task == "goal" else REWARD_SCORES):
            raise UserError(
                f"score={self.score} does not fit task={self.task} "
                f"(goal: {'|'.join(GOAL_SCORES)}, reward: {'|'.join(REWARD_SCORES)})"
            )
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise UserError(f"arms must be a non-empty list of {ARMS}, got {self.arms}")
        for name in (
            "episodes",
            "horizon",
            "population",
            "iterations",
            "elites",
            "execute",
            "sampler_steps",
            "goal_offset",
            "budget",
            "probe_frames",
            "probe_epochs",
        ):
            check_count(name, getattr(self, name))
        if self.elites > self.population:
            raise UserError(f"elites ({self.elites}) must not exceed population ({self.population})")
        if self.execute > self.horizon:
            raise UserError(f"execute ({self.execute}) must not exceed horizon ({self.horizon})")
        radii = list(self.pixel_blur) if isinstance(self.pixel_blur, (list, tuple)) else None
        if not radii or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in radii):
            raise UserError(
                "pixel_blur must be a non-empty list of integers >= 0 (box-blur radii in pixels, "
                f"0 = sharp, e.g. [0, 2, 4, 8]), got {self.pixel_blur!r}"
            )
        for name in ("temperature", "noise_std", "tolerance", "near_distance"):
            check_positive(name, getattr(self, name))
        if (
            isinstance(self.probe_imagined, bool)
            or not isinstance(self.probe_imagined, int)
            or self.probe_imagined < 0
        ):
            raise UserError(
                f"probe_imagined must be an integer >= 0 (clips of imagined frames for the state probe), "
                f"got {self.probe_imagined!r}"
            )
        for name in ("pixel_weight", "action_cost"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise UserError(f"{name} must be a number >= 0, got {value!r}")

    def resolved_near_planner(self, score: str | None) -> str | None:
        """The planner used near the target: ``auto`` is mppi with the target score, else none."""
        if self.near_planner == "auto":
            return "mppi" if score == "target" else None
        return self.near_planner

    def resolved_score(self, env_name: str) -> str:
        """The score ``auto`` stands for in ``env_name``: goal: state; reward: target where the env
        has one (:data:`TARGET_VECTORS`), else the reward heads."""
        if self.score != "auto":
            return self.score
        if self.task == "goal":
            return "state"
        return "target" if env_name in TARGET_VECTORS else "reward"


# -- goal protocol ------------------------------------------------------------------------------------
def joint_distance(env_name: str, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Per goal joint ``|angle - goal angle|`` (wrapped to [0, pi]) from physics states (index 0
    is the simulation time, qpos follows)."""
    if env_name not in GOAL_JOINTS:
        raise UserError(f"task=goal is defined for {sorted(GOAL_JOINTS)}; got env {env_name}")
    idx = np.asarray(GOAL_JOINTS[env_name][0]) + 1
    diff = np.asarray(state, np.float64)[..., idx] - np.asarray(goal, np.float64)[..., idx]
    return np.abs((diff + np.pi) % (2 * np.pi) - np.pi)


def reached(env_name: str, state: np.ndarray, goal: np.ndarray, tolerance: float) -> bool:
    """Whether every goal joint of ``state`` is within ``tolerance`` of ``goal``'s."""
    return bool((joint_distance(env_name, state, goal) <= tolerance).all())


@dataclass
class GoalEpisode:
    """One start of the goal protocol: the context (uint8 ``(H, h, w, 3)`` frames and their per-frame
    actions), the physics states of the start and the goal, the goal image, the env seed."""

    index: int
    env_seed: int
    context: np.ndarray
    context_actions: np.ndarray
    start: np.ndarray
    goal: np.ndarray
    goal_frame: np.ndarray


def goal_episodes(env, cfg: PlanConfig, history: int, count: int):
    """Yield :class:`GoalEpisode` starts (skipping those already at their goal), deterministic in
    ``cfg.seed``: each from a fresh episode of the collection policy (coloured noise)."""
    from selfflow_world.clips import per_frame
    from selfflow_world.envs.collect import run_episode
    from selfflow_world.envs.policies import PolicyConfig, make_policy

    policy = make_policy(PolicyConfig(), env.action_space.low, env.action_space.high)
    made, index = 0, 0
    while made < count:
        rng = np.random.default_rng([cfg.seed, index])
        first = int(rng.integers(history - 1, history - 1 + 25))  # where the start sits
        arrays, env_seed = run_episode(env, policy, cfg.seed + 7919, index, first + cfg.goal_offset)
        index += 1
        if len(arrays["states"]) < first + cfg.goal_offset + 1:
            continue  # terminated early
        start, goal = arrays["states"][first], arrays["states"][first + cfg.goal_offset]
        if reached(env.name, start, goal, cfg.tolerance):
            continue
        yield GoalEpisode(
            index - 1,
            env_seed,
            arrays["frames"][first + 1 - history : first + 1],
            per_frame(arrays["actions"], first + 1 - history, history),
            start,
            goal,
            arrays["frames"][first + cfg.goal_offset],
        )
        made += 1


# -- scores -------------------------------------------------------------------------------------------
def _token_norm(features: Tensor) -> Tensor:
    """Each token's features standardised over channels, so distances weigh every token alike."""
    return torch.nn.functional.layer_norm(features.float(), features.shape[-1:])


def feature_distance(features: Tensor, goal: Tensor) -> Tensor:
    """Mean squared distance ``(N,)`` between standardised token features ``(N, L, D)`` and ``goal (L, D)``."""
    return (_token_norm(features) - _token_norm(goal)[None]).pow(2).mean((1, 2))


def box_blur(frames: Tensor, radius: int) -> Tensor:
    """Each pixel of ``frames (N, C, H, W)`` replaced by the mean of the ``(2 radius + 1)``-wide
    square around it (pixels outside the image not counted); two separable passes."""
    if radius == 0:
        return frames
    k = 2 * radius + 1
    pool = torch.nn.functional.avg_pool2d
    frames = pool(frames, (k, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return pool(frames, (1, k), stride=1, padding=(0, radius), count_include_pad=False)


def pixel_distance(frames: Tensor, goal: Tensor, blur: Sequence[int] = (0,)) -> Tensor:
    """Mean squared pixel distance ``(N,)`` of float frames ``(N, C, H, W)`` to ``goal (C, H, W)``,
    averaged over the box-blur radii ``blur`` (0 = the sharp images).

    Sharp, two images of an arm that do not overlap are equally far apart whatever the angle between
    them; blurred by a radius comparable to that gap they overlap, so nearer arms rank as nearer.
    """
    frames, goal = frames.float(), goal.float()[None]
    total = frames.new_zeros(frames.shape[0])
    for r in blur:
        total += (box_blur(frames, r) - box_blur(goal, r)).pow(2).mean((1, 2, 3))
    return total / len(blur)


class PixelDistance:
    """Frames ``(N, C, H, W)`` -> their :func:`pixel_distance` ``(N,)`` to the goal image."""

    def __init__(self, goal_frame: Tensor, blur: Sequence[int] = (0,)):
        self.goal, self.blur = goal_frame, tuple(blur)

    def __call__(self, frames: Tensor) -> Tensor:
        return pixel_distance(frames, self.goal.to(frames.device), self.blur)


class ProbeDistance:
    """Frames ``(N, C, H, W)`` -> squared distance ``(N,)`` between the joint positions a state
    probe reads off them and those it reads off the goal image (raw joint positions, sine and
    cosine of each unlimited hinge, so angles compare wrapped).

    Unlike pixel distance it says which way the goal lies when the imagined arm and the goal arm do
    not overlap."""

    def __init__(self, probe, goal_frame: Tensor):
        self.probe = probe
        self.goal = self.positions(goal_frame[None])[0]

    @torch.no_grad()
    def positions(self, frames: Tensor) -> Tensor:
        return self.probe(frames.to(self.probe.state_mean.device).float())

    def __call__(self, frames: Tensor) -> Tensor:
        return (self.positions(frames) - self.goal).pow(2).sum(1).to(frames.device)


class TargetDistance:
    """Frames ``(N, C, H, W)`` -> the length ``(N,)`` of the effector-to-target vector a probe reads
    off them (:data:`TARGET_VECTORS`): how far each frame is from earning the reward."""

    def __init__(self, probe):
        self.probe = probe

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Tensor:
        return self.probe(frames.to(self.probe.state_mean.device).float()).norm(dim=1).to(frames.device)


class SumDistance:
    """The weighted sum ``sum_i w_i d_i(frames)`` of frame distances ``[(w_i, d_i), ...]``."""

    def __init__(self, terms):
        self.terms = list(terms)

    def __call__(self, frames: Tensor) -> Tensor:
        return sum(w * d(frames) for w, d in self.terms)


class ModelScorer:
    """Scores action sequences by imagining them: ``begin`` at each replanning step, then call.

    ``goal``: the goal's features ``(L, D)`` (score ``features``); ``distance``: frames -> distance to
    the goal (scores ``pixels`` and ``state``: :class:`PixelDistance`, :class:`ProbeDistance`, read
    at the end of the horizon) or to the target (score ``target``, :class:`TargetDistance`, summed
    over every imagined frame, as the reward is). ``common_noise``: every candidate of a call is
    imagined from the same sampler noise at each step, so scores differ by the actions alone and the
    search does not favour candidates whose noise happened to imagine a better frame."""

    def __init__(
        self,
        wm,
        score: str,
        sampler_steps: int,
        generator: torch.Generator,
        goal=None,
        distance=None,
        common_noise: bool = False,
    ):
        self.wm, self.score, self.steps, self.generator = wm, score, sampler_steps, generator
        self.goal, self.distance, self.common_noise = goal, distance, common_noise
        self.frames = 0

    def begin(self, context: np.ndarray, context_actions: np.ndarray) -> None:
        from selfflow_world.video import to_float

        self.root = self.wm.start(to_float(context[None]), context_actions[None])

    @torch.no_grad()
    def imagine(self, actions: Tensor, keep: bool = False):
        """Roll ``actions (N, T, A)`` (normalised) out; returns the score ``(N,)`` (and the frames)."""
        n, horizon = actions.shape[:2]
        state = self.root.repeat(n)
        total = torch.zeros(n, device=actions.device)
        cfg = self.wm.config
        kept = []
        for h in range(horizon):
            last = h == horizon - 1
            noise = None
            if self.common_noise:  # one draw for every candidate: they differ by their actions only
                gen = self.generator
                shape = (1, cfg.channels, cfg.image_size, cfg.image_size)
                noise = torch.randn(shape, generator=gen, device=gen.device if gen is not None else "cpu")
            rewards, features = self.score == "reward", self.score == "features" and last
            out = self.wm.step(
                state,
                actions[:, h],
                normalized=True,
                steps=self.steps,
                generator=self.generator,
                noise=noise,
                rewards=rewards,
                features=features,
            )
            frame = out.frames if rewards or features else out
            if rewards:
                total += out.reward.to(total.device)
            elif features:
                total -= feature_distance(out.features, self.goal).to(total.device)
            elif self.distance is not None and (last or self.score == "target"):
                total -= self.distance(frame).to(total.device)
            if keep:
                kept.append(frame)
        self.frames += n * horizon
        return (total, torch.stack(kept, 1)) if keep else total

    def __call__(self, actions: Tensor) -> Tensor:
        return self.imagine(actions)


class SimulatorScorer:
    """The same scores with the simulator as the model: each candidate replayed from the restored
    physics state of the real env (features: the model's features of the simulator's frames)."""

    def __init__(self, env, wm, score: str, goal=None, distance=None):
        self.env, self.wm, self.score = env, wm, score
        self.goal, self.distance = goal, distance
        self.frames = 0

    def begin(
        self, context: np.ndarray, context_actions: np.ndarray, physics: np.ndarray, env_seed: int
    ) -> None:
        self.context, self.context_actions = context, context_actions
        self.physics, self.env_seed = physics, env_seed

    @torch.no_grad()
    def __call__(self, actions: Tensor) -> Tensor:
        from selfflow_world.video import to_float

        acts = self.wm.denormalize_actions(actions.to(self.wm.device)).cpu().numpy()
        n, horizon = acts.shape[:2]
        history = self.context.shape[0]
        scores, clips, clip_actions = np.zeros(n), [], []
        keep = {"reward": 0, "target": horizon}.get(self.score, min(history + 1, horizon))  # frames read
        for i in range(n):
            # a reset with the episode's seed restores its task randomisation (the target) and the
            # env's step count, then the physics state; only the frames the score reads are rendered
            self.env.restore(self.physics, seed=self.env_seed, render=False)
            frames, total = [], 0.0
            for h, a in enumerate(acts[i]):
                reward, term, _ = self.env.simulate(a)
                total += reward
                if h >= horizon - keep:
                    frames.append(self.env.render().copy())
                if term:
                    break
            scores[i] = total
            if self.score == "target":
                frames += [frames[-1] if frames else self.env.render()] * (keep - len(frames))  # ended early
                clips.append(np.stack(frames))
            elif self.score != "reward":
                frames += [frames[-1] if frames else self.env.render()] * (keep - len(frames))
                seq = np.concatenate([self.context, np.stack(frames)])[-(history + 1) :]
                clips.append(seq)
                seq_a = np.concatenate([self.context_actions, acts[i]])[-(history + 1) :]
                clip_actions.append(seq_a)
        self.frames += n * horizon
        if self.score == "reward":
            return torch.as_tensor(scores, dtype=torch.float32, device=actions.device)
        clips_t = to_float(np.stack(clips))
        if self.score == "target":  # (N, horizon, C, H, W): distance summed over the frames
            return -self.distance(clips_t.flatten(0, 1)).view(n, horizon).sum(1).to(actions.device)
        if self.distance is not None:
            return -self.distance(clips_t[:, -1]).to(actions.device)
        feats = self.wm.clip_features(clips_t, np.stack(clip_actions))
        return -feature_distance(feats, self.goal).to(actions.device)


# the probes a plan reads frames with, stored beside a model's weights: (weights, json) per score
PROBE_FILES: dict[str, tuple[str, str]] = {
    "state": ("state_probe.safetensors", "state_probe.json"),
    "target": ("target_probe.safetensors", "target_probe.json"),
}


def ship_probe(kept: str | Path, model_dir: str | Path, score: str = "state") -> None:
    """Store the probe a plan fitted and kept (``out/<score>_probe.pt``) beside a model's weights in
    ``model_dir`` (:data:`PROBE_FILES`), so planning with that score and model needs no dataset:
    the probe shipped with a model."""
    save_probe(torch.load(kept, map_location="cpu", weights_only=True), model_dir, score)


def save_probe(saved: dict, model_dir: str | Path, score: str = "state") -> None:
    """Write a fitted probe (:func:`fit_model_probe`'s dict) as ``model_dir``'s probe of ``score``
    (:data:`PROBE_FILES`); each file replaced atomically, so a failed write leaves the old probe."""
    from safetensors.torch import save_file

    from selfflow_world.episodes import write_json_atomic

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    weights, meta_name = PROBE_FILES[score]
    tmp = model_dir / (weights + ".tmp")
    save_file({k: v.contiguous() for k, v in saved["weights"].items()}, str(tmp))
    tmp.replace(model_dir / weights)
    meta = {k: saved[k] for k in ("image_size", "state_dim", "width", "report", "fitted_from")}
    write_json_atomic(model_dir / meta_name, meta)


@dataclass
class ProbeConfig:
    """Settings of ``sfw probe`` (documented in configs/probe.yaml)."""

    ckpt: str = "???"
    data: str = "???"
    score: str = "state"
    out: str | None = None  # default: beside the checkpoint's weights
    frames: int = 12000
    epochs: int = 15
    imagined: int = 3000
    horizon: int = 5
    sampler_steps: int = 1
    seed: int = 0
    device: str = "auto"


def run_probe(cfg: ProbeConfig, wm=None) -> dict[str, Any]:
    """``sfw probe``: fit the probe of ``cfg.score`` for a model (:func:`fit_model_probe`) and store
    it beside the model's weights (or in ``cfg.out``), where ``sfw plan`` and the dream envs'
    ``observation=probes`` / ``reward=target`` find it. Returns the probe's report with
    ``written_to``."""
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.envs import make_like
    from selfflow_world.episodes import read_manifest
    from selfflow_world.runtime import resolve_device
    from selfflow_world.world_model import WorldModel

    for name in ("ckpt", "data"):
        if getattr(cfg, name) in ("???", "", None):
            raise UserError(f"{name}= is required (e.g. sfw probe ckpt=RUN data=DATA score=state)")
    if cfg.score not in PROBE_FILES:
        raise UserError(f"score must be one of {sorted(PROBE_FILES)}, got {cfg.score!r}")
    for name in ("frames", "epochs", "horizon"):
        check_count(name, getattr(cfg, name))
    check_count("imagined", cfg.imagined, minimum=0)
    if not 1 <= cfg.sampler_steps <= 50:
        raise UserError(f"sampler_steps must be in [1, 50], got {cfg.sampler_steps}")
    if not Path(cfg.data).is_dir():
        raise UserError(f"data={cfg.data} is not a directory (a dataset of sfw collect)")
    if wm is None:
        wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device))
    manifest = read_manifest(Path(cfg.data))
    trained_env = wm.meta.get("env")
    if trained_env and manifest["env"] != trained_env:
        raise UserError(
            f"data={cfg.data} holds {manifest['env']} episodes, the model was trained on {trained_env}"
        )
    out = Path(cfg.out) if cfg.out else resolve_checkpoint(cfg.ckpt)
    fitted_from = probe_source(
        cfg.data, cfg.frames, cfg.epochs, cfg.seed, cfg.imagined, cfg.horizon, cfg.sampler_steps
    )
    env = make_like(manifest)
    try:
        saved = fit_model_probe(wm, env, cfg.score, fitted_from)
    finally:
        env.close()
    save_probe(saved, out, cfg.score)
    return {**saved["report"], "written_to": str(out)}


def _probe_from(meta: dict, weights: dict):
    """A :class:`~selfflow_world.probe.StateProbe` built from its saved sizes and weights, in eval mode."""
    from selfflow_world.probe import StateProbe

    probe = StateProbe(tuple(meta["image_size"]), meta["state_dim"], meta["width"])
    probe.load_state_dict(weights)
    return probe.eval()


def shipped_probe_dir(wm, score: str = "state") -> Path | None:
    """The checkpoint directory of ``wm`` (a model, or where one is: a shipped model's name, a run or
    checkpoint directory) if the probe of ``score`` is stored beside its weights (:func:`ship_probe`),
    else None; reads no weights."""
    from selfflow_world.checkpoint import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(wm if isinstance(wm, (str, Path)) else wm.source)
    except UserError:  # a model built in memory
        return None
    return ckpt if all((ckpt / name).is_file() for name in PROBE_FILES[score]) else None


def shipped_probe(wm, score: str = "state"):
    """The probe of ``score`` stored beside ``wm``'s weights (:func:`ship_probe`; ``wm`` as in
    :func:`shipped_probe_dir`) and its json, or None."""
    from safetensors.torch import load_file

    ckpt = shipped_probe_dir(wm, score)
    if ckpt is None:
        return None
    weights, meta_name = PROBE_FILES[score]
    meta = json.loads((ckpt / meta_name).read_text())
    return _probe_from(meta, load_file(str(ckpt / weights))), meta


def given_probe(source: str, wm, score: str):
    """The probe of ``score`` from ``source``: a probe a plan kept (``out/<score>_probe.pt``) or a
    model that ships one (its name, run or checkpoint directory), to read ``wm``'s frames with: one
    instrument for several models. Returns the probe (on ``wm``'s device) and the report's entry."""
    path = Path(source)
    if path.suffix == ".pt" and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        probe, report = _probe_from(saved, saved["weights"]), saved["report"]
    else:
        found = shipped_probe(source, score)
        if found is None:
            raise UserError(
                f"probe={source} is neither a kept probe file (<plan out>/{score}_probe.pt) nor a model that "
                f"ships a {score} probe ({' and '.join(PROBE_FILES[score])} beside its weights)"
            )
        probe, report = found[0], found[1]["report"]
    if report.get("score", "state") != score:
        raise UserError(
            f"probe={source} is a {report.get('score', 'state')} probe, score={score} needs a {score} one"
        )
    size = tuple(probe.image_size)
    if size[-1] != wm.config.image_size:
        raise UserError(
            f"probe={source} reads {size[-1]}x{size[-1]} frames, the model imagines "
            f"{wm.config.image_size}x{wm.config.image_size}"
        )
    return probe.to(wm.device), {**report, "probe_from": str(source)}


def plan_probe(cfg: PlanConfig, wm, env, out: Path, score: str):
    """The probe of the ``state`` score (joint positions) or the ``target`` score (the
    effector-to-target vector, :data:`TARGET_VECTORS`). Without ``cfg.probe_data``, the probe
    shipped with the model if it has one (:func:`ship_probe`); with ``cfg.probe``, that one
    (:func:`given_probe`); otherwise fitted on the real frames
    (and, with ``probe_imagined``, the imagined ones) of ``cfg.probe_data`` (default: the dataset
    the model was trained on) and kept in ``out/<score>_probe.pt``, which a rerun with ``resume``
    loads. Returns the probe (on the model's device) and what the report says of it."""
    if cfg.probe:
        return given_probe(cfg.probe, wm, score)
    if not cfg.probe_data:
        found = shipped_probe(wm, score)
        if found is not None:
            probe, meta = found
            return probe.to(wm.device), {**meta["report"], "shipped_with_model": True}

    path = out / f"{score}_probe.pt"
    root = cfg.probe_data or wm.meta.get("config", {}).get("data", "")
    fitted_from = probe_source(
        root, cfg.probe_frames, cfg.probe_epochs, cfg.seed, cfg.probe_imagined, cfg.horizon, cfg.sampler_steps
    )
    if cfg.resume and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fitted_from") == fitted_from:  # otherwise fitted again below
            return _probe_from(saved, saved["weights"]).to(wm.device), saved["report"]
    if not root or not Path(root).is_dir():
        where = (
            f"probe_data={root} is not a directory"
            if cfg.probe_data
            else f"the model's training data ({root or 'not recorded'}) is not here"
        )
        raise UserError(
            f"score={score} fits a probe on the recorded frames and states of a dataset, but {where}: "
            f"pass probe_data=DIR, a dataset of {env.name} (e.g. sfw collect env={env.name} episodes=50 out=DIR)"
        )
    saved = fit_model_probe(wm, env, score, fitted_from)
    torch.save(saved, path)
    return _probe_from(saved, saved["weights"]).to(wm.device), saved["report"]


def probe_source(
    data, frames: int, epochs: int, seed: int, imagined: int, horizon: int, sampler_steps: int
) -> dict:
    """What a probe is fitted from (recorded with it, and compared by a resumed plan)."""
    fitted_from = {"data": str(data), "frames": frames, "epochs": epochs, "seed": seed}
    if imagined:
        fitted_from.update(imagined_clips=imagined, horizon=horizon, sampler_steps=sampler_steps)
    return fitted_from


def fit_model_probe(wm, env, score: str, fitted_from: dict) -> dict:
    """Fit the probe of ``score`` for ``wm`` as :func:`probe_source`'s ``fitted_from`` says: the
    ``state`` probe reads qpos (unlimited hinge angles as sine and cosine), the ``target`` probe
    the effector-to-target vector (:data:`TARGET_VECTORS`), off the real frames of the dataset's
    training split and, with ``imagined_clips``, off the model's own imagined frames of that many
    clips (1..horizon steps each), as a score or a dream env will read them. Returns the dict
    :func:`save_probe` and :func:`_probe_from` take (weights, sizes, report, ``fitted_from``)."""
    from selfflow_world.evaluate import (
        ObservationMap,
        StateMap,
        imagined_probe_data,
        probe_splits,
        train_state_probe,
    )

    if score == "state":
        # positions only: one frame shows no velocity, and fitting it would only add noise to the fit
        labels = StateMap(env.nq, env.nv, env.wrapped_qpos(), velocities=False)
    else:
        if env.name not in TARGET_VECTORS:
            raise UserError(f"score=target is defined for {sorted(TARGET_VECTORS)}; got env {env.name}")
        dims, name = TARGET_VECTORS[env.name]
        labels = ObservationMap(env, dims, name)
    seed, imagined = fitted_from["seed"], fitted_from.get("imagined_clips", 0)
    train_set, val_set = probe_splits(wm, fitted_from["data"])
    extra = None
    if imagined:
        extra = imagined_probe_data(
            wm, train_set, imagined, fitted_from["horizon"], labels, seed, fitted_from["sampler_steps"]
        )
    probe, metrics = train_state_probe(
        train_set, val_set, labels, fitted_from["frames"], fitted_from["epochs"], seed, extra
    )
    report = {
        "score": score,
        "data": fitted_from["data"],
        "state_dims": labels.description,
        "floor_rmse": metrics["rmse"],
        "floor_rmse_overall": metrics["rmse_overall"],
        "imagined_clips": imagined,
    }
    return {
        "weights": probe.state_dict(),
        "image_size": list(probe.image_size),
        "state_dim": probe.state_dim,
        "width": probe.width,
        "report": report,
        "fitted_from": fitted_from,
    }


# -- the control loop ---------------------------------------------------------------------------------
def _planner(
    cfg: PlanConfig,
    scorer,
    action_dim: int,
    generator: torch.Generator,
    init_mean: Tensor | None,
    name: str | None = None,
):
    """One plan with planner ``name`` (default ``cfg.planner``)."""
    from selfflow_world.agents.planners import cem, mppi, with_action_cost

    score = with_action_cost(scorer, cfg.action_cost)
    if (name or cfg.planner) == "cem":
        return cem(
            score,
            cfg.horizon,
            action_dim,
            population=cfg.population,
            elites=cfg.elites,
            iterations=cfg.iterations,
            generator=generator,
            init_mean=init_mean,
            init_std=0.5,
            noise_beta=cfg.noise_beta,
            momentum=0.1,
        )
    return mppi(
        score,
        cfg.horizon,
        action_dim,
        population=cfg.population,
        iterations=cfg.iterations,
        temperature=cfg.temperature,
        noise_std=cfg.noise_std,
        generator=generator,
        init_mean=init_mean,
        noise_beta=cfg.noise_beta,
    )


def _planner_name(cfg: PlanConfig, scorer, frame: np.ndarray, device) -> tuple[str, bool]:
    """The planner of the next plan and whether the finger is near the target: ``cfg.near_planner``
    (``auto`` resolved by the scorer's score) while the target distance ``scorer.distance`` reads
    off the latest real ``frame`` is below ``cfg.near_distance``, else ``cfg.planner`` (without a
    near planner nothing is read and ``near`` is False)."""
    from selfflow_world.video import to_float

    near_planner = cfg.resolved_near_planner(getattr(scorer, "score", None))
    if near_planner is None:
        return cfg.planner, False
    near = float(scorer.distance(to_float(frame[None]).to(device))[0]) < cfg.near_distance
    return (near_planner if near else cfg.planner), near


def control(
    cfg: PlanConfig,
    env,
    wm,
    arm: str,
    scorer,
    context,
    context_actions,
    physics,
    env_seed,
    steps: int,
    stop=None,
    video: bool = False,
) -> dict[str, Any]:
    """Run one episode of MPC (or random actions) in ``env`` from ``physics``: plan, execute
    ``cfg.execute`` actions, observe, replan, for ``steps`` agent steps or until ``stop(state)``.

    Returns the return, the steps taken, whether ``stop`` fired, planning time per plan and, with
    ``video``, the real frames beside the imagined ones of the plan being executed.
    """
    from selfflow_world.agents.planners import shift_plan

    env.restore(physics, seed=env_seed)
    history = context.shape[0]
    frames, acts = list(context), list(context_actions)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + env_seed % 1_000_003)
    rng = np.random.default_rng([cfg.seed, env_seed % (2**32)])
    low, high = env.action_space.low, env.action_space.high
    total, done, plans, plan_time, imagined_frames = 0.0, False, 0, 0.0, 0
    mean, queue, imagined_queue, real_video, model_video = None, [], [], [], []
    taken, first_reward, after_first, near_plans = 0, None, 0.0, 0
    while taken < steps:
        taken += 1
        if arm == "random":
            action = rng.uniform(low, high).astype(np.float32)
        else:
            if not queue:
                t0 = time.perf_counter()
                ctx, ctx_a = np.stack(frames[-history:]), np.stack(acts[-history:])
                if arm == "model":
                    scorer.begin(ctx, ctx_a)
                else:
                    scorer.begin(ctx, ctx_a, env.get_physics_state(), env_seed)
                before = scorer.frames
                name, near = _planner_name(cfg, scorer, frames[-1], wm.device)
                near_plans += near
                plan = _planner(cfg, scorer, wm.config.action_dim, gen, mean, name)
                plan_time += time.perf_counter() - t0
                imagined_frames += scorer.frames - before
                plans += 1
                mean = shift_plan(plan.mean, cfg.execute)
                # MPPI always executes its mean; CEM its best sequence or, with act=mean, the refitted
                # mean of its elites, which averages out candidates that won on sampler noise alone
                executed = plan.mean if cfg.act == "mean" else plan.actions
                chosen = executed[: cfg.execute]
                queue = list(wm.denormalize_actions(chosen.to(wm.device)).cpu().numpy())
                if video and arm == "model":
                    _, seen = scorer.imagine(executed[None].to(wm.device), keep=True)
                    from selfflow_world.video import to_uint8

                    imagined_queue = list(to_uint8(seen[0, : cfg.execute]))
            action = queue.pop(0)
        obs, reward, term, trunc, _ = env.step(action)
        total += reward
        if first_reward is None and reward > 0:
            first_reward = taken
        if first_reward is not None:
            after_first += reward
        frames.append(obs)
        acts.append(np.asarray(action, np.float32))
        if video:
            real_video.append(obs)
            model_video.append(imagined_queue.pop(0) if imagined_queue else np.zeros_like(obs))
        if stop is not None and stop(env.get_physics_state()):
            done = True
            break
        if term or trunc:
            break
    out = {
        "return": float(total),
        "steps": int(taken),
        "reached": bool(done),
        "first_reward_step": first_reward,  # agent step (1-based) of the first positive reward
        # mean reward per agent step from the first positive reward on: how well it holds the target
        "reward_per_step_after_first": (
            after_first / (taken - first_reward + 1) if first_reward is not None else None
        ),
        "plans": plans,
        "near_plans": near_plans,  # plans made while the finger read near the target
        "seconds_per_plan": plan_time / plans if plans else 0.0,
        "imagined_frames_per_plan": imagined_frames / plans if plans else 0.0,
    }
    if video:
        out["_video"] = (np.stack(real_video), np.stack(model_video))
    return out


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """Success rate and its Wilson score interval."""
    from statistics import NormalDist

    if n == 0:
        return math.nan, math.nan, math.nan
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def run_plan(cfg: PlanConfig, wm=None, progress: bool = True) -> dict[str, Any]:
    """Run the arms over the episodes; writes per-episode results, report.json/md, plots, videos."""
    from selfflow_world.envs import make
    from selfflow_world.heads import missing_heads_message
    from selfflow_world.runtime import resolve_device
    from selfflow_world.video import label, to_float, write_video
    from selfflow_world.world_model import WorldModel

    cfg.check()
    if wm is None:
        wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device))
    trained_env = wm.meta.get("env")
    env_name = cfg.env or trained_env
    if env_name is None:
        raise UserError("env= is required: the checkpoint does not say which env it was trained on")
    if trained_env and env_name != trained_env:
        warnings.warn(f"planning in {env_name} with a model trained on {trained_env}", stacklevel=2)
    score = cfg.resolved_score(env_name)
    if cfg.near_planner is not None and cfg.near_planner != "auto" and score != "target":
        raise UserError(
            f"near_planner switches planners by the probed distance to the target: it needs task=reward "
            f"with score=target (in {'|'.join(TARGET_VECTORS)}), got task={cfg.task} score={score}"
        )
    cfg = replace(cfg, near_planner=cfg.resolved_near_planner(score))
    if score == "reward" and wm.heads is None:
        raise UserError(missing_heads_message(cfg.ckpt))
    render = wm.meta.get("render", {})
    size = wm.config.image_size
    env = make(env_name, size=size, camera=render.get("camera"), action_repeat=render.get("action_repeat"))
    sim_env = make(
        env_name, size=size, camera=render.get("camera"), action_repeat=render.get("action_repeat")
    )
    if env.action_space.shape != (wm.config.action_dim,):
        raise UserError(
            f"{env_name} has {env.action_space.shape[0]} action dimensions, the model {wm.config.action_dim}"
        )
    if cfg.task == "goal":
        joint_distance(env_name, np.zeros(env.state_size), np.zeros(env.state_size))  # env supported?
    out = Path(cfg.out)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    history = wm.history
    probe = probe_report = None
    if score in PROBE_FILES and set(cfg.arms) != {"random"}:
        probe, probe_report = plan_probe(cfg, wm, env, out, score)
    gen = torch.Generator(wm.device).manual_seed(cfg.seed)
    results: dict[str, list[dict]] = {arm: [] for arm in cfg.arms}
    starts = _starts(cfg, env, history)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.episodes * len(cfg.arms), desc=f"plan {cfg.task}", unit="episode")
    videos = []
    for number, start in enumerate(starts):
        for arm in cfg.arms:
            path = out / "episodes" / f"{arm}_{number:04d}.json"
            if arm == "simulator" and cfg.baseline_episodes is not None and number >= cfg.baseline_episodes:
                if bar:
                    bar.update()
                continue
            want_video = arm == "model" and number < cfg.videos
            if cfg.resume and path.is_file() and not want_video:
                results[arm].append(json.loads(path.read_text()))
                if bar:
                    bar.update()
                continue
            goal = distance = stop = None
            if score == "target":
                distance = TargetDistance(probe)
            if cfg.task == "goal":
                stop = lambda s, g=start.goal: reached(env_name, s, g, cfg.tolerance)  # noqa: E731
            if cfg.task == "goal" and arm != "random":
                goal_frame = to_float(start.goal_frame[None])[0]
                if score == "features":
                    goal = wm.clip_features(to_float(np.stack([start.goal_frame] * (history + 1))[None]))[0]
                elif score == "pixels":
                    distance = PixelDistance(goal_frame, cfg.pixel_blur)
                else:
                    distance = ProbeDistance(probe, goal_frame)
                    if cfg.pixel_weight > 0:
                        pixels = PixelDistance(goal_frame, cfg.pixel_blur)
                        distance = SumDistance([(1.0, distance), (cfg.pixel_weight, pixels)])
            scorer = None  # random actions need none
            if arm == "model":
                scorer = ModelScorer(wm, score, cfg.sampler_steps, gen, goal, distance, cfg.common_noise)
            elif arm == "simulator":
                scorer = SimulatorScorer(sim_env, wm, score, goal, distance)
            steps = cfg.budget if cfg.task == "goal" else cfg.reward_steps or 10**9
            res = control(
                cfg,
                env,
                wm,
                arm,
                scorer,
                start.context,
                start.context_actions,
                start.start,
                start.env_seed,
                steps,
                stop=stop,
                video=want_video,
            )
            if cfg.task == "goal":
                res["final_joint_distance"] = joint_distance(
                    env_name, env.get_physics_state(), start.goal
                ).tolist()
            else:
                res["return"] += start.reward_before
            res.update(episode=number, env_seed=start.env_seed, arm=arm)
            if "_video" in res:
                real, imagined = res.pop("_video")
                panels = [label(real, "real"), label(imagined, "imagined")]
                if cfg.task == "goal":
                    panels.append(label(np.broadcast_to(start.goal_frame, real.shape).copy(), "goal"))
                grid = np.concatenate(panels, axis=2).repeat(2, 1).repeat(2, 2)
                videos += [str(f) for f in write_video(out / f"episode_{number:04d}", grid, fps=8)]
            path.write_text(json.dumps(res, indent=2))
            results[arm].append(res)
            if bar:
                bar.update()
                bar.set_postfix_str(_postfix(cfg, results))
    if bar:
        bar.close()
    env.close()
    sim_env.close()
    report = summarise(cfg, results, env_name)
    if probe_report is not None:
        report["state_probe"] = probe_report
    report["videos"] = videos
    report["plots"] = write_plan_plots(report, out)
    report["summary_text"] = plan_summary(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(plan_markdown(report))
    return report


@dataclass
class _Start:
    env_seed: int
    context: np.ndarray
    context_actions: np.ndarray
    start: np.ndarray
    reward_before: float = 0.0


def _starts(cfg: PlanConfig, env, history: int):
    """The episodes' starts: goal-protocol starts, or env resets followed by ``history - 1``
    zero-action steps (the model's context) for the reward task."""
    if cfg.task == "goal":
        yield from goal_episodes(env, cfg, history, cfg.episodes)
        return
    from selfflow_world.envs.collect import episode_seeds

    zero = ((env.action_space.low + env.action_space.high) / 2).astype(np.float32)
    for index in range(cfg.episodes):
        env_seed, _ = episode_seeds(cfg.seed + 7919, index)
        obs, _ = env.reset(seed=env_seed)
        frames, acts, total = [obs], [zero], 0.0  # the reset frame: the normalised zero, as in training
        for _ in range(history - 1):
            obs, reward, *_ = env.step(zero)
            frames.append(obs)
            acts.append(zero)
            total += reward
        yield _Start(env_seed, np.stack(frames), np.stack(acts), env.get_physics_state(), total)


def _postfix(cfg: PlanConfig, results: dict[str, list[dict]]) -> str:
    parts = []
    for arm, rows in results.items():
        if not rows:
            continue
        if cfg.task == "goal":
            parts.append(f"{arm} {sum(r['reached'] for r in rows)}/{len(rows)}")
        else:
            parts.append(f"{arm} {np.mean([r['return'] for r in rows]):.0f}")
    return ", ".join(parts)


def summarise(cfg: PlanConfig, results: dict[str, list[dict]], env_name: str) -> dict[str, Any]:
    """Per arm: success rate with a Wilson interval (goal) or mean return with a t interval
    (reward), steps, planning time."""
    from selfflow_world.metrics import mean_ci

    arms = {}
    for arm, rows in results.items():
        if not rows:
            continue
        entry: dict[str, Any] = {"episodes": len(rows)}
        if cfg.task == "goal":
            hits = sum(r["reached"] for r in rows)
            rate, lo, hi = proportion_ci(hits, len(rows))
            entry.update(
                success=rate,
                success_low=lo,
                success_high=hi,
                successes=hits,
                steps_to_goal=float(np.mean([r["steps"] for r in rows if r["reached"]])) if hits else None,
            )
        else:
            mean, lo, hi = mean_ci([r["return"] for r in rows])
            entry.update(return_mean=mean, return_low=lo, return_high=hi)
            firsts = [r.get("first_reward_step") for r in rows if r.get("first_reward_step") is not None]
            held = [
                r["reward_per_step_after_first"]
                for r in rows
                if r.get("reward_per_step_after_first") is not None
            ]
            entry.update(
                first_reward_step=float(np.mean(firsts)) if firsts else None,
                reward_per_step_after_first=float(np.mean(held)) if held else None,
            )
        if arm != "random" and cfg.near_planner is not None:
            plans = sum(r["plans"] for r in rows)
            entry["near_plan_share"] = sum(r.get("near_plans", 0) for r in rows) / plans if plans else 0.0
        if arm != "random":
            entry["seconds_per_plan"] = float(np.mean([r["seconds_per_plan"] for r in rows]))
            entry["imagined_frames_per_plan"] = float(np.mean([r["imagined_frames_per_plan"] for r in rows]))
        arms[arm] = entry
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "resume", "device")}
    score = cfg.resolved_score(env_name)
    if score == "pixels" and list(cfg.pixel_blur) != [0]:
        score += f" blurred by {list(cfg.pixel_blur)}"
    if score == "state" and cfg.pixel_weight > 0:
        score += f" + {cfg.pixel_weight:g} x pixels"
    return {
        "env": env_name,
        "task": cfg.task,
        "score": score,
        "settings": settings,
        "arms": arms,
    }


def _interval(entry: dict) -> str:
    """The return's 95 % interval as text ("n/a" from one episode, which gives none)."""
    low, high = entry["return_low"], entry["return_high"]
    return "[n/a]" if math.isnan(low) or math.isnan(high) else f"[{low:.1f}, {high:.1f}]"


def _planner_label(settings: dict) -> str:
    """``cem``, or ``cem, mppi within 0.05 of the target`` when a different near planner is set."""
    near = settings.get("near_planner")
    if near is None or near == settings["planner"]:
        return settings["planner"]
    return f"{settings['planner']}, {near} within {settings['near_distance']:g} of the target"


def plan_summary(report: dict) -> str:
    lines = [
        f"{report['task']} planning in {report['env']} ({_planner_label(report['settings'])}, score {report['score']}):"
    ]
    for arm, e in report["arms"].items():
        if report["task"] == "goal":
            text = f"success {e['success']:.0%} [{e['success_low']:.0%}, {e['success_high']:.0%}] ({e['successes']}/{e['episodes']})"
        else:
            text = f"return {e['return_mean']:.1f} {_interval(e)} over {e['episodes']}"
        if "seconds_per_plan" in e:
            text += f", {e['seconds_per_plan']:.2f} s per plan"
        if "near_plan_share" in e:
            text += f", {e['near_plan_share']:.0%} of plans near the target"
        lines.append(f"  {arm:<10} {text}")
    return "\n".join(lines)


def plan_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# Planning report: {report['task']} in {report['env']}",
        "",
        f"Planner {_planner_label(s)}, score {report['score']}, horizon {s['horizon']}, population {s['population']}, "
        f"iterations {s['iterations']}, {s['execute']} action(s) per plan, {s['sampler_steps']} sampler step(s), seed {s['seed']}.",
        "",
    ]
    if report["task"] == "goal":
        lines += [
            f"Goal {s['goal_offset']} agent steps ahead, tolerance {s['tolerance']} rad, budget {s['budget']} steps.",
            "",
            "| arm | episodes | success | 95% CI | s per plan | imagined frames per plan |",
            "|---|---|---|---|---|---|",
        ]
        for arm, e in report["arms"].items():
            lines.append(
                f"| {arm} | {e['episodes']} | {e['success']:.1%} | [{e['success_low']:.1%}, {e['success_high']:.1%}] | "
                f"{e.get('seconds_per_plan', float('nan')):.2f} | {e.get('imagined_frames_per_plan', float('nan')):.0f} |"
            )
    else:
        lines += [
            "| arm | episodes | return | 95% CI | first reward (agent step) | reward per step after it | s per plan | imagined frames per plan |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def maybe(value, digits: int) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        for arm, e in report["arms"].items():
            lines.append(
                f"| {arm} | {e['episodes']} | {e['return_mean']:.1f} | {_interval(e)} | "
                f"{maybe(e.get('first_reward_step'), 0)} | {maybe(e.get('reward_per_step_after_first'), 2)} | "
                f"{e.get('seconds_per_plan', float('nan')):.2f} | {e.get('imagined_frames_per_plan', float('nan')):.0f} |"
            )
        near = [
            f"{arm} {e['near_plan_share']:.0%}" for arm, e in report["arms"].items() if "near_plan_share" in e
        ]
        if near:
            lines += ["", f"Plans made near the target (with {s['near_planner']}): {', '.join(near)}."]
    if "state_probe" in report:
        sp = report["state_probe"]
        rmse = ", ".join(f"{v:.3f}" for v in sp["floor_rmse"])
        lines += [
            "",
            f"Probe (score {sp.get('score', 'state')}{', shipped with the model' if sp.get('shipped_with_model') else ''}): "
            f"fitted on the real frames of {sp['data']}"
            f"{' and the imagined frames of ' + str(sp['imagined_clips']) + ' clips' if sp.get('imagined_clips') else ''}, "
            f"reading {sp['state_dims']}; its held-out RMSE per dim on real frames: {rmse}.",
        ]
    lines += ["", "Files: " + ", ".join(report.get("videos", []) + report.get("plots", []))]
    return "\n".join(lines) + "\n"


def write_plan_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    if not arms:
        return []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    key = "success" if report["task"] == "goal" else "return_mean"
    low_key, high_key = ("success_low", "success_high") if key == "success" else ("return_low", "return_high")
    vals, err = [], [[], []]
    for arm in arms:
        entry = report["arms"][arm]
        vals.append(entry[key])
        for side, bound in enumerate((entry[low_key], entry[high_key])):
            err[side].append(0.0 if math.isnan(bound) else abs(bound - entry[key]))
    if key == "success":
        ax.set_ylabel("success rate")
        ax.set_ylim(0, 1)
    else:
        ax.set_ylabel("episode return")
    ax.bar(arms, vals, yerr=err, capsize=4, color=["tab:blue", "tab:gray", "tab:green"][: len(arms)])
    ax.set_title(f"{report['task']} in {report['env']}\nscore {report['score']} (95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "arms.png", dpi=120)
    plt.close(fig)
    return ["arms.png"]
