"""Imagination throughput against the simulator, in one run.

Prints imagined frames/s for batch 1, 16, 64 and sampler steps 1, 4, 8 (Euler, KV-cached rollout;
median of ``--repeats`` timed rollouts per cell), against the simulator's ``env.step`` + render
frames/s for the same env, timed in every cell between the rollouts; and the time of frame 32 over
the time of frame 4 in one rollout (about 1 when the KV cache keeps the cost per frame flat).

    python bench/bench_imagine.py                       # fresh `small` model (same compute as trained)
    python bench/bench_imagine.py --ckpt runs/reacher   # a trained checkpoint
    python bench/bench_imagine.py --compile             # + torch.compile'd rollouts (WorldModel compile=True)
    python bench/bench_imagine.py --compile --freeze no # ... with graphs shared by the blocks (CPU default: frozen)

A compiled variant is warmed up on each shape before it is timed (its compile time is printed).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch


class Simulator:
    """One env process stepping with random actions and rendering: the frames/s to beat."""

    def __init__(self, env_name: str, size: int) -> None:
        from selfflow_world.envs import make

        self.env = make(env_name, size=size)
        self.env.reset(seed=0)
        self.rng = np.random.default_rng(0)

    def fps(self, frames: int) -> float:
        env = self.env
        start = time.perf_counter()
        for _ in range(frames):
            action = self.rng.uniform(env.action_space.low, env.action_space.high)
            _, _, term, trunc, _ = env.step(action)
            if term or trunc:
                env.reset()
        return frames / (time.perf_counter() - start)

    def close(self) -> None:
        self.env.close()


def build_model(args, device):
    from selfflow_world import WorldModel
    from selfflow_world.model import WorldDiT, model_config

    if args.ckpt:
        return WorldModel.load(args.ckpt, device=device, bf16=False).model  # float32; cast below
    cfg = model_config(args.model, image_size=args.size, action_dim=2, max_frames=args.history + 1)
    model = WorldDiT(cfg).to(device).eval()
    with torch.no_grad():  # live weights (a fresh model zeroes its modulation and output): same
        for param in model.parameters():  # compute, but a compiled rollout has something to match
            param.normal_(0.0, 0.02)
    return model


@torch.no_grad()
def max_difference(a, b, batch: int, steps: int, history: int, device, bf16: bool) -> float:
    """Largest pixel difference between two models' rollouts from the same inputs and noise."""
    from selfflow_world.runtime import autocast
    from selfflow_world.sampler import rollout

    size, act = a.config.image_size, a.config.action_dim
    inputs = torch.Generator(device).manual_seed(1)
    ctx = torch.rand(batch, history, 3, size, size, device=device, generator=inputs) * 2 - 1
    ctx_a = torch.zeros(batch, history, act, device=device)
    acts = torch.rand(batch, 4, act, device=device, generator=inputs) * 2 - 1
    outs = []
    for net in (a, b):
        with autocast(device, bf16):
            gen = torch.Generator(device).manual_seed(0)
            outs.append(rollout(net, ctx, ctx_a, acts, steps=steps, generator=gen).float())
    return (outs[0] - outs[1]).abs().max().item()


@torch.no_grad()
def imagine_fps(model, batch: int, steps: int, horizon: int, history: int, device, bf16: bool) -> float:
    from selfflow_world.runtime import autocast
    from selfflow_world.sampler import rollout

    size, a = model.config.image_size, model.config.action_dim
    gen = torch.Generator(device).manual_seed(0)
    ctx = torch.rand(batch, history, 3, size, size, device=device) * 2 - 1
    ctx_a = torch.zeros(batch, history, a, device=device)
    acts = torch.rand(batch, horizon, a, device=device) * 2 - 1
    with autocast(device, bf16):
        rollout(model, ctx, ctx_a, acts[:, :1], steps=steps, generator=gen)  # warm-up
        _sync(device)
        start = time.perf_counter()
        rollout(model, ctx, ctx_a, acts, steps=steps, generator=gen)
        _sync(device)
    return batch * horizon / (time.perf_counter() - start)


