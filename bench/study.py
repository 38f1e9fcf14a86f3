"""The Self-Flow study: flow vs dts vs selfflow on the same data, model, steps and seeds.

Trains every arm x seed with ``sfw train`` (resumable: rerun the same command to continue), evaluates
each final checkpoint with ``sfw eval`` on held-out episodes (and, with ``--plan-episodes``, plans
goal-reaching episodes with it: with ``--plan-probe``, ``sfw plan``'s default search and state
score, every arm's imagined frames read by that one probe; else a quick search on the pixel
score), and writes ``study.md`` (the table), ``study.json`` and ``study_curves.png`` (validation
curves per arm, mean over seeds with a min-max band) into ``--out``. Outcomes per arm: validation
flow loss, one-step validation PSNR, action sensitivity and action gap over training steps, with
wall-clock per step; at the end PSNR and probed state error at horizon 8, the action-following
ratio, the linear-probe R^2 of the physics state from the features and the goal-reaching success; and the steps and wall-clock ``selfflow`` needs to reach ``flow``'s
final validation PSNR, per seed, as ratios to flow's.

    python bench/study.py --data data/reacher --test data/reacher_test --steps 1500 --seeds 0,1
    python bench/study.py ... --extra objective.t_one=0.5       # any sfw train override for all arms
    python bench/study.py ... --plan-episodes 20 --plan-probe reacher-easy   # goal planning, one probe for all

A `small` step at batch 16 on 2 CPU cores takes 0.4-0.7 s (flow; selfflow about 1.2x), so 3 arms x
2 seeds x 1000-1500 steps take 1-1.5 hours with the evaluations (BENCHMARKS.md, docs/study.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


def read_curves(run: Path) -> dict[str, np.ndarray]:
    """Validation rows of a run's metrics.csv as arrays (step, wall_s, val_*)."""
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_flow_loss")]
    keys = [
        "step",
        "wall_s",
        "val_flow_loss",
        "val_psnr",
        "val_action_gap",
        "val_action_sensitivity",
        "val_psnr_copy_last",
    ]
    return {k: np.array([float(r[k]) if r.get(k) else np.nan for r in rows]) for k in keys}


def steps_to_reach(curve: dict[str, np.ndarray], target: float, key: str = "step") -> float:
    """``key`` (step or wall_s) at the first validation whose PSNR reaches ``target`` (NaN if never)."""
    hit = np.nonzero(curve["val_psnr"] >= target)[0]
    return float(curve[key][hit[0]]) if len(hit) else float("nan")


