"""``sfw eval``: how consistent imagined video stays with the simulator, measured offline.

For validation episodes, the model imagines ``horizon`` frames from the recorded context under the
recorded actions, and again under shuffled actions (another episode's). Reported, with confidence
intervals over episodes and next to two baselines ("copy the last context frame" and an untrained
model of the same config):

- per-horizon PSNR and SSIM against the recorded frames;
- with ``replay``: the simulator is restored to the recorded physics state and replays the shuffled
  actions, so imagination under *any* actions is scored against its own ground truth;
- state error per horizon from a probe trained on real frames only, relative to the probe's own
  held-out error on real frames (the floor), and a Frechet distance between probed and true
  transitions ``(s_t, s_{t+1} - s_t)``;
- controllability gap: error against the recorded frames with shuffled vs true actions (a model
  that ignores actions has no gap);
- representation quality: held-out linear-probe R^2 of (qpos, qvel) from the model's features at
  ``t = 0``, per block, next to the same for the untrained model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfflow_world.errors import UserError
from selfflow_world.imagine import RolloutSettings
from selfflow_world.runtime import autocast, resolve_device
from selfflow_world.video import to_float


@dataclass
class EvalConfig(RolloutSettings):
    """Settings of ``sfw eval`` (documented in configs/eval.yaml)."""

    split: str = "val"
    probe_data: str = ""  # dataset whose real frames train the state probe ("": data)
    replay: bool = True
    probe_frames: int = 4000
    probe_epochs: int = 15
    level: float = 0.95
    ridge: float = 1.0
    representation: bool = True  # the linear probe of the physics state from the model's features
    context: int | None = None  # recorded frames each rollout starts from (None: the model's history)
    per_episode: int = 1  # rollouts per episode, from consecutive non-overlapping segments


def _curve(per_episode: torch.Tensor, level: float) -> dict[str, list[float]]:
    """(B, T) -> mean and CI per horizon."""
    from selfflow_world.metrics import mean_ci

    rows = [mean_ci(per_episode[:, j], level) for j in range(per_episode.shape[1])]
    return {"mean": [r[0] for r in rows], "low": [r[1] for r in rows], "high": [r[2] for r in rows]}


def _summary(per_episode: torch.Tensor, level: float) -> dict[str, float]:
    from selfflow_world.metrics import mean_ci

    mean, low, high = mean_ci(per_episode.float().mean(1), level)
    return {"mean": mean, "low": low, "high": high}


def replay(env, infos, start_states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the simulator does when ``actions`` (B, T, A) are applied from ``start_states`` (B, S),
    each restored after a reset with its episode's seed: uint8 frames (B, T, h, w, 3) and the
    physics state after each step (B, T, S). An episode that terminates holds its last frame."""
    frames_out, states_out = [], []
    for b, info in enumerate(infos):
        env.restore(start_states[b], seed=info.meta["env_seed"])
        frames, states = [], []
        for a in actions[b]:
            obs, _, term, _, _ = env.step(a)
            frames.append(obs)
            states.append(env.get_physics_state())
            if term:
                break
        frames += [frames[-1]] * (len(actions[b]) - len(frames))
        states += [states[-1]] * (len(actions[b]) - len(states))
        frames_out.append(np.stack(frames))
        states_out.append(np.stack(states))
    return np.stack(frames_out), np.stack(states_out)


