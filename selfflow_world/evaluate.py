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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from selfflow_world.errors import UserError
from selfflow_world.imagine import RolloutSettings
from selfflow_world.runtime import resolve_device
from selfflow_world.video import to_float


@dataclass
class EvalConfig(RolloutSettings):
    """Settings of ``sfw eval`` (documented in configs/eval.yaml)."""

    replay: bool = True
    probe_frames: int = 4000
    probe_epochs: int = 15
    level: float = 0.95
    ridge: float = 1.0


def _curve(per_episode: torch.Tensor, level: float) -> dict[str, list[float]]:
    """(B, T) -> mean and CI per horizon."""
    from selfflow_world.metrics import mean_ci

    rows = [mean_ci(per_episode[:, j], level) for j in range(per_episode.shape[1])]
    return {"mean": [r[0] for r in rows], "low": [r[1] for r in rows], "high": [r[2] for r in rows]}


def _summary(per_episode: torch.Tensor, level: float) -> dict[str, float]:
    from selfflow_world.metrics import mean_ci

    mean, low, high = mean_ci(per_episode.float().mean(1), level)
    return {"mean": mean, "low": low, "high": high}


def replay_frames(env, infos, start_states: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Frames the simulator shows when ``actions`` (B, T, A) are applied from ``start_states`` (B, S),
    each restored after a reset with its episode's seed: uint8 (B, T, h, w, 3)."""
    out = []
    for b, info in enumerate(infos):
        env.restore(start_states[b], seed=info.meta["env_seed"])
        frames = []
        for a in actions[b]:
            obs, _, term, _, _ = env.step(a)
            frames.append(obs)
            if term:  # the episode ended under these actions: hold the last frame
                break
        frames += [frames[-1]] * (len(actions[b]) - len(frames))
        out.append(np.stack(frames))
    return np.stack(out)


@torch.no_grad()
def history_dependence(
    wm, ctx: np.ndarray, ctx_act: np.ndarray, actions: np.ndarray, real: np.ndarray, seed: int
) -> dict[str, float]:
    """Does the model use its history? One-step clean-frame prediction from pure noise (``t = 1``),
    with each row's own context vs another row's (rolled by one), same noise and action.

    ``ratio`` = mean |change of the prediction| / mean |difference of the two true next frames|: about
    1 when the prediction follows the history as the data does, 0 when it ignores it.
    """
    model = wm.model
    context = to_float(ctx).to(wm.device)
    ctx_a = wm.normalize_actions(torch.from_numpy(ctx_act).to(wm.device))
    action = wm.normalize_actions(torch.from_numpy(actions[:, 0]).to(wm.device))
    gen = torch.Generator(wm.device).manual_seed(seed)
    noise = torch.randn(context[:, 0].shape, generator=gen, device=wm.device)
    ones = torch.ones(context.shape[0], device=wm.device)

    def predict(frames: torch.Tensor, frame_actions: torch.Tensor) -> torch.Tensor:
        cache = model.init_cache(frames.shape[0])
        model.append(cache, frames, frame_actions)
        pred = model.step(cache, noise, ones, action)
        return model.clean(pred[:, None], noise[:, None], ones)[:, 0].float()

    own = predict(context, ctx_a)
    swapped = predict(context.roll(1, 0), ctx_a.roll(1, 0))
    nxt = to_float(real[:, 0]).to(wm.device)
    change = float((own - swapped).abs().mean())
    truth = float((nxt - nxt.roll(1, 0)).abs().mean())
    return {
        "mean_abs_change": change,
        "true_next_frame_difference": truth,
        "ratio": change / truth if truth > 0 else float("nan"),
    }


@dataclass
class StateMap:
    """Physics state vector -> what a probe can see: qpos (with each unlimited hinge angle as its
    sine and cosine, since an angle that has wound past +-pi looks the same) and qvel."""

    nq: int
    nv: int
    wrapped: list[int]

    def __call__(self, states) -> torch.Tensor:
        """``(..., state_size)`` full physics states -> ``(..., dim)`` float32."""
        if isinstance(states, torch.Tensor):
            s = states.double()
        else:
            s = torch.from_numpy(np.array(states, dtype=np.float64))  # a copy: states may be a read-only mmap
        qpos, qvel = s[..., 1 : 1 + self.nq], s[..., 1 + self.nq : 1 + self.nq + self.nv]  # [0] is time
        keep = [i for i in range(self.nq) if i not in self.wrapped]
        angles = qpos[..., self.wrapped]
        return torch.cat([qpos[..., keep], angles.sin(), angles.cos(), qvel], -1).float()

    @property
    def description(self) -> str:
        return (
            f"qpos ({self.nq - len(self.wrapped)} raw, {len(self.wrapped)} unlimited hinge angles as sin and cos)"
            f" + qvel ({self.nv})"
        )


def _probe_data(dataset, limit: int, state_map: StateMap, generator: np.random.Generator):
    """Up to ``limit`` (frame, qpos/qvel) pairs from a split, uint8 (N, 3, h, w) and float (N, S)."""
    from selfflow_world.episodes import load_episode

    frames, states = [], []
    for info in dataset.episodes:
        arr = load_episode(info.path)
        frames.append(np.asarray(arr["frames"]))
        states.append(state_map(arr["states"]).numpy())
    frames, states = np.concatenate(frames), np.concatenate(states)
    if len(frames) > limit:
        pick = np.sort(generator.choice(len(frames), limit, replace=False))
        frames, states = frames[pick], states[pick]
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(states).float()


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


def run_eval(cfg: EvalConfig) -> dict:
    """Compute the report, write report.json, report.md and plots into ``cfg.out``; return the report."""
    from selfflow_world.clips import ClipDataset, ClipSpec
    from selfflow_world.envs import make
    from selfflow_world.episodes import read_manifest
    from selfflow_world.imagine import load_segments
    from selfflow_world.metrics import (
        controllability_gap,
        frechet_distance,
        linear_probe_r2,
        psnr_per_horizon,
        shuffle_actions,
        ssim_per_horizon,
    )
    from selfflow_world.probe import fit_probe, probe_error
    from selfflow_world.world_model import WorldModel

    cfg.check("eval", positive=("probe_frames", "probe_epochs"))
    if not 0 < cfg.level < 1:
        raise UserError(f"level must be in (0, 1), got {cfg.level}")
    wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device), compile=cfg.compile)
    # the baseline imagines one batch of rollouts: compiling it would cost more than it saves
    untrained = WorldModel.untrained(wm, seed=cfg.seed, compile=False)
    hist = wm.history
    # one rollout per validation episode; short splits take several segments per episode, and a
    # split with fewer than 2 rollouts falls back to all episodes (recorded in the report)
    seg = load_segments(wm, cfg.data, "val", cfg.episodes, hist, cfg.horizon, per_episode=1, min_rows=2)
    if len(seg.infos) < 2:
        seg = load_segments(wm, cfg.data, "val", cfg.episodes, hist, cfg.horizon, per_episode=8, min_rows=2)
    if len(seg.infos) < 2:
        raise UserError(
            f"eval needs at least 2 rollouts of {hist}+1 frames in {cfg.data}, found {len(seg.infos)}"
        )
    ctx, ctx_act, fut_act, real, infos = seg.context, seg.context_actions, seg.actions, seg.real, seg.infos
    manifest = read_manifest(Path(cfg.data))
    horizon = real.shape[1]

    def imagine(model, actions):
        return cfg.imagine(model, ctx, actions, ctx_act)  # same noise for every variant

    shuffled = shuffle_actions(torch.from_numpy(fut_act), torch.Generator().manual_seed(cfg.seed)).numpy()
    videos = {
        "model": imagine(wm, fut_act),
        "copy_last": np.repeat(ctx[:, -1:], horizon, axis=1),
        "untrained": imagine(untrained, fut_act),
    }
    shuffled_video = imagine(wm, shuffled)
    real_t = to_float(real)  # float (B, T, 3, h, w), converted once like every video below
    videos_t = {k: to_float(v) for k, v in videos.items()}
    shuffled_t = to_float(shuffled_video)
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
    report["history_use"] = history_dependence(wm, ctx, ctx_act, fut_act, real, cfg.seed)
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

    env = make(
        manifest["env"],
        size=tuple(manifest["size"]),
        camera=manifest["camera"],
        action_repeat=manifest["action_repeat"],
    )
    try:
        state_map = StateMap(env.nq, env.nv, env.wrapped_qpos())
        if cfg.replay:
            start_states = seg.states[:, hist - 1]  # the last context frame of each rollout
            truth = replay_frames(env, infos, start_states, shuffled)
            check = replay_frames(env, infos, start_states, fut_act)
            report["replay"] = {
                "psnr_shuffled_actions": {
                    "per_horizon": _curve(psnr_per_horizon(to_float(truth), shuffled_t), cfg.level)
                },
                "replay_matches_recording": bool(np.array_equal(check, real)),
            }
    finally:
        env.close()

    # state probe trained on real frames only
    rng = np.random.default_rng(cfg.seed)
    spec = ClipSpec(
        history=hist,
        future=1,
        val_fraction=wm.meta["config"].get("val_fraction", 0.1),
        split_seed=wm.meta["config"].get("seed", 0),
    )
    train_set, val_set = ClipDataset(cfg.data, spec, "train"), ClipDataset(cfg.data, spec, "val")
    tr_frames, tr_states = _probe_data(train_set, cfg.probe_frames, state_map, rng)
    va_frames, va_states = _probe_data(val_set, cfg.probe_frames, state_map, rng)
    probe, probe_metrics = fit_probe(
        tr_frames,
        tr_states,
        val_frames=va_frames,
        val_states=va_states,
        epochs=cfg.probe_epochs,
        generator=torch.Generator().manual_seed(cfg.seed),
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
        rel = (err.pow(2).mean(0).sqrt() / floor.clamp(min=1e-8)).mean(-1)  # (T,)
        state_report[name] = {
            "rmse_per_horizon": err.pow(2).mean(dim=(0, 2)).sqrt().tolist(),
            "relative_to_floor_per_horizon": rel.tolist(),
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

    # representation quality: linear probe of (qpos, qvel) from features at t = 0
    limit = min(cfg.probe_frames, 2000)
    rep = {}
    for name, model in (("model", wm), ("untrained", untrained)):
        f_tr, y_tr = _clip_features(model, train_set, limit, state_map, np.random.default_rng(cfg.seed))
        f_va, y_va = _clip_features(model, val_set, limit, state_map, np.random.default_rng(cfg.seed + 1))
        rep[name] = {
            str(layer): linear_probe_r2(f_tr[layer], y_tr, f_va[layer], y_va, ridge=cfg.ridge)[1]
            for layer in f_tr
        }
    report["representation_r2"] = rep

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, out)
    report["summary_text"] = summary_text(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(report_markdown(report))
    return report


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
            ax.plot(steps, c["mean"], label=name, marker="o", ms=3)
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
            steps, report["state_probe"][name]["relative_to_floor_per_horizon"], label=name, marker="o", ms=3
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
    s = report["state_probe"]
    lines.append(
        f"  state error / probe floor at 1 and {report['horizon']} frames: "
        f"{s['model']['relative_to_floor_per_horizon'][0]:.2f}, {s['model']['relative_to_floor_per_horizon'][-1]:.2f}"
    )
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
        f"History use: swapping the context for another rollout's changes the one-step prediction from pure "
        f"noise by {hu['mean_abs_change']:.4f} (mean |diff|, [-1, 1] units) where the true next frames differ "
        f"by {hu['true_next_frame_difference']:.4f}: ratio {hu['ratio']:.2f} (0 = history ignored)."
    )
    if "replay" in report:
        r = report["replay"]
        lines.append(
            f"Replay in the simulator reproduces the recording: {r['replay_matches_recording']}; PSNR under "
            f"shuffled actions against their replayed truth: {np.mean(r['psnr_shuffled_actions']['per_horizon']['mean']):.2f} dB."
        )
    rep = report["representation_r2"]
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
