"""Planning success against planning cost, one row per planner setting, in one run.

Runs ``sfw plan`` (the world model arm, and optionally the random and simulator arms) for each
setting ``population x horizon x iterations`` on the same starts, and prints per setting the
imagined frames and seconds per plan and the goal success rate with its 95 % Wilson interval
(``--task goal``) or the mean episode return with its 95 % t interval (``--task reward``). Results
are kept per episode under ``--out/<setting>/`` (resumable: rerun to continue).

    python bench/bench_plan.py --ckpt reacher-easy --episodes 50 --arms model,random  # the defaults
    python bench/bench_plan.py --settings 16x5x2,64x5x3 --score pixels --arms model,simulator
    python bench/bench_plan.py --settings 32x3x2 --score state --pixel-weight 0 --probe-imagined 0
    python bench/bench_plan.py --task reward --score target --episodes 5 --arms model,random
    python bench/bench_plan.py --task reward --score target --near-planner none  # CEM alone
    python bench/bench_plan.py --task reward --score target --near-planner mppi --near-distance 0.12
    python bench/bench_plan.py --task reward --score target --action-cost 0.01
    python bench/bench_plan.py --ckpt runs/reacher_ih --probe reacher-easy --task reward --score target
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="reacher-easy")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument(
        "--settings",
        default="32x3x2",
        help="population x horizon x iterations, comma-separated",
    )
    p.add_argument("--planner", default="cem")
    p.add_argument("--task", default="goal", choices=["goal", "reward"])
    p.add_argument(
        "--near-planner",
        default="auto",
        choices=["auto", "none", "cem", "mppi"],
        help="reward/target: plan with this planner while the real finger is within --near-distance of "
        "the target (auto: mppi with the target score, as sfw plan)",
    )
    p.add_argument("--near-distance", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=0.1, help="MPPI: softmax temperature, score units")
    p.add_argument("--score", default="state", help="goal: state|pixels|features; reward: target|reward")
    p.add_argument(
        "--pixel-blur",
        default="0",
        help="pixel score: comma-separated box-blur radii, 0 = sharp, e.g. 0,2,4,8",
    )
    p.add_argument(
        "--probe-data",
        default="",
        help="state/target score: dataset whose frames and states train the probe (default: the model's data)",
    )
    p.add_argument(
        "--probe",
        default="",
        help="state/target score: read frames with this probe (a kept .pt, or a model that ships one, e.g. reacher-easy)",
    )
    p.add_argument(
        "--probe-imagined",
        type=int,
        default=3000,
        help="state/target score, a fitted probe: clips whose imagined frames it also fits (0: real frames only)",
    )
    p.add_argument("--pixel-weight", type=float, default=50.0, help="state score: plus this x pixel distance")
    p.add_argument("--arms", default="model", help="comma-separated: model, random, simulator")
    p.add_argument("--sampler-steps", type=int, default=1)
    p.add_argument("--execute", type=int, default=2, help="actions executed per plan before replanning")
    p.add_argument(
        "--act",
        default="best",
        choices=["best", "mean"],
        help="CEM: execute the best sequence or the elite mean",
    )
    p.add_argument(
        "--action-cost",
        type=float,
        default=0.0,
        help="score minus this x the sum of squared normalised actions (small actions win ties)",
    )
    p.add_argument("--common-noise", action="store_true", help="every candidate from the same sampler noise")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--out",
        default=None,
        help="results root (default runs/bench_plan/<the ckpt's name>; one folder per setting, resumable)",
    )
    args = p.parse_args()

    import torch

    from selfflow_world.plan import PlanConfig, run_plan
    from selfflow_world.runtime import resolve_device
    from selfflow_world.world_model import WorldModel

    if args.near_planner == "auto":  # as PlanConfig.resolved_near_planner
        args.near_planner = "mppi" if (args.task, args.score) == ("reward", "target") else None
    elif args.near_planner == "none":
        args.near_planner = None
    if args.out is None:  # results of different models never mix on resume
        args.out = os.path.join("runs", "bench_plan", os.path.basename(os.path.normpath(args.ckpt)))
    device = resolve_device(args.device)
    wm = WorldModel.load(args.ckpt, device=device)
    cpu = platform.processor() or platform.machine()
    print(
        f"# {args.ckpt} on {device} ({torch.get_num_threads()} threads, {cpu}); {args.task} task, {args.planner}, "
        f"score {args.score} (blur {args.pixel_blur}"
        f"{f', pixel weight {args.pixel_weight:g}, probe_imagined {args.probe_imagined}' if args.score == 'state' else ''}"
        f"), {args.episodes} episodes, {args.sampler_steps} sampler step(s), "
        f"{args.execute} action(s) per plan{', common noise' if args.common_noise else ''}"
        f"{', executes the elite mean' if args.act == 'mean' else ''}"
        f"{f', action cost {args.action_cost:g}' if args.action_cost else ''}"
        f"{f', {args.near_planner} within {args.near_distance:g} of the target' if args.near_planner else ''}"
    )
    outcome = "success" if args.task == "goal" else "return"
    print(f"| setting (pop x horizon x iters) | arm | frames per plan | s per plan | {outcome} | 95% CI |")
    print("|---|---|---|---|---|---|")
    blur = [int(v) for v in args.pixel_blur.split(",")]
    tag = (
        ("" if args.planner == "cem" else f"{args.planner}-")
        + ("" if args.task == "goal" else "reward-")
        + args.score
    )
    if args.near_planner:
        tag += f"-near-{args.near_planner}{args.near_distance:g}"
    if "mppi" in (args.planner, args.near_planner) and args.temperature != 0.1:
        tag += f"-temp{args.temperature:g}"
    if args.action_cost:
        tag += f"-ac{args.action_cost:g}"
    tag = tag if blur == [0] else f"{tag}-blur{'-'.join(map(str, blur))}"
    if args.score == "state" and args.pixel_weight:
        tag += f"-px{args.pixel_weight:g}"
    if args.score == "state" and args.probe_imagined:
        tag += f"-im{args.probe_imagined}"
    for setting in args.settings.split(","):
        population, horizon, iterations = (int(v) for v in setting.lower().split("x"))
        cfg = PlanConfig(
            ckpt=args.ckpt,
            planner=args.planner,
            task=args.task,
            score=args.score,
            pixel_blur=blur,
            probe_data=args.probe_data,
            probe=args.probe,
            pixel_weight=args.pixel_weight,
            probe_imagined=args.probe_imagined,
            episodes=args.episodes,
            out=os.path.join(
                args.out,
                f"{tag}_{setting}_x{args.execute}{'_cn' if args.common_noise else ''}{'_mean' if args.act == 'mean' else ''}",
            ),
            arms=args.arms.split(","),
            population=population,
            horizon=horizon,
            iterations=iterations,
            elites=max(2, population // 8),
            sampler_steps=args.sampler_steps,
            execute=args.execute,
            act=args.act,
            common_noise=args.common_noise,
            action_cost=args.action_cost,
            temperature=args.temperature,
            near_planner=args.near_planner,
            near_distance=args.near_distance,
            videos=0,
        )
        report = run_plan(cfg, wm=wm, progress=False)
        for arm, e in report["arms"].items():
            frames = e.get("imagined_frames_per_plan", float("nan"))
            seconds = e.get("seconds_per_plan", float("nan"))
            if args.task == "goal":
                result = f"{e['success']:.0%} ({e['successes']}/{e['episodes']}) | [{e['success_low']:.0%}, {e['success_high']:.0%}]"
            else:
                result = f"{e['return_mean']:.0f} ({e['episodes']} episodes) | [{e['return_low']:.0f}, {e['return_high']:.0f}]"
            print(f"| {setting} | {arm} | {frames:.0f} | {seconds:.2f} | {result} |", flush=True)


if __name__ == "__main__":
    main()