@torch.no_grad()
def per_frame_times(
    model, batch: int, steps: int, horizon: int, history: int, device, bf16: bool
) -> list[float]:
    from selfflow_world.runtime import autocast
    from selfflow_world.sampler import sample_next

    size, a = model.config.image_size, model.config.action_dim
    gen = torch.Generator(device).manual_seed(0)
    cache = model.init_cache(batch)
    model.append(
        cache,
        torch.rand(batch, history, 3, size, size, device=device),
        torch.zeros(batch, history, a, device=device),
    )
    times = []
    for _ in range(horizon):
        action = torch.rand(batch, a, device=device)
        _sync(device)
        start = time.perf_counter()
        with autocast(device, bf16):
            frame = sample_next(model, cache, action, steps=steps, generator=gen)
            model.append(cache, frame, action)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--model", default="small")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--history", type=int, default=2)
    p.add_argument("--env", default="dmc/reacher-easy")
    p.add_argument("--horizon", type=int, default=8, help="frames per timed rollout")
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts per cell (median reported)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--steps", default="1,4,8")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time compiled rollouts of WorldModel's default precision",
    )
    p.add_argument(
        "--freeze",
        default="auto",
        choices=["auto", "yes", "no"],
        help="compiled variant with the weights frozen into the graphs (auto: as WorldModel, on CPU)",
    )
    p.add_argument(
        "--sim-frames", type=int, default=100, help="simulator frames per timing (one per repeat and cell)"
    )
    p.add_argument(
        "--precision",
        default="both",
        choices=["both", "float32", "bf16"],
        help="both: float32 and, where native, bf16 autocast",
    )
    args = p.parse_args()
    from selfflow_world.runtime import (
        bf16_supported,
        casts_weights,
        freezes_compiled,
        resolve_device,
        tune_allocator,
    )

    device = resolve_device(args.device)
    model = build_model(args, device)
    sim = Simulator(args.env, model.config.image_size)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: {args.ckpt or args.model} ({params:.2f}M params, {model.config.tokens_per_frame} tokens/frame), "
        f"context {args.history}, window {model.config.max_frames - 1}"
    )
    tune_allocator()  # as WorldModel.load does on CPU
    batches = [int(b) for b in args.batches.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    native = bf16_supported(device)
    variants = [("float32", model, False)]
    default = 0  # the variant WorldModel runs: bf16 weights on such CPUs, autocast on CUDA
    if native and args.precision in ("both", "bf16"):
        variants.append(("bf16 autocast", model, True))
        default = 1
        if casts_weights(device):
            variants.append(("bf16 weights", copy.deepcopy(model).to(torch.bfloat16), False))
            default = 2
    if args.precision == "bf16":
        variants, default = variants[1:], default - 1
    label, net, bf16 = variants[default]
    variants[default] = (f"{label} (WorldModel's default here)", net, bf16)
    if args.compile:
        label, net, bf16 = variants[default]
        compiled = copy.deepcopy(net)
        freeze = args.freeze == "yes" or (args.freeze == "auto" and freezes_compiled(device))
        compiled.compile_rollouts(freeze=freeze)
        start = time.perf_counter()
        for b in batches:  # compile every shape timed below, outside the timing
            imagine_fps(compiled, b, 1, 2, args.history, device, bf16)
        per_frame_times(compiled, 16, 1, 2, args.history, device, bf16)
        print(f"compiling {label} rollouts for batches {batches}: {time.perf_counter() - start:.1f} s")
        diff = max_difference(net, compiled, 4, 4, args.history, device, bf16)
        print(
            f"compiled vs eager rollout, batch 4, 4 frames, 4 steps: max pixel difference {diff:.4f} (range [-1, 1])"
        )
        variants.append((f"{label.split(' (')[0]}, compiled{' (frozen)' if freeze else ''}", compiled, bf16))
    # this VM's speed drifts by 10-30 % within minutes (the simulator renders with both cores too),
    # so each cell interleaves the simulator and every variant, and its ratio uses the simulator
    # timings taken in that cell
    sim.fps(args.sim_frames)  # warm-up
    results, sims, all_sims = {}, {}, []
    for b in batches:
        for s in steps_list:
            runs = {label: [] for label, _, _ in variants}
            cell_sims = []
            for _ in range(args.repeats):
                cell_sims.append(sim.fps(args.sim_frames))
                for label, net, bf16 in variants:
                    runs[label].append(imagine_fps(net, b, s, args.horizon, args.history, device, bf16))
            for label, fps in runs.items():
                results[label, b, s] = float(np.median(fps))
            sims[b, s] = float(np.median(cell_sims))
            all_sims += cell_sims
    sim.close()
    for label, net, bf16 in variants:
        results[label, "times"] = per_frame_times(net, 16, 4, 32, args.history, device, bf16)
    print(
        f"simulator {args.env} env.step + render, one process: median {np.median(all_sims):.1f} "
        f"frames/s (range {min(all_sims):.1f}-{max(all_sims):.1f} over {len(all_sims)} timings of "
        f"{args.sim_frames} frames, interleaved with the imagination runs)"
    )
    for label, _, _ in variants:
        header = " ".join(f"{f'steps={s}':>18s}" for s in steps_list)
        print(f"{label}\n{'':14s} {'batch':>6s} {header}   (imagined frames/s, x the simulator in that cell)")
        for b in batches:
            cells = [
                f"{results[label, b, s]:9.1f} ({results[label, b, s] / sims[b, s]:5.2f}x)" for s in steps_list
            ]
            print(f"{'':14s} {b:6d} " + " ".join(f"{c:>18s}" for c in cells))
        times = results[label, "times"]
        print(
            f"{'':14s} one rollout, batch 16, 4 steps: frame 4 {times[3] * 1e3:.1f} ms, "
            f"frame 32 {times[31] * 1e3:.1f} ms, ratio {times[31] / times[3]:.2f} (flat cost per frame: ~1)"
        )


if __name__ == "__main__":
    main()
