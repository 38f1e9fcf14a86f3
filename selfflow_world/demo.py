"""``sfw demo``: a shipped world model imagining a robot next to the simulator, in a few minutes.

    sfw demo                          # the shipped reacher-easy model, output in demo/
    sfw demo env=dmc/cartpole-swingup # the shipped model of that env
    sfw demo ckpt=RUN env=dmc/reacher-easy out=/tmp/demo

It collects a few fresh real episodes (rendered as the model's training data was), imagines them
from their first frames under their real actions and under alternative actions, and writes
real | imagined | error videos, one start under several action sequences (simulator | model), the
consistency report with its plots, and a short summary. Then, where the env has a goal protocol
(reacher), it plans: one goal-reaching episode controlled by CEM in the model's imagination, with a
video of the real execution beside the imagined plan and the goal. Nothing is trained except the
small state probe the report needs (seconds) and nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from selfflow_world.errors import UserError, check_count, check_positive


@dataclass
class DemoConfig:
    """Settings of ``sfw demo`` (documented in configs/demo.yaml)."""

    ckpt: str = "auto"  # auto: the shipped model of env= (reacher-easy without env=)
    env: str = ""  # "": the env the model was trained on
    out: str = "demo"
    episodes: int = 6
    steps: int = 40
    horizon: int = 16
    sampler_steps: int = 1
    seed: int = 1000
    workers: int = 2
    device: str = "auto"
    probe_epochs: int = 30
    plan_episodes: int = 1  # goal-reaching episodes planned in imagination (0: none)
    plan_budget: int = 30  # agent steps each may take

    def check(self) -> None:
        for name in (
            "episodes",
            "steps",
            "horizon",
            "sampler_steps",
            "workers",
            "probe_epochs",
            "plan_budget",
        ):
            check_positive(name, getattr(self, name))
        check_count("plan_episodes", self.plan_episodes, minimum=0)
        if self.episodes < 2:
            raise UserError(
                f"episodes must be at least 2 (the report compares rollouts), got {self.episodes}"
            )


def _resolved_ckpt(cfg: DemoConfig) -> str:
    """``ckpt=auto``: the shipped model trained on ``cfg.env``, or reacher-easy without an env."""
    from selfflow_world import pretrained

    if cfg.ckpt != "auto":
        return cfg.ckpt
    if not cfg.env:
        return "reacher-easy"
    name = pretrained.for_env(cfg.env)
    if name is None:
        shipped = ", ".join(f"{n} ({env})" for n, env in pretrained.trained_envs().items())
        raise UserError(
            f"no shipped model is trained on env={cfg.env} (shipped: {shipped or 'none'}); "
            f"pass ckpt=RUN, a model trained on it"
        )
    return name


def run_demo(cfg: DemoConfig) -> dict:
    """Collect, imagine, evaluate; returns ``{"summary": text, "files": {...}, "seconds": s}``."""
    from selfflow_world.envs.collect import CollectConfig, collect
    from selfflow_world.evaluate import EvalConfig, run_eval
    from selfflow_world.imagine import ImagineConfig, run_imagine
    from selfflow_world.runtime import resolve_device
    from selfflow_world.world_model import WorldModel

    cfg.check()
    cfg = replace(cfg, ckpt=_resolved_ckpt(cfg))
    began = time.perf_counter()
    wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device))  # fails clearly if missing
    trained_on = wm.meta.get("env", "")
    env = cfg.env or trained_on
    if not env:
        raise UserError(f"checkpoint {cfg.ckpt} does not say which env it was trained on; pass env=")
    if trained_on and env != trained_on:
        raise UserError(
            f"model {cfg.ckpt} was trained on {trained_on}, not {env}: pass env={trained_on} or another model"
        )
    render = wm.meta.get("render", {})
    if cfg.horizon + wm.history > cfg.steps + 1:
        raise UserError(
            f"steps={cfg.steps} gives episodes of {cfg.steps + 1} frames, fewer than the context "
            f"({wm.history}) plus horizon={cfg.horizon}; raise steps or lower horizon"
        )
    out = Path(cfg.out)
    data = out / "data"
    collect(
        CollectConfig(
            env=env,
            episodes=cfg.episodes,
            steps=cfg.steps,
            out=str(data),
            seed=cfg.seed,
            workers=cfg.workers,
            size=int(render["size"][0]) if "size" in render else wm.config.image_size,
            camera=render.get("camera"),
            action_repeat=render.get("action_repeat"),
        ),
        progress=False,
    )
    common = dict(
        ckpt=cfg.ckpt, data=str(data), horizon=cfg.horizon, episodes=cfg.episodes, steps=cfg.sampler_steps
    )
    common.update(seed=cfg.seed, device=cfg.device)
    videos = run_imagine(ImagineConfig(**common, out=str(out / "imagine"), split="all"), wm=wm)
    report = run_eval(
        EvalConfig(
            **common,
            out=str(out / "eval"),
            split="all",
            probe_epochs=cfg.probe_epochs,
            probe_frames=cfg.episodes * (cfg.steps + 1),
            # a linear probe fitted on a few short episodes says nothing about the features
            representation=False,
        ),
        wm=wm,
    )
    plan = _plan_episodes(cfg, wm, env, out)
    seconds = time.perf_counter() - began
    action_video = next((v for v in videos if "action_sequences" in v), None)
    files = {
        "videos": [
            f for v in videos if "action_sequences" not in v for f in v["files"] if f.endswith(".mp4")
        ],
        "actions_video": [f for f in (action_video or {}).get("files", []) if f.endswith(".mp4")],
        "report": str(out / "eval" / "report.md"),
        "plots": [str(out / "eval" / p) for p in report["plots"]],
    }
    lines = [
        f"demo of {cfg.ckpt} on {env}: {cfg.episodes} fresh episodes, {cfg.horizon} frames imagined from "
        f"{wm.history} real ones, {cfg.sampler_steps} sampler step(s) per frame, {seconds:.0f} s",
        report["summary_text"],
        "files:",
        f"  real | imagined | error videos: {', '.join(files['videos'])}",
        f"  one start under several action sequences (simulator | model): {', '.join(files['actions_video'])}",
        f"  report: {files['report']} (plots beside it)",
    ]
    if plan is not None:
        files["plan_videos"] = [f for f in plan["videos"] if f.endswith(".mp4")]
        files["plan_report"] = str(out / "plan" / "report.md")
        lines[2:2] = [plan["summary_text"]]
        lines.append(
            f"  planning: {', '.join(files['plan_videos'])} (real | imagined plan | goal), {files['plan_report']}"
        )
    return {"summary": "\n".join(lines), "files": files, "seconds": seconds}


def _plan_episodes(cfg: DemoConfig, wm, env: str, out: Path) -> dict | None:
    """Goal-reaching episodes planned with CEM in the model, or None where the env has no goal
    protocol or none are asked. A model with a goal probe shipped beside its weights plans with
    ``sfw plan``'s defaults (the state score); any other with :data:`plan.QUICK_GOAL_SEARCH`
    (the pixel score, which needs no probe)."""
    from selfflow_world.plan import GOAL_JOINTS, QUICK_GOAL_SEARCH, PlanConfig, run_plan, shipped_probe_dir

    if cfg.plan_episodes == 0 or env not in GOAL_JOINTS:
        return None
    search = {} if shipped_probe_dir(wm) is not None else QUICK_GOAL_SEARCH
    plan_cfg = PlanConfig(
        ckpt=cfg.ckpt,
        env=env,
        planner="cem",
        task="goal",
        episodes=cfg.plan_episodes,
        out=str(out / "plan"),
        arms=["model"],
        **search,
        budget=cfg.plan_budget,
        sampler_steps=cfg.sampler_steps,
        videos=cfg.plan_episodes,
        seed=cfg.seed,
        device=cfg.device,
        resume=False,
    )
    return run_plan(plan_cfg, wm=wm, progress=False)
