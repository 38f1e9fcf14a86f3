"""World models shipped with the package, loadable by name.

    WorldModel.load("reacher-easy")          # or ckpt=reacher-easy in any sfw command

A shipped model is a checkpoint directory under ``selfflow_world/models/<name>/`` holding only what
imagination needs: the EMA weights in bf16 (``weights.safetensors``, keys ``ema.*``), ``meta.json``
(model config, action bounds, env, training settings) and ``MODEL_CARD.md`` (data, steps,
hardware, time, evaluation figures). :func:`export` writes one from a training checkpoint.
Any other checkpoint still loads by path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfflow_world.errors import UserError
from selfflow_world.heads import HEADS_FILE, HEADS_META

MODELS_DIR = Path(__file__).parent / "models"
HOW_TO_MAKE = (
    "bash bench/train_default.sh {name}  # collects, trains and evaluates it (see its MODEL_CARD.md)"
)
# how the shipped models were trained, where it differs from train_default.sh's defaults
RECIPES = {
    "reacher-easy": 'OBJECTIVE=flow EXTRA="objective.t_one=1.0" FINETUNE=3000 IH=6,8 IH_STEPS=1200,1200 bash bench/train_default.sh reacher-easy 5000',
    "cartpole-swingup": 'OBJECTIVE=flow EXTRA="objective.t_one=1.0" FINETUNE=3000 IH=6,8,12,12,12,8,8 IH_STEPS=1200,1600,1200,2000@1600,1200,1200,800@600 IH_HISTORY=2,2,2,2,4,4,4 IH_LR=1e-4,1e-4,1e-4,1e-4,1e-4,5e-5,5e-5 IH_WARMUP=100,100,100,100,100,50,50 IH_EXTRA=";;;;;;objective.motion_weight=3" bash bench/train_default.sh cartpole-swingup 5000',
}


def available() -> list[str]:
    """Names of the shipped models."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(
        p.name
        for p in MODELS_DIR.iterdir()
        if (p / "meta.json").is_file() and (p / "weights.safetensors").is_file()
    )


def trained_envs() -> dict[str, str]:
    """``{name: env}`` of the shipped models, from their meta.json."""
    return {
        name: json.loads((MODELS_DIR / name / "meta.json").read_text()).get("env", "") for name in available()
    }


def for_env(env: str) -> str | None:
    """The name of the shipped model trained on ``env`` (e.g. ``dmc/cartpole-swingup``), or None."""
    return next((name for name, trained in trained_envs().items() if trained == env), None)


def looks_like_name(text: str) -> bool:
    """A bare name (no path separator, not an existing path), e.g. ``reacher-easy``."""
    return os.sep not in text and "/" not in text and not Path(text).exists()


def model_dir(name: str) -> Path:
    """The checkpoint directory of shipped model ``name``; a clear error names the shipped ones and
    how to make a missing one."""
    names = available()
    if name in names:
        return MODELS_DIR / name
    known = ", ".join(names) if names else "none"
    raise UserError(
        f"no checkpoint at {name!r} and no shipped model of that name (shipped: {known}); pass a run or "
        f"checkpoint directory, or make it with: {HOW_TO_MAKE.format(name=name)}"
    )


