"""Training-step cost of the three objectives, side by side, on one model and one batch.

Runs ``flow``, ``dts`` and ``selfflow`` on the same preset and batch through the real trainer step
(loss, backward, clip, AdamW, EMA), each in its own process so that peak memory is per mode.
Prints steps/s, tokens/s, peak memory, and the cost ratio selfflow/flow (target <= 1.35).
On CUDA it uses bf16 autocast and also reports achieved TFLOP/s (FLOPs counted by
torch.utils.flop_counter) against the peak you pass with --peak-tflops.

    python bench/bench_train.py --model small --batch 16 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("MUJOCO_GL", "egl")


def make_data(root: str, size: int) -> None:
    from selfflow_world.envs.collect import CollectConfig, collect

    collect(
        CollectConfig(env="dmc/reacher-easy", episodes=3, steps=20, size=size, out=root, workers=1),
        progress=False,
    )


def run_mode(args: argparse.Namespace) -> dict:
    import torch

    from selfflow_world.config import load_config
    from selfflow_world.train import TrainConfig, Trainer, to_model_batch

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            "train",
            [
                f"data={args.data}",
                f"out={tmp}/run",
                f"model={args.model}",
                f"objective={args.mode}",
                f"batch_size={args.batch}",
                f"device={args.device}",
                "tensorboard=false",
                "val_fraction=0",
                f"history={args.history}",
                f"future={args.future}",
                f"compile={str(args.compile).lower()}",
            ],
            TrainConfig,
        )
        trainer = Trainer(cfg)
        raw = next(iter(trainer._loader()))
        batch = to_model_batch(raw, trainer.device)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        for _ in range(args.warmup):
            trainer.train_step(batch)
        sync()
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(batch)
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        flops = None
        if args.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                trainer.train_step(batch)
            flops = counter.get_total_flops()
        tokens = batch["frames"].shape[0] * batch["frames"].shape[1] * trainer.model_cfg.tokens_per_frame
        peak = (
            torch.cuda.max_memory_allocated()
            if trainer.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        return {
            "mode": args.mode,
            "s_per_step": seconds,
            "steps_per_s": 1 / seconds,
            "tokens_per_s": tokens / seconds,
            "peak_mb": peak / 2**20,
            "flops_per_step": flops,
            "device": str(trainer.device),
            "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--history", type=int, default=2)
    p.add_argument("--future", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode; the fastest counts")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--count-flops", action="store_true", help="count FLOPs of one step (default on CUDA)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the card's bf16 dense peak, for utilisation"
    )
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # child process: one mode
        print(json.dumps(run_mode(args)))
        return
    import torch

    if args.device == "auto" and torch.cuda.is_available():
        args.count_flops = True
    with tempfile.TemporaryDirectory() as tmp:
        size = 16 if args.model == "tiny" else 64
        make_data(f"{tmp}/data", size)
        rounds: dict[str, list[dict]] = {}
        for mode in ("flow", "dts", "selfflow") * args.rounds:  # alternate modes, keep each one's best round
            cmd = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--data",
                f"{tmp}/data",
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                "--history",
                str(args.history),
                "--future",
                str(args.future),
            ]
            cmd += ["--compile"] if args.compile else []
            cmd += ["--count-flops"] if args.count_flops else []
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            rounds.setdefault(mode, []).append(json.loads(out))
        results = [min(r, key=lambda x: x["s_per_step"]) for r in rounds.values()]
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"device {results[0]['device']}"
    )
    print(
        f"preset {args.model} ({results[0]['params_m']:.2f}M params), batch {args.batch}, "
        f"clip {args.history}+{args.future} frames, {args.steps} timed steps after {args.warmup} warm-up, "
        f"best of {args.rounds} alternating rounds (a process per mode and round), bf16 where native"
    )
    print(f"{'mode':10s} {'s/step':>8s} {'steps/s':>8s} {'tokens/s':>10s} {'peak MB':>8s} {'TFLOP/s':>8s}")
    for r in results:
        tflops = r["flops_per_step"] / r["s_per_step"] / 1e12 if r["flops_per_step"] else None
        r["tflops"] = tflops
        print(
            f"{r['mode']:10s} {r['s_per_step']:8.3f} {r['steps_per_s']:8.2f} {r['tokens_per_s']:10.0f} "
            f"{r['peak_mb']:8.0f} {'' if tflops is None else f'{tflops:8.2f}'}"
        )
    flow = results[0]["s_per_step"]
    for r in results[1:]:
        print(
            f"cost {r['mode']}/flow: {r['s_per_step'] / flow:.2f}x"
            + (" (target <= 1.35)" if r["mode"] == "selfflow" else "")
        )
    if args.peak_tflops and results[-1]["tflops"]:
        print(
            f"selfflow utilisation: {results[-1]['tflops'] / args.peak_tflops:.1%} of {args.peak_tflops} TFLOP/s"
        )


if __name__ == "__main__":
    main()
