"""Dream env throughput against the real env, in one run.

Prints agent steps/s of :class:`~selfflow_world.envs.dream.DreamVecEnv` (``--envs`` imagined
episodes in one batched model call per step, automatic restarts included: episodes of
``--horizon`` steps) for each number of envs and sampler steps, against one real env process
(``make(...)``: ``env.step`` with random actions and its render, resets included) on the same
machine, and the ratio. The real env is timed between the dream cells, so both see the same load.

    python bench/bench_dream.py                              # reacher-easy, 64 envs, 1 sampler step, CPU
    python bench/bench_dream.py --envs 16,64 --steps 1,4 --device cuda
    python bench/bench_dream.py --ckpt runs/reacher --observation frames

A model without reward heads is timed with untrained heads (the same compute) that never terminate,
so its episodes end at ``--horizon``; the model line says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch


def real_steps_per_s(env, steps: int, rng: np.random.Generator) -> float:
    """Agent steps/s of one real env stepping uniform random actions (rendering each frame)."""
    env.reset(seed=int(rng.integers(2**31 - 1)))
    start = time.perf_counter()
    for _ in range(steps):
        action = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def dream_steps_per_s(venv, iters: int, rng: np.random.Generator) -> tuple[float, float]:
    """Agent steps/s (all envs together) and ms per batched step of a dream vec env, after one
    warm-up step."""
    low, high = venv.action_space.low, venv.action_space.high
    venv.reset()
    venv.step(rng.uniform(low, high, (venv.num_envs, len(low))).astype(np.float32))  # warm-up
    _sync(venv.wm.device)
    start = time.perf_counter()
    for _ in range(iters):
        venv.step(rng.uniform(low, high, (venv.num_envs, len(low))).astype(np.float32))
    _sync(venv.wm.device)
    seconds = time.perf_counter() - start
    return venv.num_envs * iters / seconds, 1000 * seconds / iters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="reacher-easy", help="shipped model name, run or checkpoint directory")
    p.add_argument("--envs", default="64", help="dream envs per vec env, comma-separated")
    p.add_argument("--steps", default="1", help="sampler steps per imagined frame, comma-separated")
    p.add_argument("--iters", type=int, default=20, help="timed batched steps per cell")
    p.add_argument("--horizon", type=int, default=50, help="agent steps per imagined episode")
    p.add_argument("--observation", default="features", choices=["features", "frames"])
    p.add_argument("--sim-steps", type=int, default=200, help="real env steps per timing")
    p.add_argument("--device", default="cpu", help="the world model's device: cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from selfflow_world import WorldModel
    from selfflow_world.envs import make
    from selfflow_world.envs.dream import DreamVecEnv, close_env
    from selfflow_world.heads import Heads
    from selfflow_world.runtime import resolve_device

    device = resolve_device(args.device)
    wm = WorldModel.load(args.ckpt, device=device)
    note = ""
    if wm.heads is None:  # the same compute as trained heads
        heads = Heads(wm.config.width, wm.config.tokens_per_frame)
        with torch.no_grad():  # never terminate: random terminations would time restarts instead
            heads.mlp[-1].bias[1] = -20.0
        wm.heads, wm.heads_meta = heads.to(device).eval(), {"layer": wm.feature_layer}
        note = " (no heads in the model: timed with untrained heads)"
    render = wm.meta.get("render", {})
    size = wm.config.image_size
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    print(
        f"model: {args.ckpt} ({sum(q.numel() for q in wm.model.parameters()) / 1e6:.2f}M params, "
        f"{size}x{size}, {wm.config.tokens_per_frame} tokens/frame){note}; observation {args.observation}, "
        f"horizon {args.horizon}"
    )
    env = make(
        wm.meta["env"], size=size, camera=render.get("camera"), action_repeat=render.get("action_repeat")
    )
    rng = np.random.default_rng(0)
    real = [real_steps_per_s(env, args.sim_steps, rng)]
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for n in [int(e) for e in args.envs.split(",")]:
            venv = DreamVecEnv(
                wm, n, horizon=args.horizon, steps=steps, observation=args.observation, seed=0, device=device
            )
            rate, ms = dream_steps_per_s(venv, args.iters, rng)
            venv.close()
            real.append(real_steps_per_s(env, args.sim_steps, rng))
            rows.append((n, steps, rate, ms))
    close_env(env)
    sim = float(np.median(real))
    print()
    print(f"{'':34s} {'steps/s':>10s} {'ms/step':>9s} {'vs real env':>12s}")
    print(f"{'real env, 1 process':34s} {sim:10.0f} {1000 / sim:9.2f} {1.0:11.2f}x")
    for n, steps, rate, ms in rows:
        name = f"dream, {n} envs, {steps} sampler step{'s' if steps > 1 else ''}"
        print(f"{name:34s} {rate:10.0f} {ms:9.2f} {rate / sim:11.2f}x")
    print(
        f"\n(real env: median of {len(real)} timings of {args.sim_steps} steps; dream: {args.iters} batched steps, ms per batched step)"
    )


if __name__ == "__main__":
    main()