def export(ckpt: str | Path, dest: str | Path, card: str = "") -> Path:
    """Write a shipped-model directory ``dest`` from training checkpoint ``ckpt``: its EMA weights
    in bf16, its meta.json (without per-run paths), its reward heads if it has them
    (``heads.safetensors`` / ``heads.json``), its planning probes if it has them (``state_probe.*``, ``target_probe.*``,
    :func:`selfflow_world.plan.ship_probe`) and ``card`` as MODEL_CARD.md. Written to a
    temporary directory and renamed, so ``dest`` is never half-written. Returns ``dest``."""
    from selfflow_world.checkpoint import read_meta, resolve_checkpoint

    src = resolve_checkpoint(ckpt)
    meta = read_meta(src)
    tensors = load_file(str(src / "weights.safetensors"))
    ema = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in tensors.items()
        if k.startswith("ema.")
    }
    if not ema:
        raise UserError(f"checkpoint {src} has no EMA weights (ema.*) to export")
    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(ema, str(tmp / "weights.safetensors"))
    from selfflow_world.plan import PROBE_FILES

    for name in (HEADS_FILE, HEADS_META, *(n for pair in PROBE_FILES.values() for n in pair)):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    meta = {k: v for k, v in meta.items() if k not in ("dataset",)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if card:
        (tmp / "MODEL_CARD.md").write_text(card)
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest


def heads_lines(heads: dict) -> list[str]:
    """What a model card says about the reward heads, from their ``heads.json``."""
    held = heads.get("held_out", {})
    how = heads.get("trained", "afterwards on the frozen model (`sfw heads`)")
    line = f"Reward and termination heads (`heads.safetensors`, block {heads.get('layer')} features), trained {how}"
    if held:
        line += (
            f": on {held.get('examples')} held-out transitions reward MAE {held['reward_mae']:.3f} and RMSE "
            f"{held['reward_rmse']:.3f}, against {held['reward_mae_predict_mean']:.3f} and "
            f"{held['reward_rmse_predict_mean']:.3f} for predicting the training mean; correlation "
            f"{held['reward_correlation']:.2f}"
        )
    return ["", line + "."]


def model_card(name: str, meta: dict, report: dict | None, hardware: str, heads: dict | None = None) -> str:
    """A short model card: data, training, hardware and time, the held-out evaluation against the
    action-following bar, and the reward heads' accuracy."""
    cfg = meta.get("config", {})
    obj = cfg.get("objective", {})
    wall = meta.get("metrics", {}).get("wall_s")
    lines = [
        f"# {name}",
        "",
        f"A `{cfg.get('model', {}).get('preset', '?')}` world model ({obj.get('mode')} objective) of `{meta.get('env')}` "
        f"({meta['model_config']['image_size']}x{meta['model_config']['image_size']} frames), "
        f'EMA weights in bf16. Load it with `WorldModel.load("{name}")` or `ckpt={name}`.',
        "",
        "| | |",
        "|---|---|",
        f"| data | `sfw collect env={meta.get('env')}` (render {meta.get('render', {})}); "
        f"{cfg.get('history')} context + {cfg.get('future')} target frames per clip |",
        f"| training | {meta.get('step')} of {cfg.get('steps')} scheduled steps, batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, objective "
        f"{obj.get('mode')} (weighting {obj.get('weighting')}, t_one {obj.get('t_one')}) |",
        *(
            [
                f"| starting weights | `{cfg['init']}` (`sfw train init=`: its EMA weights, a fresh optimizer and schedule) |"
            ]
            if cfg.get("init")
            else []
        ),
        f"| hardware | {hardware} |",
        f"| training time | {wall / 60:.0f} min |" if wall else "| training time | see the run's log |",
        f"| reproduce | `{RECIPES.get(name, HOW_TO_MAKE.format(name=name))}` |",
    ]
    if report:
        from selfflow_world.evaluate import bar_markdown

        picks = [h for h in (1, 8, 16) if h <= report["horizon"]]
        lines += [
            "",
            f"Held-out evaluation: {len(report['episodes'])} rollouts of episodes collected with another "
            f"seed, {report['horizon']} frames imagined, {report['config'].get('steps')} sampler step(s) "
            "per frame (95 % intervals in the report).",
            "",
            "| predictor | "
            + " | ".join(f"PSNR @{h}" for h in picks)
            + " | "
            + " | ".join(f"SSIM @{h}" for h in picks)
            + " | "
            + " | ".join(f"state err / floor @{h}" for h in picks)
            + " |",
            "|---|" + "---|" * (3 * len(picks)),
        ]
        for pred in ("model", "copy_last"):
            psnr = report["psnr"][pred]["per_horizon"]["mean"]
            ssim = report["ssim"][pred]["per_horizon"]["mean"]
            state = report["state_probe"][pred]["relative_to_floor_per_horizon"]
            lines.append(
                f"| {pred} | "
                + " | ".join(f"{psnr[h - 1]:.2f}" for h in picks)
                + " | "
                + " | ".join(f"{ssim[h - 1]:.3f}" for h in picks)
                + " | "
                + " | ".join(f"{state[h - 1]:.2f}" for h in picks)
                + " |"
            )
        if "counterfactual" in report:
            f = report["counterfactual"]["following_ratio"]["per_horizon"]
            lines += [
                "",
                "Action-following ratio (model change / simulator change under alternative actions; "
                "1 = like the simulator, 0 = ignores its actions): "
                + ", ".join(
                    f"@{h} {f['mean'][h - 1]:.2f} [{f['low'][h - 1]:.2f}, {f['high'][h - 1]:.2f}]"
                    for h in picks
                )
                + ".",
            ]
            e = report["counterfactual"]["following_ratio"]["effect_error_per_horizon"]
            lines.append("")
            lines.append(
                "Action effect error (0 = the simulator's change exactly, 1 = none, above 1 = a wrong one): "
                + ", ".join(f"@{h} {e[h - 1]:.2f}" for h in picks)
                + "."
            )
        lines += bar_markdown(report)
    if heads:
        lines += heads_lines(heads)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m selfflow_world.pretrained RUN DEST [--report report.json] [--hardware TEXT]``."""
    import argparse
    import platform

    from selfflow_world.checkpoint import read_meta, resolve_checkpoint

    parser = argparse.ArgumentParser(description="export a training run as a shipped model directory")
    parser.add_argument("run", help="run or checkpoint directory")
    parser.add_argument("dest", help="the model directory to write, e.g. selfflow_world/models/reacher-easy")
    parser.add_argument("--report", help="report.json of its held-out evaluation")
    parser.add_argument(
        "--hardware", default=f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    )
    parser.add_argument(
        "--train-minutes", type=float, help="training wall-clock, for runs whose checkpoints predate wall_s"
    )
    args = parser.parse_args(argv)
    src = resolve_checkpoint(args.run)
    meta = read_meta(src)
    heads = json.loads((src / HEADS_META).read_text()) if (src / HEADS_META).is_file() else None
    if args.train_minutes is not None:
        meta.setdefault("metrics", {})["wall_s"] = 60 * args.train_minutes
    report = json.loads(Path(args.report).read_text()) if args.report else None
    dest = export(
        args.run, args.dest, card=model_card(Path(args.dest).name, meta, report, args.hardware, heads)
    )
    size = (dest / "weights.safetensors").stat().st_size / 2**20
    print(f"wrote {dest} ({size:.1f} MiB of weights)")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