def final_figures(report: dict) -> dict[str, float]:
    """Horizon-8 PSNR and probed state error (over the probe's floor), the following ratio at
    horizon 8, the best linear-probe R^2 over blocks, from an ``sfw eval`` report."""
    out: dict[str, float] = {}
    h = 7  # index of horizon 8
    psnr = report.get("psnr", {}).get("model", {}).get("per_horizon", {}).get("mean", [])
    if len(psnr) > h:
        out["psnr_h8"] = float(psnr[h])
    probe = report.get("state_probe") or {}
    state = probe.get("model", {}).get("relative_to_floor_per_horizon", [])
    if len(state) > h:
        out["state_error_over_floor_h8"] = float(state[h])
    ratio = report.get("counterfactual", {}).get("following_ratio", {}).get("per_horizon", {}).get("mean", [])
    if len(ratio) > h:
        out["following_ratio_h8"] = float(ratio[h])
    r2 = report.get("representation_r2", {}).get("model")
    if r2:
        out["probe_r2_best"] = float(max(r2.values()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/reacher")
    p.add_argument(
        "--test", default=None, help="held-out dataset for the final evaluation (default: --data's val split)"
    )
    p.add_argument("--out", default="runs/study")
    p.add_argument("--arms", default="flow,dts,selfflow")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument(
        "--plan-episodes",
        type=int,
        default=0,
        help="goal-reaching episodes planned with each final model (plan.QUICK_GOAL_SEARCH; 0 = none)",
    )
    p.add_argument(
        "--plan-probe",
        default="",
        help="plan with sfw plan's default search and state score, every arm reading its frames with this "
        "probe (a model that ships one, e.g. reacher-easy, or a kept .pt); default: the quick pixel search",
    )
    p.add_argument("--extra", nargs="*", default=[], help="sfw train overrides applied to every arm")
    p.add_argument(
        "--report-only", action="store_true", help="skip training and evaluation, rebuild the table"
    )
    args = p.parse_args()

    from selfflow_world.plan import QUICK_GOAL_SEARCH

    sfw = str(Path(sys.executable).with_name("sfw"))
    out = Path(args.out)
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    runs = {(arm, seed): out / f"{arm}_s{seed}" for arm in arms for seed in seeds}
    if not args.report_only:
        for (arm, seed), run in runs.items():
            subprocess.run(
                [
                    sfw,
                    "train",
                    f"data={args.data}",
                    f"out={run}",
                    f"model={args.model}",
                    f"objective={arm}",
                    f"seed={seed}",
                    f"steps={args.steps}",
                    f"batch_size={args.batch}",
                    "resume=true",
                    f"val_every={args.val_every}",
                    f"ckpt_every={args.val_every}",
                    "sample_every=1000000000",
                    *args.extra,
                ],
                check=True,
            )
            if not (run / "eval" / "report.json").is_file():
                data = (
                    [f"data={args.test}", "split=all", f"probe_data={args.data}"]
                    if args.test
                    else [f"data={args.data}"]
                )
                subprocess.run(
                    [
                        sfw,
                        "eval",
                        f"ckpt={run}",
                        *data,
                        f"out={run / 'eval'}",
                        "horizon=8",
                        f"episodes={args.eval_episodes}",
                        "steps=1",
                    ],
                    check=True,
                )
            if args.plan_episodes > 0 and not (run / "plan" / "report.json").is_file():
                subprocess.run(
                    [
                        sfw,
                        "plan",
                        f"ckpt={run}",
                        "task=goal",
                        f"episodes={args.plan_episodes}",
                        "arms=[model]",
                        *(
                            ["score=state", f"probe={args.plan_probe}"]
                            if args.plan_probe
                            else [f"{k}={v}" for k, v in QUICK_GOAL_SEARCH.items()]
                        ),
                        "videos=0",
                        f"out={run / 'plan'}",
                    ],
                    check=True,
                )

    curves = {key: read_curves(run) for key, run in runs.items()}
    finals = {
        key: final_figures(json.loads((run / "eval" / "report.json").read_text()))
        if (run / "eval" / "report.json").is_file()
        else {}
        for key, run in runs.items()
    }
    for key, run in runs.items():
        if (run / "plan" / "report.json").is_file():
            finals[key]["goal_success"] = json.loads((run / "plan" / "report.json").read_text())["arms"][
                "model"
            ]["success"]
    table = {}
    for arm in arms:
        rows = [(curves[(arm, s)], finals[(arm, s)]) for s in seeds]
        entry = {
            "final_val_flow_loss": [float(c["val_flow_loss"][-1]) for c, _ in rows],
            "final_val_psnr": [float(c["val_psnr"][-1]) for c, _ in rows],
            "final_val_action_gap": [float(c["val_action_gap"][-1]) for c, _ in rows],
            "final_val_action_sensitivity": [float(c["val_action_sensitivity"][-1]) for c, _ in rows],
            "seconds_per_step": [float(c["wall_s"][-1] / c["step"][-1]) for c, _ in rows],
        }
        for name in (
            "psnr_h8",
            "state_error_over_floor_h8",
            "following_ratio_h8",
            "probe_r2_best",
            "goal_success",
        ):
            entry[name] = [f.get(name, float("nan")) for _, f in rows]
        table[arm] = entry
    if "flow" in arms and "selfflow" in arms:
        for seed in seeds:
            target = float(curves[("flow", seed)]["val_psnr"][-1])
            reach = steps_to_reach(curves[("selfflow", seed)], target)
            table["selfflow"].setdefault("steps_to_flow_final_psnr", []).append(reach)
            table["selfflow"].setdefault("step_ratio_vs_flow", []).append(
                reach / float(curves[("flow", seed)]["step"][-1])
            )
            wall = steps_to_reach(curves[("selfflow", seed)], target, "wall_s")
            table["selfflow"].setdefault("wall_ratio_vs_flow", []).append(
                wall / float(curves[("flow", seed)]["wall_s"][-1])
            )

    lines = [
        f"Arms x seeds {seeds}, {args.steps} steps, `{args.model}`, batch {args.batch}, data {args.data}; "
        "mean [min, max] over seeds.",
        "",
        "| figure | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    names = sorted({k for e in table.values() for k in e})
    for name in names:
        cells = []
        for arm in arms:
            vals = np.array(table[arm].get(name, [np.nan]), dtype=float)
            cells.append(
                "-"
                if np.isnan(vals).all()
                else f"{np.nanmean(vals):.4g} [{np.nanmin(vals):.4g}, {np.nanmax(vals):.4g}]"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, key, title in zip(
        axes,
        ("val_flow_loss", "val_psnr", "val_action_sensitivity", "val_action_gap"),
        ("validation flow loss", "one-step PSNR (dB)", "action sensitivity", "action gap"),
        strict=True,
    ):
        for arm in arms:
            steps = curves[(arm, seeds[0])]["step"]
            n = min(len(curves[(arm, s)][key]) for s in seeds)
            vals = np.stack([curves[(arm, s)][key][:n] for s in seeds])
            ax.plot(steps[:n], vals.mean(0), label=arm)
            ax.fill_between(steps[:n], vals.min(0), vals.max(0), alpha=0.25)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "study_curves.png", dpi=120)
    print(f"-> {out / 'study.md'}, {out / 'study_curves.png'}")


if __name__ == "__main__":
    main()
