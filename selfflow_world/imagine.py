"""``sfw imagine``: side-by-side videos of imagined vs simulator frames for recorded episodes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from selfflow_world.clips import per_frame
from selfflow_world.errors import UserError, check_positive
from selfflow_world.runtime import resolve_device


@dataclass
class RolloutSettings:
    """What ``sfw imagine`` and ``sfw eval`` share: the checkpoint, the data, and how to roll out."""

    ckpt: str = "???"
    data: str = "???"
    out: str = "???"
    horizon: int = 16
    episodes: int = 16
    steps: int | None = None  # sampler steps per frame; None: the model's own default (sampler_steps)
    method: str = "euler"
    history_level: float = 0.0
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the rollouts: compiles first (tens of s), then faster

    def check(self, command: str, positive: tuple[str, ...] = ()) -> None:
        """Clear errors for missing paths and non-positive counts."""
        for name in ("horizon", "episodes", *positive):
            check_positive(name, getattr(self, name))
        if self.steps is not None:
            check_positive("steps", self.steps)
        for name in ("ckpt", "data", "out"):
            if getattr(self, name) in ("???", "", None):
                raise UserError(f"{name}= is required (e.g. sfw {command} ckpt=RUN data=DATA out=DIR)")

    def imagine(
        self, wm, context: np.ndarray, actions: np.ndarray, context_actions: np.ndarray
    ) -> np.ndarray:
        """``wm.imagine`` with these settings and a generator seeded by ``seed`` (the same noise on
        every call, so variants of one rollout differ only in what they are given)."""
        return wm.imagine(
            context,
            actions,
            steps=self.steps,
            method=self.method,
            generator=torch.Generator(wm.device).manual_seed(self.seed),
            context_actions=context_actions,
            history_level=self.history_level,
        )

    def imagine_rewards(
        self, wm, context: np.ndarray, actions: np.ndarray, context_actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The frames of :meth:`imagine` (the same noise, so the same frames) and the rewards the
        model's heads predict on arriving at each, ``(B, T)`` float32."""
        gen = torch.Generator(wm.device).manual_seed(self.seed)
        state = wm.start(context, context_actions, history_level=self.history_level)
        frames, rewards = [], []
        for j in range(actions.shape[1]):
            out = wm.step(
                state, actions[:, j], steps=self.steps, method=self.method, generator=gen, rewards=True
            )
            frames.append(out.frames)
            rewards.append(out.reward.cpu().numpy())
        return np.stack(frames, 1), np.stack(rewards, 1).astype(np.float32)


@dataclass
class ImagineConfig(RolloutSettings):
    """Settings of ``sfw imagine`` (documented in configs/imagine.yaml)."""

    horizon: int = 32
    episodes: int = 4
    split: str = "val"
    fps: int = 8
    alternatives: bool = True  # also a video of one start under several action sequences


@dataclass
class Segments:
    """Rollouts cut from recorded episodes: uint8 context ``(B, H, h, w, 3)``, its actions ``(B, H, A)``,
    future actions ``(B, T, A)`` (env units), uint8 real future frames ``(B, T, h, w, 3)``, physics
    states of all ``H + T`` frames ``(B, H + T, S)``, and per row the episode info and the frame
    index where its context starts."""

    context: np.ndarray
    context_actions: np.ndarray
    actions: np.ndarray
    real: np.ndarray
    states: np.ndarray
    infos: list
    starts: list[int]
    split: str
    rewards: np.ndarray | None = None  # (B, T) float32: received on arriving at each real future frame


def model_clips(wm, data: str, split: str, history: int):
    """The ``split`` of dataset ``data`` cut as the model's training cut it (its validation share
    and split seed), as a :class:`~selfflow_world.clips.ClipDataset` of ``history + 1`` frame clips;
    refuses a dataset whose frames or action dimension do not match the model."""
    from selfflow_world.clips import ClipDataset, ClipSpec

    train_cfg = wm.meta.get("config", {})
    spec = ClipSpec(
        history=history,
        future=1,
        val_fraction=train_cfg.get("val_fraction", 0.1),
        split_seed=train_cfg.get("seed", 0),
    )
    dataset = ClipDataset(data, spec, split)
    size, dim = wm.config.image_size, wm.config.action_dim
    if dataset.frame_shape != (size, size, 3) or dataset.action_dim != dim:
        raise UserError(
            f"dataset {data} has frames {dataset.frame_shape} and action dim {dataset.action_dim}; the model "
            f"expects ({size}, {size}, 3) and {dim}"
        )
    return dataset


