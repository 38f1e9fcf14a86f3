"""Collection throughput: a bare step+render loop against `collect()` with one and two workers.

All three run the same env, render size and action repeat, and the same number of agent steps
(``--episodes`` x ``--steps``):

    bare      ``env.step`` + render in this process, random actions, a reset after each episode
              (when the env ends it or after ``--steps`` steps); env construction not timed
    collect1  ``collect(workers=1)`` into a fresh directory: env construction, policy, episode
              writes (fsync + sha256) included
    collect2  ``collect(workers=2)``: as collect1 plus spawning the worker processes

Frames/s = agent steps / wall seconds. Targets: collect1/bare >= 0.9, collect2/collect1 >= 1.6
(the second needs two idle cores: check `uptime` first). CPU ms/frame (this process and its
workers) shows the work per frame even on a busy machine, where wall-clock figures are not fair.

    python bench/bench_collect.py --episodes 16 --steps 100
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("MUJOCO_GL", "egl")


def bare(args: argparse.Namespace) -> tuple[int, float]:
    import numpy as np

    from selfflow_world.envs import make

    env = make(args.env, size=args.size)
    rng = np.random.default_rng(args.seed)
    low, high = env.action_space.low, env.action_space.high
    total = args.episodes * args.steps
    try:
        start = time.perf_counter()
        env.reset(seed=args.seed)
        in_episode = 0
        for _ in range(total):
            _, _, terminated, truncated, _ = env.step(rng.uniform(low, high).astype(np.float32))
            in_episode += 1
            if terminated or truncated or in_episode == args.steps:
                env.reset()
                in_episode = 0
        return total, time.perf_counter() - start
    finally:
        env.close()


def collected(args: argparse.Namespace, workers: int) -> tuple[int, float]:
    from selfflow_world.envs.collect import CollectConfig, collect

    with tempfile.TemporaryDirectory() as tmp:
        cfg = CollectConfig(
            env=args.env,
            episodes=args.episodes,
            steps=args.steps,
            size=args.size,
            seed=args.seed,
            workers=workers,
            out=os.path.join(tmp, "data"),
        )
        start = time.perf_counter()
        summary = collect(cfg, progress=False)
        return summary["frames"], time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (collection workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run: Callable[[], tuple[int, float]]) -> tuple[int, float, float]:
    """(agent steps, wall seconds, CPU seconds) of one run."""
    cpu = cpu_seconds()
    steps, seconds = run()
    return steps, seconds, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="dmc/reacher-easy")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from selfflow_world.envs import defaults_for

    print(
        f"machine   {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"env       {args.env} {args.size}x{args.size}, action repeat {defaults_for(args.env).action_repeat}, "
        f"{args.episodes} episodes x {args.steps} steps, MUJOCO_GL={os.environ['MUJOCO_GL']}, "
        f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS', 'unset')}"
    )
    # collect2 last: it sets LP_NUM_THREADS=1 for its workers if the caller did not choose a value
    rows = {
        "bare": measure(lambda: bare(args)),
        "collect1": measure(lambda: collected(args, 1)),
        "collect2": measure(lambda: collected(args, 2)),
    }
    rate = {name: steps / seconds for name, (steps, seconds, _) in rows.items()}
    print(f"\n{'mode':10s} {'steps':>7s} {'seconds':>8s} {'frames/s':>9s} {'CPU ms/frame':>13s}")
    for name, (steps, seconds, cpu) in rows.items():
        print(f"{name:10s} {steps:7d} {seconds:8.2f} {rate[name]:9.1f} {1e3 * cpu / steps:13.1f}")
    print(f"\ncollect1/bare     {rate['collect1'] / rate['bare']:.2f}  (target >= 0.9)")
    print(f"collect2/collect1 {rate['collect2'] / rate['collect1']:.2f}  (target >= 1.6)")


if __name__ == "__main__":
    main()