def alternative_actions(
    actual: np.ndarray, low: np.ndarray, high: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """The counterfactual action sequences of the evaluation, each (B, T, A) in env units:
    ``other_episode`` (every rollout gets another rollout's recorded actions, a derangement),
    ``uniform`` (uniform within the bounds) and ``zero`` (the middle of the bounds: zero torque
    for the usual symmetric bounds)."""
    from selfflow_world.metrics import shuffle_actions

    shuffled = shuffle_actions(torch.from_numpy(actual), torch.Generator().manual_seed(seed)).numpy()
    rng = np.random.default_rng(seed + 1)
    uniform = rng.uniform(low, high, size=actual.shape).astype(np.float32)
    zero = np.broadcast_to(((low + high) / 2).astype(np.float32), actual.shape).copy()
    return {"other_episode": shuffled, "uniform": uniform, "zero": zero}


def one_step_inputs(wm, ctx: np.ndarray, ctx_act: np.ndarray, actions: np.ndarray, seed: int):
    """What a one-step prediction after each rollout's context takes, on ``wm``'s device: the context
    frames in [-1, 1], its normalised actions, the normalised first future action and noise drawn
    from ``seed``."""
    context = to_float(ctx).to(wm.device)
    ctx_a = wm.normalize_actions(torch.from_numpy(ctx_act).to(wm.device))
    action = wm.normalize_actions(torch.from_numpy(actions[:, 0]).to(wm.device))
    gen = torch.Generator(wm.device).manual_seed(seed)
    noise = torch.randn(context[:, 0].shape, generator=gen, device=wm.device)
    return context, ctx_a, action, noise


@torch.no_grad()
def motion_use(wm, ctx: np.ndarray, ctx_act: np.ndarray, actions: np.ndarray, real: np.ndarray, seed: int):
    """Does the model use the motion in its history, beyond the last frame? One-step clean-frame
    prediction from pure noise (``t = 1``) with the rollout's own context vs a still context (every
    context frame replaced by the last one: the same picture, no motion), same noise and action.

    ``ratio`` = mean |change of the prediction| / mean |true frame change| (last context frame to
    the next frame). Copying the last frame scores exactly 0, as does any predictor that only looks
    at the last frame; NaN with a one-frame context (nothing to replace).
    """
    from selfflow_world.action_following import one_step_prediction

    model = wm.model
    context, ctx_a, action, noise = one_step_inputs(wm, ctx, ctx_act, actions, seed)
    nxt = to_float(real[:, 0]).to(wm.device)
    truth = float((nxt - context[:, -1]).abs().mean())
    if context.shape[1] < 2:
        return {"mean_abs_change": float("nan"), "true_frame_change": truth, "ratio": float("nan")}
    still = context[:, -1:].expand_as(context).contiguous()
    with autocast(wm.device, wm.bf16 and not wm.bf16_weights):
        own = one_step_prediction(model, context, ctx_a, action, noise)
        frozen = one_step_prediction(model, still, ctx_a, action, noise)
    change = float((own - frozen).abs().mean())
    return {
        "mean_abs_change": change,
        "true_frame_change": truth,
        "ratio": change / truth if truth > 0 else float("nan"),
    }


@dataclass
class StateMap:
    """Physics state vector -> what a probe can see: qpos (with each unlimited hinge angle as its
    sine and cosine, since an angle that has wound past +-pi looks the same) and qvel."""

    nq: int
    nv: int
    wrapped: list[int]
    velocities: bool = True  # False: qpos only (what one frame shows; the planner's state score)

    def __call__(self, states) -> torch.Tensor:
        """``(..., state_size)`` full physics states -> ``(..., dim)`` float32."""
        if isinstance(states, torch.Tensor):
            s = states.double()
        else:
            s = torch.from_numpy(np.array(states, dtype=np.float64))  # a copy: states may be a read-only mmap
        qpos, qvel = s[..., 1 : 1 + self.nq], s[..., self.qvel]  # [0] is time
        keep = [i for i in range(self.nq) if i not in self.wrapped]
        angles = qpos[..., self.wrapped]
        parts = [qpos[..., keep], angles.sin(), angles.cos()] + ([qvel] if self.velocities else [])
        return torch.cat(parts, -1).float()

    @property
    def qvel(self) -> slice:
        """Where the joint velocities sit in a full physics state."""
        return slice(1 + self.nq, 1 + self.nq + self.nv)

    def at_rest(self, states: np.ndarray) -> np.ndarray:
        """A copy of ``(..., state_size)`` physics states with every joint velocity zeroed."""
        out = np.array(states, copy=True)
        out[..., self.qvel] = 0.0
        return out

    def episode_labels(self, info, arrays) -> torch.Tensor:
        """What the probe reads off each frame of one recorded episode, ``(T+1, dim)``."""
        return self(arrays["states"])

    @property
    def description(self) -> str:
        text = f"qpos ({self.nq - len(self.wrapped)} raw, {len(self.wrapped)} unlimited hinge angles as sin and cos)"
        return text + (f" + qvel ({self.nv})" if self.velocities else "")


def simulator_motion_use(
    env,
    infos,
    state_map: StateMap,
    start_states: np.ndarray,
    actions: np.ndarray,
    nxt: np.ndarray,
    ctx: np.ndarray,
):
    """The simulator's own motion use, the reference for :func:`motion_use`'s ratio: restored at
    rest in each rollout's last context pose (every joint velocity zeroed) and stepped with the
    same first action, how far its next frame moves from the one it reaches with the real motion
    (``nxt``, the replayed first frames), over the same true frame change. A model that reads
    motion from its history as the simulator uses velocity scores about this."""
    still, _ = replay(env, infos, state_map.at_rest(start_states), actions[:, :1])
    real_next, last = to_float(nxt[:, 0]), to_float(ctx[:, -1])
    truth = float((real_next - last).abs().mean())
    change = float((to_float(still[:, 0]) - real_next).abs().mean())
    return {"simulator_ratio": change / truth if truth > 0 else float("nan")}


@dataclass
class ObservationMap:
    """Recorded episode -> chosen entries of the task's own observation vector at every frame
    (e.g. reacher's finger-to-target vector, which depends on the target the episode's seed placed):
    each recorded physics state is restored in ``env`` after a reset with the episode's env seed.
    The labels of an episode are computed once and kept."""

    env: Any
    dims: list[int]
    name: str
    _cache: dict = field(default_factory=dict, repr=False)

    def episode_labels(self, info, arrays) -> torch.Tensor:
        key = str(info.path)
        if key not in self._cache:
            seed = info.meta.get("env_seed")
            if seed is None:
                raise UserError(
                    f"{info.path} records no env_seed, so its task observation cannot be restored"
                )
            states = np.asarray(arrays["states"], np.float64)
            self.env.restore(states[0], seed=int(seed), render=False)
            rows = []
            for state in states:
                self.env.set_physics_state(state, render=False)
                rows.append(self.env.native_obs()[self.dims])
            self._cache[key] = torch.from_numpy(np.stack(rows).astype(np.float32))
        return self._cache[key]

    @property
    def description(self) -> str:
        return self.name


def _probe_data(dataset, limit: int, state_map, generator: np.random.Generator):
    """Up to ``limit`` (frame, label) pairs from a split, uint8 (N, 3, h, w) and float (N, S);
    ``state_map`` (:class:`StateMap` or :class:`ObservationMap`) labels each episode's frames."""
    from selfflow_world.episodes import load_episode

    frames, states = [], []
    for info in dataset.episodes:
        arr = load_episode(info.path)
        frames.append(np.asarray(arr["frames"]))
        states.append(state_map.episode_labels(info, arr).numpy())
    frames, states = np.concatenate(frames), np.concatenate(states)
    if len(frames) > limit:
        pick = np.sort(generator.choice(len(frames), limit, replace=False))
        frames, states = frames[pick], states[pick]
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(states).float()


def probe_splits(wm, root: str):
    """The training and validation episodes of the dataset ``root`` under ``wm``'s split, as clip
    datasets (the state probe and the representation probe read their frames and states)."""
    from selfflow_world.clips import ClipDataset, ClipSpec

    spec = ClipSpec(
        history=wm.history,
        future=1,
        val_fraction=wm.meta["config"].get("val_fraction", 0.1),
        split_seed=wm.meta["config"].get("seed", 0),
    )
    return ClipDataset(root, spec, "train"), ClipDataset(root, spec, "val")


@torch.no_grad()
def imagined_probe_data(
    wm, dataset, clips: int, horizon: int, state_map: StateMap, seed: int, steps: int = 1
):
    """Frames the model imagines from ``clips`` clips of ``dataset`` under their recorded actions,
    ``horizon`` steps each (``steps`` sampler steps per frame), paired with the recorded states they
    stand for: uint8 ``(N, 3, h, w)`` and float ``(N, S)``, ``N = clips * horizon`` (fewer if the dataset holds fewer clips).

    A probe fitted on real frames only misreads imagined ones, which are blurrier; with these among
    its training frames it learns what an imagined frame says about the state."""
    from selfflow_world.clips import ClipDataset, ClipSpec
    from selfflow_world.episodes import load_episode

    spec = ClipSpec(
        history=wm.history,
        future=horizon,
        val_fraction=dataset.spec.val_fraction,
        split_seed=dataset.spec.split_seed,
    )
    source = ClipDataset(dataset.root, spec, "train")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(source), min(clips, len(source)), replace=False))
    gen = torch.Generator(wm.device).manual_seed(seed)
    by_index = {info.index: info for info in source.episodes}
    labels: dict[int, torch.Tensor] = {}  # per episode, read once however many clips it gives

    def episode_labels(index: int) -> torch.Tensor:
        if index not in labels:
            info = by_index[index]
            labels[index] = state_map.episode_labels(info, load_episode(info.path, mmap=True))
        return labels[index]

    frames, states, h = [], [], wm.history
    for chunk in np.array_split(pick, max(1, math.ceil(len(pick) / 64))):
        items = [source[int(i)] for i in chunk]
        clip = torch.stack([it["frames"] for it in items]).float() / 127.5 - 1.0  # (B, T, 3, h, w)
        acts = source.denormalize_actions(torch.stack([it["actions"] for it in items]).numpy())
        imagined = wm.imagine(
            clip[:, :h], acts[:, h:], context_actions=acts[:, :h], generator=gen, steps=steps
        )
        frames.append(((imagined.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).flatten(0, 1))
        for it in items:
            first = int(it["start"]) + h
            states.append(episode_labels(int(it["episode"]))[first : first + horizon])
    return torch.cat(frames), torch.cat(states)


def train_state_probe(
    train_set, val_set, state_map: StateMap, frames: int, epochs: int, seed: int, extra=None
):
    """A :class:`~selfflow_world.probe.StateProbe` fitted on up to ``frames`` real frames of
    ``train_set``'s episodes (plus ``extra``, a pair of uint8 frames and states such as
    :func:`imagined_probe_data` makes), with its held-out error on ``val_set``'s real frames (the
    floor). Returns ``(probe, metrics)``; deterministic in ``seed``."""
    from selfflow_world.probe import fit_probe

    rng = np.random.default_rng(seed)
    tr_frames, tr_states = _probe_data(train_set, frames, state_map, rng)
    va_frames, va_states = _probe_data(val_set, frames, state_map, rng)
    if extra is not None:
        tr_frames, tr_states = torch.cat([tr_frames, extra[0]]), torch.cat([tr_states, extra[1]])
    return fit_probe(
        tr_frames,
        tr_states,
        val_frames=va_frames,
        val_states=va_states,
        epochs=epochs,
        generator=torch.Generator().manual_seed(seed),
    )


def _clip_features(wm, dataset, limit: int, state_map: StateMap, generator: np.random.Generator):
    """Model features at t = 0 per block and the physics state of each clip's last frame."""
    n = min(limit, len(dataset))
    pick = np.sort(generator.choice(len(dataset), n, replace=False)) if len(dataset) > n else np.arange(n)
    feats: dict[int, list[torch.Tensor]] = {}
    states = []
    for chunk in np.array_split(pick, max(1, math.ceil(n / 64))):
        items = [dataset[int(i)] for i in chunk]
        frames = torch.stack([it["frames"] for it in items]).float() / 127.5 - 1.0
        actions = torch.stack([it["actions"] for it in items])
        for layer, f in wm.features(frames, actions).items():
            feats.setdefault(layer, []).append(f.cpu())
        states.append(state_map(torch.stack([it["states"][-1] for it in items])))
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(states)


def run_eval(cfg: EvalConfig, wm=None) -> dict:
    """Compute the report, write report.json, report.md and plots into ``cfg.out``; return the report."""
    from selfflow_world.action_following import following_ratio
    from selfflow_world.envs import make_like
    from selfflow_world.episodes import read_manifest
    from selfflow_world.imagine import load_segments
    from selfflow_world.metrics import (
        controllability_gap,
        frechet_distance,
        linear_probe_r2,
        psnr_per_horizon,
        ssim_per_horizon,
    )
    from selfflow_world.probe import probe_error
    from selfflow_world.world_model import WorldModel

    cfg.check("eval", positive=("probe_frames", "probe_epochs"))
    if cfg.split not in ("train", "val", "all"):
        raise UserError(f"split must be train, val or all, got {cfg.split!r}")
    if not 0 < cfg.level < 1:
        raise UserError(f"level must be in (0, 1), got {cfg.level}")
    if wm is None:  # a caller that already loaded the model (sfw demo) passes it
        wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device), compile=cfg.compile)
    if cfg.steps is None:  # the model's own default, recorded in the report
        cfg = replace(cfg, steps=wm.sampler_steps)
    # the baseline imagines one batch of rollouts: compiling it would cost more than it saves
    untrained = WorldModel.untrained(wm, seed=cfg.seed, compile=False)
    hist = wm.history if cfg.context is None else cfg.context
    window = wm.config.max_frames - 1
    if isinstance(hist, bool) or not isinstance(hist, int) or not 1 <= hist <= window:
        raise UserError(
            f"context must be a whole number of frames from 1 to {window} (the model's window), or null "
            f"for its trained history ({wm.history}); got {cfg.context!r}"
        )
    if isinstance(cfg.per_episode, bool) or not isinstance(cfg.per_episode, int) or cfg.per_episode < 1:
        raise UserError(
            f"per_episode must be a whole number of rollouts per episode, 1 or more; got {cfg.per_episode!r}"
        )
    # per_episode rollouts from each of the first `episodes` episodes (frames 0, H + T, 2 (H + T), ...);
    # a split with fewer than 2 rollouts falls back to all episodes, then to up to 8 segments per
    # episode (recorded in the report)
    count = cfg.episodes * cfg.per_episode
    seg = load_segments(
        wm, cfg.data, cfg.split, count, hist, cfg.horizon, per_episode=cfg.per_episode, min_rows=2
    )
    if len(seg.infos) < 2:
        seg = load_segments(
            wm, cfg.data, cfg.split, cfg.episodes, hist, cfg.horizon, per_episode=8, min_rows=2
        )
    if len(seg.infos) < 2:
        raise UserError(
            f"eval needs at least 2 rollouts of {hist}+1 frames in {cfg.data}, found {len(seg.infos)}"
        )
    ctx, ctx_act, fut_act, real, infos = seg.context, seg.context_actions, seg.actions, seg.real, seg.infos
    manifest = read_manifest(Path(cfg.data))
    horizon = real.shape[1]

    def imagine(model, actions):
        return cfg.imagine(model, ctx, actions, ctx_act)  # same noise for every variant

    low = np.asarray(manifest["action_low"], np.float32)
    high = np.asarray(manifest["action_high"], np.float32)
    alternatives = alternative_actions(fut_act, low, high, cfg.seed)
    predicted_rewards = None
    if wm.heads is not None:  # the same frames as imagine(), with the heads' rewards along them
        model_video, predicted_rewards = cfg.imagine_rewards(wm, ctx, fut_act, ctx_act)
    else:
        model_video = imagine(wm, fut_act)
    videos = {
        "model": model_video,
        "copy_last": np.repeat(ctx[:, -1:], horizon, axis=1),
        "untrained": imagine(untrained, fut_act),
    }
    alt_videos = {name: imagine(wm, acts) for name, acts in alternatives.items()}
    real_t = to_float(real)  # float (B, T, 3, h, w), converted once like every video below
    videos_t = {k: to_float(v) for k, v in videos.items()}
    alt_t = {k: to_float(v) for k, v in alt_videos.items()}
    shuffled_t = alt_t["other_episode"]
    report: dict = {
        "checkpoint": str(cfg.ckpt),
        "step": wm.meta.get("step"),
        "env": manifest["env"],
        "config": asdict(cfg),
        "episodes": [i.index for i in infos],
        "segment_starts": seg.starts,
        "split": seg.split,
        "horizon": horizon,
        "context_frames": hist,
        "level": cfg.level,
    }
    report["history_use"] = motion_use(wm, ctx, ctx_act, fut_act, real, cfg.seed)
    if predicted_rewards is not None:
        report["heads"] = heads_report(wm, cfg, predicted_rewards, seg.rewards)
    psnr_all = {k: psnr_per_horizon(real_t, v) for k, v in videos_t.items()}
    ssim_all = {k: ssim_per_horizon(real_t, v) for k, v in videos_t.items()}
    report["psnr"] = {
        k: {"per_horizon": _curve(v, cfg.level), "overall": _summary(v, cfg.level)}
        for k, v in psnr_all.items()
    }
    report["ssim"] = {
        k: {"per_horizon": _curve(v, cfg.level), "overall": _summary(v, cfg.level)}
        for k, v in ssim_all.items()
    }
    # paired: the same rollouts under both predictors, so the CI of the difference is much tighter
    # than comparing the two separate intervals
    gain = psnr_all["model"] - psnr_all["copy_last"]
    report["psnr_gain_over_copy_last"] = {
        "per_horizon": _curve(gain, cfg.level),
        "overall": _summary(gain, cfg.level),
    }

    # controllability: error against the recorded frames, true vs shuffled actions
    mse_true = (videos_t["model"] - real_t).pow(2).flatten(2).mean(2)
    mse_shuf = (shuffled_t - real_t).pow(2).flatten(2).mean(2)
    report["controllability"] = controllability_gap(mse_true, mse_shuf, cfg.level)
    report["controllability"]["metric"] = "per-frame MSE in [-1, 1] units against recorded frames"

    env = make_like(manifest)
    sim_alt: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        state_map = StateMap(env.nq, env.nv, env.wrapped_qpos())
        if cfg.replay:
            start_states = seg.states[:, hist - 1]  # the last context frame of each rollout
            sim_alt = {name: replay(env, infos, start_states, acts) for name, acts in alternatives.items()}
            check, _ = replay(env, infos, start_states, fut_act)
            report["replay"] = {
                "psnr_shuffled_actions": {
                    "per_horizon": _curve(
                        psnr_per_horizon(to_float(sim_alt["other_episode"][0]), shuffled_t), cfg.level
                    )
                },
                "replay_matches_recording": bool(np.array_equal(check, real)),
            }
            report["history_use"].update(
                simulator_motion_use(env, infos, state_map, start_states, fut_act, check, ctx)
            )
    finally:
        env.close()

    # state probe trained on real frames only
    train_set, val_set = probe_splits(wm, cfg.probe_data or cfg.data)
    probe, probe_metrics = train_state_probe(
        train_set, val_set, state_map, cfg.probe_frames, cfg.probe_epochs, cfg.seed
    )
    floor = torch.tensor(probe_metrics["rmse"])
    true_states = state_map(seg.states[:, hist:])  # (B, T, S)
    state_report = {
        "floor_rmse": probe_metrics["rmse"],
        "floor_rmse_overall": probe_metrics["rmse_overall"],
        "state_dims": state_map.description,
    }
    probe_errors = {
        name: probe_error(probe, video, true_states) for name, video in videos_t.items()
    }  # (B, T, S)
    for name, err in probe_errors.items():
        per_dim = err.pow(2).mean(0).sqrt() / floor.clamp(min=1e-8)  # (T, S)
        state_report[name] = {
            "rmse_per_horizon": err.pow(2).mean(dim=(0, 2)).sqrt().tolist(),
            "relative_to_floor_per_horizon": per_dim.mean(-1).tolist(),
            # which state dimensions the figure above comes from: (T, S), in state_dims' order
            "relative_to_floor_per_dim": per_dim.tolist(),
        }
    real_probed = probe_error(probe, real_t, true_states) + true_states
    model_probed = probe_errors["model"] + true_states

    def transitions(s: torch.Tensor) -> torch.Tensor:  # (B, T, S) -> (B*(T-1), 2S)
        return torch.cat([s[:, :-1], s[:, 1:] - s[:, :-1]], -1).flatten(0, 1)

    if horizon >= 2:
        state_report["frechet_transitions"] = {
            "model_vs_true": frechet_distance(transitions(model_probed), transitions(true_states)),
            "real_frames_vs_true": frechet_distance(transitions(real_probed), transitions(true_states)),
            "copy_last_vs_true": frechet_distance(
                transitions(probe_errors["copy_last"] + true_states),
                transitions(true_states),
            ),
        }
    report["state_probe"] = state_report

    # counterfactuals: the model and the restored simulator under the same alternative actions
    if sim_alt:
        counterfactual: dict = {"alternatives": list(alternatives), "per_alternative": {}}
        for name, (sim_frames, sim_states) in sim_alt.items():
            sim_t = to_float(sim_frames)
            err = probe_error(probe, alt_t[name], state_map(sim_states))  # (B, T, S)
            rel = (err.pow(2).mean(0).sqrt() / floor.clamp(min=1e-8)).mean(-1)
            copy_err = probe_error(probe, videos_t["copy_last"], state_map(sim_states))
            copy_rel = (copy_err.pow(2).mean(0).sqrt() / floor.clamp(min=1e-8)).mean(-1)
            counterfactual["per_alternative"][name] = {
                "following_ratio": following_ratio(videos_t["model"], alt_t[name], real_t, sim_t, cfg.level),
                "psnr_vs_simulator": {"per_horizon": _curve(psnr_per_horizon(sim_t, alt_t[name]), cfg.level)},
                "psnr_copy_last_vs_simulator": {
                    "per_horizon": _curve(psnr_per_horizon(sim_t, videos_t["copy_last"]), cfg.level)
                },
                "state_error_relative_to_floor_per_horizon": rel.tolist(),
                "copy_last_state_error_relative_to_floor_per_horizon": copy_rel.tolist(),
            }
        # all alternatives together: one ratio per horizon over every (rollout, alternative) pair
        names = list(sim_alt)
        counterfactual["following_ratio"] = following_ratio(
            torch.cat([videos_t["model"]] * len(names)),
            torch.cat([alt_t[n] for n in names]),
            torch.cat([real_t] * len(names)),
            torch.cat([to_float(sim_alt[n][0]) for n in names]),
            cfg.level,
        )
        report["counterfactual"] = counterfactual

    # representation quality: linear probe of (qpos, qvel) from features at t = 0
    limit = min(cfg.probe_frames, 2000)
    rep = {}
    for name, model in (("model", wm), ("untrained", untrained)) if cfg.representation else ():
        f_tr, y_tr = _clip_features(model, train_set, limit, state_map, np.random.default_rng(cfg.seed))
        f_va, y_va = _clip_features(model, val_set, limit, state_map, np.random.default_rng(cfg.seed + 1))
        rep[name] = {
            str(layer): linear_probe_r2(f_tr[layer], y_tr, f_va[layer], y_va, ridge=cfg.ridge)[1]
            for layer in f_tr
        }
    if rep:
        report["representation_r2"] = rep

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, out)
    report["summary_text"] = summary_text(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(report_markdown(report))
    return report


def heads_report(wm, cfg: EvalConfig, predicted: np.ndarray, recorded: np.ndarray) -> dict:
    """Accuracy of the reward/termination heads on the evaluated episodes: along the imagined
    rollouts (predicted reward against the one recorded at the same step, per horizon) and on the
    recorded frames themselves (features of real frames, what the heads were trained on)."""
    from selfflow_world.heads import accuracy, transition_features

    mean = float(wm.heads.reward_mean)
    err = torch.from_numpy(np.abs(predicted - recorded))  # (B, T)
    base = torch.from_numpy(np.abs(mean - recorded))
    flat_p, flat_r = predicted.reshape(-1), recorded.reshape(-1)
    corr = float(np.corrcoef(flat_p, flat_r)[0, 1]) if flat_p.std() > 0 and flat_r.std() > 0 else float("nan")
    layer = wm.heads_meta.get("layer", wm.feature_layer)
    real = accuracy(wm.heads, *transition_features(wm, cfg.data, cfg.split, 2000, layer, cfg.seed), mean)
    return {
        "trained": wm.heads_meta.get("trained", "afterwards on the frozen model (sfw heads)"),
        "imagined": {
            "reward_mae_per_horizon": _curve(err, cfg.level),
            "reward_mae": _summary(err, cfg.level),
            "reward_mae_predict_mean": float(base.mean()),
            "reward_correlation": corr,
            "return_predicted": float(predicted.sum(1).mean()),
            "return_recorded": float(recorded.sum(1).mean()),
        },
        "recorded_frames": real,
    }


def _line_style(name: str) -> str:
    """Dashed for the untrained baseline: a residual model untrained is copy-last exactly, and a
    solid line on top would hide copy-last's."""
    return "--" if name == "untrained" else "-"


def write_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    steps = np.arange(1, report["horizon"] + 1)
    for metric in ("psnr", "ssim"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, data in report[metric].items():
            c = data["per_horizon"]
            ax.plot(steps, c["mean"], label=name, marker="o", ms=3, ls=_line_style(name))
            if not any(math.isnan(v) for v in c["low"]):
                ax.fill_between(steps, c["low"], c["high"], alpha=0.2)
        ax.set_xlabel("frames ahead")
        ax.set_ylabel(metric.upper() + (" (dB)" if metric == "psnr" else ""))
        ax.set_title(f"{metric.upper()} vs horizon ({report['env']}, step {report['step']})")
        ax.legend()
        fig.tight_layout()
        path = out / f"{metric}_vs_horizon.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path.name)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("model", "copy_last", "untrained"):
        ax.plot(
            steps,
            report["state_probe"][name]["relative_to_floor_per_horizon"],
            label=name,
            marker="o",
            ms=3,
            ls=_line_style(name),
        )
    ax.axhline(1.0, color="gray", ls="--", label="probe floor (real frames)")
    ax.set_xlabel("frames ahead")
    ax.set_ylabel("state RMSE / probe floor")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "state_error_vs_horizon.png", dpi=120)
    plt.close(fig)
    files.append("state_error_vs_horizon.png")
    if "counterfactual" in report:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, row in report["counterfactual"]["per_alternative"].items():
            ax.plot(steps, row["following_ratio"]["per_horizon"]["mean"], label=name, marker="o", ms=3)
        c = report["counterfactual"]["following_ratio"]["per_horizon"]
        if not any(math.isnan(v) for v in c["low"]):
            ax.fill_between(steps, c["low"], c["high"], alpha=0.2, label="all (95% CI)")
        ax.axhline(1.0, color="gray", ls="--", label="simulator")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel("frames ahead")
        ax.set_ylabel("model change / simulator change")
        ax.set_title("Following actions")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "action_following_vs_horizon.png", dpi=120)
        plt.close(fig)
        files.append("action_following_vs_horizon.png")
    if "representation_r2" not in report:
        return files
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, per_layer in report["representation_r2"].items():
        ax.plot([int(k) for k in per_layer], list(per_layer.values()), label=name, marker="o")
    ax.set_xlabel("block")
    ax.set_ylabel("linear-probe R^2 of (qpos, qvel)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "representation_r2.png", dpi=120)
    plt.close(fig)
    files.append("representation_r2.png")
    return files


def _fmt(d: dict[str, float], digits: int = 2) -> str:
    if math.isnan(d["low"]):
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


# rollouts the action-following bar is read over in BENCHMARKS.md (`sfw eval ... episodes=20`); the
# printed summary says when a report has fewer, whose intervals are wider
BAR_ROLLOUTS = 20


def bar_parts(report: dict) -> list[str]:
    """The action-following bar read off an evaluation report, one line per part, each saying met or
    missed: following ratio >= 0.5 at horizons 1 and 8 with its interval above 0; PSNR above
    copy-last at every horizon (the paired interval above 0); probed state error at 8 at most 3x
    the probe's floor, under the recorded actions and under every alternative."""
    h = report["horizon"]
    at8 = min(8, h) - 1
    parts = []
    if "counterfactual" in report:
        f = report["counterfactual"]["following_ratio"]["per_horizon"]
        ok = all(f["mean"][k] >= 0.5 and f["low"][k] > 0 for k in (0, at8))
        parts.append(
            f"following ratio >= 0.5 at 1 and {at8 + 1}: {'met' if ok else 'missed'} "
            f"({f['mean'][0]:.2f} [{f['low'][0]:.2f}, {f['high'][0]:.2f}], "
            f"{f['mean'][at8]:.2f} [{f['low'][at8]:.2f}, {f['high'][at8]:.2f}])"
        )
    g = report["psnr_gain_over_copy_last"]["per_horizon"]
    above = [k + 1 for k in range(h) if g["low"][k] > 0]
    parts.append(
        f"PSNR above copy-last at every horizon: {'met' if len(above) == h else 'missed'} (interval above 0 "
        f"at {len(above)} of {h} horizons; mean gain {g['mean'][0]:+.2f} dB @1, {g['mean'][h - 1]:+.2f} dB @{h})"
    )
    errors = {"recorded actions": report["state_probe"]["model"]["relative_to_floor_per_horizon"][at8]}
    for name, alt in report.get("counterfactual", {}).get("per_alternative", {}).items():
        errors[name.replace("_", " ")] = alt["state_error_relative_to_floor_per_horizon"][at8]
    ok = all(v <= 3 for v in errors.values())
    parts.append(
        f"state error @{at8 + 1} <= 3x floor: {'met' if ok else 'missed'} ("
        + ", ".join(f"{k} {v:.2f}x" for k, v in errors.items())
        + f"; copy-last {report['state_probe']['copy_last']['relative_to_floor_per_horizon'][at8]:.2f}x)"
    )
    return parts


def bar_markdown(report: dict) -> list[str]:
    """:func:`bar_parts` as a Markdown list (the evaluation report's and the model cards')."""
    return ["", "The action-following bar on these episodes:", "", *[f"- {p}" for p in bar_parts(report)]]


def summary_text(report: dict) -> str:
    lines = [
        f"eval of {report['checkpoint']} (step {report['step']}) on {len(report['episodes'])} rollouts "
        f"({report['split']} split) of {report['env']}, {report['horizon']} frames ahead "
        f"({int(report['level'] * 100)}% CI)"
    ]
    for name in report["psnr"]:
        lines.append(
            f"  {name:10s} PSNR {_fmt(report['psnr'][name]['overall'])} dB   "
            f"SSIM {_fmt(report['ssim'][name]['overall'], 3)}"
        )
    g = report["psnr_gain_over_copy_last"]
    lines.append(
        f"  model - copy_last PSNR (paired) {_fmt(g['overall'])} dB; better at "
        f"{sum(m > 0 for m in g['per_horizon']['mean'])} of {report['horizon']} horizons"
    )
    c = report["controllability"]
    lines.append(
        f"  controllability gap (MSE shuffled - true) {c['gap']:.4f} [{c['gap_low']:.4f}, {c['gap_high']:.4f}]"
    )
    if "counterfactual" in report:
        f = report["counterfactual"]["following_ratio"]["per_horizon"]
        picks = sorted({0, min(7, report["horizon"] - 1), report["horizon"] - 1})
        lines.append(
            "  action-following ratio (model change / simulator change under other actions; 1 = like "
            "the simulator, 0 = ignores actions): "
            + ", ".join(f"@{h + 1} {_fmt({k: f[k][h] for k in ('mean', 'low', 'high')})}" for h in picks)
        )
        e = report["counterfactual"]["following_ratio"]["effect_error_per_horizon"]
        lines.append(
            "  action effect error (0 = the simulator's change, 1 = none, > 1 = a wrong one): "
            + ", ".join(f"@{h + 1} {e[h]:.2f}" for h in picks)
        )
    s = report["state_probe"]
    lines.append(
        f"  state error / probe floor at 1 and {report['horizon']} frames: "
        f"{s['model']['relative_to_floor_per_horizon'][0]:.2f}, {s['model']['relative_to_floor_per_horizon'][-1]:.2f}"
    )
    n = len(report["episodes"])
    few = (
        f" (few rollouts give wide intervals; the bar is meant for {BAR_ROLLOUTS} or more)"
        if n < BAR_ROLLOUTS
        else ""
    )
    lines += [f"  the action-following bar on these {n} rollouts{few}:"] + [
        f"    {p}" for p in bar_parts(report)
    ]
    if "heads" in report:
        im, rf = report["heads"]["imagined"], report["heads"]["recorded_frames"]
        lines.append(
            f"  reward heads: MAE along imagined rollouts {_fmt(im['reward_mae'])} (predicting the mean "
            f"{im['reward_mae_predict_mean']:.3f}), correlation {im['reward_correlation']:.2f}; on recorded "
            f"frames {rf['reward_mae']:.3f} (mean {rf['reward_mae_predict_mean']:.3f}); termination "
            f"accuracy {rf['termination_accuracy']:.3f}"
        )
    if "representation_r2" in report:
        best = max(report["representation_r2"]["model"].items(), key=lambda kv: kv[1])
        lines.append(
            f"  representation R^2 best block {best[0]}: {best[1]:.3f} "
            f"(untrained {report['representation_r2']['untrained'][best[0]]:.3f})"
        )
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    h = report["horizon"]
    lines = [
        f"# Evaluation: {report['env']}, step {report['step']}",
        "",
        f"{len(report['episodes'])} rollouts from the {report['split']} split (episodes {report['episodes']}), "
        f"{report['context_frames']} context frames, {h} frames imagined; intervals are "
        f"{int(report['level'] * 100)}% CIs over rollouts.",
        "",
        "| predictor | PSNR (dB) | SSIM | PSNR @1 | PSNR @"
        + str(h)
        + " | state err / floor @1 | @"
        + str(h)
        + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in report["psnr"]:
        p = report["psnr"][name]
        s = report["state_probe"][name]["relative_to_floor_per_horizon"]
        lines.append(
            f"| {name} | {_fmt(p['overall'])} | {_fmt(report['ssim'][name]['overall'], 3)} | "
            f"{p['per_horizon']['mean'][0]:.2f} | {p['per_horizon']['mean'][-1]:.2f} | {s[0]:.2f} | {s[-1]:.2f} |"
        )
    g = report["psnr_gain_over_copy_last"]
    lines += [
        "",
        f"Model minus copy-last PSNR, paired over the same rollouts: {_fmt(g['overall'])} dB overall, "
        f"{g['per_horizon']['mean'][0]:.2f} at 1 frame, {g['per_horizon']['mean'][-1]:.2f} at {h} frames; "
        f"above copy-last at {sum(m > 0 for m in g['per_horizon']['mean'])} of {h} horizons.",
    ]
    c = report["controllability"]
    lines += [
        "",
        f"Controllability: MSE with true actions {c['error_true']:.4f}, with shuffled actions "
        f"{c['error_shuffled']:.4f}, gap {c['gap']:.4f} [{c['gap_low']:.4f}, {c['gap_high']:.4f}].",
    ]
    hu = report["history_use"]
    lines.append(
        f"Motion use: replacing the context by a still one (every frame the last) changes the one-step "
        f"prediction from pure noise by {hu['mean_abs_change']:.4f} (mean |diff|, [-1, 1] units) where the "
        f"true frame changes by {hu['true_frame_change']:.4f}: ratio {hu['ratio']:.2f} (copy-last scores 0"
        + (
            f"; the simulator, restored at rest in the last context pose, {hu['simulator_ratio']:.2f})."
            if "simulator_ratio" in hu
            else ")."
        )
    )
    if "replay" in report:
        r = report["replay"]
        lines.append(
            f"Replay in the simulator reproduces the recording: {r['replay_matches_recording']}; PSNR under "
            f"shuffled actions against their replayed truth: {np.mean(r['psnr_shuffled_actions']['per_horizon']['mean']):.2f} dB."
        )
    if "counterfactual" in report:
        cf = report["counterfactual"]
        picks = sorted({0, min(7, h - 1), h - 1})
        head = " / ".join(f"@{k + 1}" for k in picks)
        lines += [
            "",
            "## Following actions: the model against the simulator under alternative actions",
            "",
            "From each start the restored simulator and the model both run the recorded actions and each "
            "alternative. Action-following ratio = the model's frame change over the simulator's frame "
            "change when the actions change (1 = reacts as much as the simulator, 0 = ignores its "
            "actions); effect error = squared error of the model's change against the simulator's, "
            "over the simulator's squared change (0 = the right change, 1 = none, above 1 = a wrong one); "
            "PSNR and probed state error (over the probe floor) are against the simulator under the same "
            "alternative actions.",
            "",
            f"| actions | following ratio {head} | effect error {head} | PSNR vs simulator {head} | "
            f"copy-last PSNR {head} | state err / floor {head} | copy-last {head} |",
            "|---|---|---|---|---|---|---|",
        ]

        def cells(values: list[float], digits: int = 2) -> str:
            return " / ".join(f"{values[k]:.{digits}f}" for k in picks)

        for name, row in cf["per_alternative"].items():
            lines.append(
                f"| {name} | {cells(row['following_ratio']['per_horizon']['mean'])} | "
                f"{cells(row['following_ratio']['effect_error_per_horizon'])} | "
                f"{cells(row['psnr_vs_simulator']['per_horizon']['mean'])} | "
                f"{cells(row['psnr_copy_last_vs_simulator']['per_horizon']['mean'])} | "
                f"{cells(row['state_error_relative_to_floor_per_horizon'])} | "
                f"{cells(row['copy_last_state_error_relative_to_floor_per_horizon'])} |"
            )
        f = cf["following_ratio"]["per_horizon"]
        lines += [
            "",
            "All alternatives together, following ratio with its interval: "
            + ", ".join(
                f"{k + 1} frames {_fmt({q: f[q][k] for q in ('mean', 'low', 'high')})}" for k in picks
            )
            + ".",
        ]
    lines += bar_markdown(report)
    if "heads" in report:
        im, rf = report["heads"]["imagined"], report["heads"]["recorded_frames"]
        mae = im["reward_mae_per_horizon"]["mean"]
        picks = sorted({0, min(7, h - 1), h - 1})
        lines += [
            "",
            f"## Reward and termination heads (trained {report['heads']['trained']})",
            "",
            "| frames | reward MAE | predicting the training mean | correlation | termination accuracy |",
            "|---|---|---|---|---|",
            f"| imagined ({' / '.join(f'@{k + 1}' for k in picks)}: "
            f"{' / '.join(f'{mae[k]:.3f}' for k in picks)}) | {_fmt(im['reward_mae'], 3)} | "
            f"{im['reward_mae_predict_mean']:.3f} | {im['reward_correlation']:.2f} | |",
            f"| recorded | {rf['reward_mae']:.3f} | {rf['reward_mae_predict_mean']:.3f} | "
            f"{rf['reward_correlation']:.2f} | {rf['termination_accuracy']:.3f} |",
            "",
            f"Return over the {h} imagined frames: predicted {im['return_predicted']:.2f}, recorded "
            f"{im['return_recorded']:.2f} (mean over rollouts).",
        ]
    rep = report.get("representation_r2", {})
    if rep:
        lines += [
            "",
            "Linear-probe R^2 of (qpos, qvel) from features at t = 0, per block:",
            "",
            "| block | " + " | ".join(rep["model"]) + " |",
            "|---|" + "---|" * len(rep["model"]),
        ]
    for name, per_layer in rep.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per_layer.values()) + " |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report["plots"]), ""]
    return "\n".join(lines)
