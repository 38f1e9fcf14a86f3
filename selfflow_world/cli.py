"""The ``sfw`` command line.

    sfw envs                                   list env names
    sfw collect [key=value ...]                collect a dataset (configs/collect.yaml)
    sfw data info DIR                          summarise a dataset
    sfw data check DIR                         validate every file; non-zero exit if any is bad
    sfw train [key=value ...]                  train a world model (configs/train.yaml)
    sfw imagine [key=value ...]                real | imagined | error videos (configs/imagine.yaml)
    sfw eval [key=value ...]                   consistency report vs the simulator (configs/eval.yaml)
    sfw demo [key=value ...]                   a shipped model next to the simulator (configs/demo.yaml)
    sfw heads [key=value ...]                  reward/termination heads on a trained model (configs/heads.yaml)
    sfw probe [key=value ...]                  a state/target probe for a trained model (configs/probe.yaml)
    sfw plan [key=value ...]                   plan in imagination, act in the simulator (configs/plan.yaml)
    sfw rl [key=value ...]                     RL in imagination, evaluated in the simulator (configs/rl.yaml)

Bad input prints one line ``sfw: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from selfflow_world.errors import UserError


def _cmd_envs(args: argparse.Namespace) -> int:
    from selfflow_world.envs.registry import defaults_for, list_envs

    for name in list_envs():
        d = defaults_for(name)
        camera = "default" if d.camera is None else d.camera
        print(f"{name:40s} camera={camera} action_repeat={d.action_repeat}")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.envs.collect import CollectConfig, collect

    cfg = load_config("collect", args.overrides, CollectConfig)
    summary = collect(cfg)
    print(
        f"collected {summary['collected']} episodes ({summary['skipped_existing']} already there), "
        f"{summary['frames']} frames in {summary['seconds']:.1f} s ({summary['frames_per_s']:.0f} frames/s) "
        f"-> {cfg.out}"
    )
    print(format_info(dataset_info(Path(cfg.out))))
    return 0


def dataset_info(root: Path) -> dict:
    """Summary of a dataset directory (reads headers only, no arrays)."""
    import numpy as np

    from selfflow_world.clips import scan_dataset

    manifest, infos = scan_dataset(root, skip_corrupt=True)
    steps = np.array([i.steps for i in infos])
    return {
        "path": str(root),
        "env": manifest["env"],
        "episodes": len(infos),
        "frames": int((steps + 1).sum()),
        "steps_per_episode": {"min": int(steps.min()), "mean": float(steps.mean()), "max": int(steps.max())},
        "frame_shape": list(infos[0].frame_shape),
        "action_dim": manifest["action_dim"],
        "action_bounds": [manifest["action_low"], manifest["action_high"]],
        "state_dim": manifest["state_dim"],
        "action_repeat": manifest["action_repeat"],
        "camera": manifest["camera"],
        "policy": manifest["policy"]["name"],
        "seed": manifest["seed"],
        "schema_version": manifest["schema_version"],
        "library_version": manifest["library_version"],
        "size_mb": round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20, 2),
    }


def format_info(info: dict) -> str:
    s = info["steps_per_episode"]
    return "\n".join(
        [
            f"dataset   {info['path']}",
            f"env       {info['env']} (camera {info['camera']}, action repeat {info['action_repeat']})",
            f"episodes  {info['episodes']}  steps/episode min {s['min']} mean {s['mean']:.1f} max {s['max']}",
            f"frames    {info['frames']} of {'x'.join(map(str, info['frame_shape']))} uint8  ({info['size_mb']} MB)",
            f"actions   dim {info['action_dim']}, bounds {info['action_bounds'][0]} .. {info['action_bounds'][1]}",
            f"state     dim {info['state_dim']} (MuJoCo full physics state)",
            f"policy    {info['policy']}, seed {info['seed']}, schema v{info['schema_version']}",
        ]
    )


def _cmd_data(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if args.action == "info":
        info = dataset_info(root)
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    from selfflow_world.episodes import check_dataset

    good, bad = check_dataset(root)
    for message in bad:
        print(f"CORRUPT {message}")
    print(f"{len(good)} episodes ok, {len(bad)} corrupt in {root}")
    return 1 if bad else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from selfflow_world.train import main as train_main

    return train_main(args.overrides)


def _cmd_imagine(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.imagine import ImagineConfig, run_imagine

    cfg = load_config("imagine", args.overrides, ImagineConfig)
    for row in run_imagine(cfg):
        if "action_sequences" in row:  # one start under several action sequences
            print(
                f"episode {row['episode']} under {', '.join(row['action_sequences'])} actions, "
                "simulator | model -> " + ", ".join(row["files"])
            )
            continue
        print(
            f"episode {row['episode']}: {row['frames']} frames, PSNR {row['psnr_mean']:.2f} dB -> "
            + ", ".join(row["files"])
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.evaluate import EvalConfig, run_eval

    cfg = load_config("eval", args.overrides, EvalConfig)
    report = run_eval(cfg)
    print(report["summary_text"])
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.heads import HeadsConfig, fit_heads

    cfg = load_config("heads", args.overrides, HeadsConfig)
    meta = fit_heads(cfg)
    held = meta["held_out"]
    print(
        f"heads at block {meta['layer']} on {held['examples']} held-out transitions ({held['data']}, "
        f"{held['split']}): reward MAE {held['reward_mae']:.4f} (predicting the mean: "
        f"{held['reward_mae_predict_mean']:.4f}), correlation {held['reward_correlation']:.3f}, "
        f"termination accuracy {held['termination_accuracy']:.3f} -> {meta['written_to']}"
    )
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.plan import ProbeConfig, run_probe

    cfg = load_config("probe", args.overrides, ProbeConfig)
    report = run_probe(cfg)
    floor = ", ".join(f"{v:.3f}" for v in report["floor_rmse"])
    print(
        f"{report['score']} probe ({report['state_dims']}) fitted on {report['data']} "
        f"(+ imagined frames of {report['imagined_clips']} clips): held-out RMSE on real frames "
        f"{floor} -> {report['written_to']}"
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.plan import PlanConfig, run_plan

    cfg = load_config("plan", args.overrides, PlanConfig)
    report = run_plan(cfg)
    print(report["summary_text"])
    print(f"report, plots and videos in {cfg.out}")
    return 0


def _cmd_rl(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.rl import RLConfig, run_rl

    cfg = load_config("rl", args.overrides, RLConfig)
    report = run_rl(cfg)
    print(report["summary_text"])
    print(f"policy, report, plots and video in {cfg.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from selfflow_world.config import load_config
    from selfflow_world.demo import DemoConfig, run_demo

    cfg = load_config("demo", args.overrides, DemoConfig)
    print(run_demo(cfg)["summary"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfw", description="Self-Flow world models for MuJoCo robotics.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("envs", help="list env names with their curated camera and action repeat")
    p.set_defaults(func=_cmd_envs)
    for name, func, text in [
        ("collect", _cmd_collect, "collect a pixel dataset (key=value overrides of configs/collect.yaml)"),
        ("train", _cmd_train, "train a world model (key=value overrides of configs/train.yaml)"),
        (
            "imagine",
            _cmd_imagine,
            "real | imagined | error videos (key=value overrides of configs/imagine.yaml)",
        ),
        ("eval", _cmd_eval, "temporal-consistency report (key=value overrides of configs/eval.yaml)"),
        (
            "heads",
            _cmd_heads,
            "reward/termination heads on a trained model (overrides of configs/heads.yaml)",
        ),
        (
            "probe",
            _cmd_probe,
            "a state/target probe stored beside a model's weights (overrides of configs/probe.yaml)",
        ),
        ("plan", _cmd_plan, "plan in imagination, act in the simulator (overrides of configs/plan.yaml)"),
        ("rl", _cmd_rl, "train an agent in imagination, evaluate it in the simulator (configs/rl.yaml)"),
        ("demo", _cmd_demo, "a shipped world model next to the simulator (overrides of configs/demo.yaml)"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=func)
    p = sub.add_parser("data", help="inspect a dataset: info DIR | check DIR")
    p.add_argument("action", choices=["info", "check"])
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="info as JSON")
    p.set_defaults(func=_cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"sfw: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `sfw envs | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("sfw: interrupted; complete files are kept and a rerun continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
