"""Does the stateful rollout API cost speed? Side by side in one process, interleaved.

Times, on the same model, inputs and noise, imagined frames/s of
  primitives: ``init_cache`` / ``append`` / ``sample_next`` written out (the path before the API),
  rollout:    ``sampler.rollout`` (a loop over ``selfflow_world.rollout.start`` / ``advance``),
  wm.step:    ``WorldModel.start`` + ``WorldModel.step`` per frame (env units, layout, precision),
with the three variants alternating in every repeat, so load on the machine hits them alike; prints
the median per variant and its ratio to the primitives.

    python bench/bench_rollout_api.py --ckpt reacher-easy --batch 64 --steps 1,4
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="reacher-easy")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", default="1,4")
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    from selfflow_world.runtime import autocast, resolve_device
    from selfflow_world.sampler import rollout, sample_next
    from selfflow_world.world_model import WorldModel

    device = resolve_device(args.device)
    wm = WorldModel.load(args.ckpt, device=device)
    model, cfg = wm.model, wm.config
    b, h, size = args.batch, wm.history, cfg.image_size
    inputs = torch.Generator().manual_seed(1)
    ctx = (torch.rand(b, h, 3, size, size, generator=inputs) * 2 - 1).to(device)
    ctx_a = torch.zeros(b, h, cfg.action_dim, device=device)
    acts = (torch.rand(b, args.horizon, cfg.action_dim, generator=inputs) * 2 - 1).to(device)
    precision = wm.bf16 and not wm.bf16_weights

    def primitives(steps: int, gen: torch.Generator) -> None:
        with autocast(device, precision):
            cache = model.init_cache(b)
            model.append(cache, ctx, ctx_a)
            for j in range(args.horizon):
                frame = sample_next(model, cache, acts[:, j], steps=steps, generator=gen)
                if j + 1 < args.horizon:
                    model.append(cache, frame, acts[:, j])

    def api(steps: int, gen: torch.Generator) -> None:
        with autocast(device, precision):
            rollout(model, ctx, ctx_a, acts, steps=steps, generator=gen)

    def wm_step(steps: int, gen: torch.Generator) -> None:
        state = wm.start(ctx, wm.denormalize_actions(ctx_a))
        for j in range(args.horizon):
            wm.step(state, acts[:, j], steps=steps, generator=gen, normalized=True)

    variants = {"primitives": primitives, "rollout": api, "wm.step": wm_step}
    print(
        f"# {args.ckpt} on {device} ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()}), "
        f"batch {b}, horizon {args.horizon}, median of {args.repeats} interleaved repeats"
    )
    print("| sampler steps | variant | frames/s | vs primitives |")
    print("|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        for fn in variants.values():  # warm-up
            fn(steps, torch.Generator(device).manual_seed(0))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                gen = torch.Generator(device).manual_seed(0)
                start = time.perf_counter()
                fn(steps, gen)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["primitives"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {steps} | {name} | {b * args.horizon / med:.1f} | {base / med:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