def load_segments(
    wm, data: str, split: str, count: int, history: int, horizon: int, per_episode: int = 1, min_rows: int = 1
) -> Segments:
    """Up to ``count`` rollouts of ``history + T`` frames, ``T = min(horizon, shortest fit)``.

    Takes up to ``per_episode`` non-overlapping segments from each episode of ``split``. If that gives
    fewer than ``min_rows`` rollouts, falls back to all episodes (``Segments.split`` says which).
    """
    from selfflow_world.episodes import load_episode

    dataset = model_clips(wm, data, split, history)
    infos = [i for i in dataset.episodes if i.steps + 1 > history]
    if not infos:
        raise UserError(
            f"the {split} split of {data} has no episode longer than the context ({history} frames)"
        )
    horizon = min(horizon, min(i.steps + 1 - history for i in infos))
    rows = [
        (info, k * (history + horizon))
        for info in infos
        for k in range(per_episode)
        if (k + 1) * (history + horizon) <= info.steps + 1
    ][:count]
    if len(rows) < min_rows and split != "all":
        return load_segments(wm, data, "all", count, history, horizon, per_episode, min_rows)
    ctx, ctx_act, fut_act, real, states, rewards = [], [], [], [], [], []
    for info, start in rows:
        arr = load_episode(info.path)
        ctx.append(np.asarray(arr["frames"][start : start + history]))
        real.append(np.asarray(arr["frames"][start + history : start + history + horizon]))
        acts = np.asarray(arr["actions"], np.float32)
        ctx_act.append(per_frame(acts, start, history))
        fut_act.append(acts[start + history - 1 : start + history - 1 + horizon])
        rewards.append(
            np.asarray(arr["rewards"][start + history - 1 : start + history - 1 + horizon], np.float32)
        )
        states.append(np.asarray(arr["states"][start : start + history + horizon]))
    return Segments(
        np.stack(ctx),
        np.stack(ctx_act),
        np.stack(fut_act),
        np.stack(real),
        np.stack(states),
        [r[0] for r in rows],
        [r[1] for r in rows],
        split,
        np.stack(rewards),
    )


def run_imagine(cfg: ImagineConfig, wm=None) -> list[dict]:
    """Write the videos; returns per-episode PSNR summaries."""
    from selfflow_world.metrics import psnr_per_horizon
    from selfflow_world.video import side_by_side, to_float, write_video
    from selfflow_world.world_model import WorldModel

    cfg.check("imagine", positive=("fps",))
    if wm is None:  # a caller that already loaded the model (sfw demo) passes it
        wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device), compile=cfg.compile)
    if cfg.steps is None:
        cfg = replace(cfg, steps=wm.sampler_steps)
    seg = load_segments(wm, cfg.data, cfg.split, cfg.episodes, wm.history, cfg.horizon)
    real, infos = seg.real, seg.infos
    imagined = cfg.imagine(wm, seg.context, seg.actions, seg.context_actions)
    out = Path(cfg.out)
    scores = psnr_per_horizon(to_float(real), to_float(imagined))
    summary = []
    for b, info in enumerate(infos):
        files = write_video(out / f"ep_{info.index:06d}", side_by_side(real[b], imagined[b]), fps=cfg.fps)
        summary.append(
            {
                "episode": info.index,
                "frames": int(real.shape[1]),
                "psnr_mean": float(scores[b].mean()),
                "files": [str(f) for f in files],
            }
        )
    if cfg.alternatives:
        summary.append(write_action_video(cfg, wm, seg, out / "actions"))
    return summary


def write_action_video(settings: RolloutSettings, wm, seg: Segments, path: Path) -> dict:
    """From the first rollout's start, the model and the restored simulator under the recorded
    actions and each alternative of :func:`~selfflow_world.evaluate.alternative_actions`, side by
    side in one video (``path`` .gif / .mp4). Returns its summary."""
    from selfflow_world.envs import make_like
    from selfflow_world.episodes import read_manifest
    from selfflow_world.evaluate import alternative_actions, replay
    from selfflow_world.video import action_grid, write_video

    manifest = read_manifest(Path(settings.data))
    low = np.asarray(manifest["action_low"], np.float32)
    high = np.asarray(manifest["action_high"], np.float32)
    rows = min(len(seg.infos), 4)  # other_episode needs a second rollout to take actions from
    sequences = {"recorded": seg.actions[:rows]}
    for name, acts in alternative_actions(seg.actions[:rows], low, high, settings.seed).items():
        if name != "other_episode" or rows > 1:
            sequences[name] = acts
    env = make_like(manifest)
    try:
        start = seg.states[:rows, wm.history - 1]
        sims = {name: replay(env, seg.infos[:rows], start, acts)[0] for name, acts in sequences.items()}
    finally:
        env.close()
    models = {
        name: settings.imagine(wm, seg.context[:rows], acts, seg.context_actions[:rows])
        for name, acts in sequences.items()
    }
    grid = action_grid([(name, sims[name][0], models[name][0]) for name in sequences])
    files = write_video(path, grid, fps=getattr(settings, "fps", 8))
    return {
        "episode": seg.infos[0].index,
        "action_sequences": list(sequences),
        "files": [str(f) for f in files],
    }
