"""Where the time of an imagined rollout goes: the top operators (and, on CUDA, kernels).

Profiles one KV-cached rollout of a fresh model (the compute of a trained one) in WorldModel's
precision (bf16 weights on CPUs with native bf16, bf16 autocast on CUDA; ``--float32``) with
``torch.profiler`` after a warm-up, and prints the operators by self time.

    python bench/profile_imagine.py --batch 64 --steps 4                 # CPU, WorldModel's bf16 where native
    python bench/profile_imagine.py --device cuda --batch 1024 --steps 4
    python bench/profile_imagine.py --compile                            # torch.compile'd rollouts
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from selfflow_world.model import WorldDiT, model_config
from selfflow_world.runtime import (
    autocast,
    bf16_supported,
    casts_weights,
    freezes_compiled,
    resolve_device,
    tune_allocator,
)
from selfflow_world.sampler import rollout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int, default=4, help="imagined frames in the profiled rollout")
    p.add_argument("--history", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--float32", action="store_true", help="float32 instead of bf16")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="profile compiled rollouts (compile_rollouts)")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_allocator()
    cfg = model_config(args.model, image_size=64, action_dim=2, max_frames=args.history + 1)
    model = WorldDiT(cfg).to(device).eval()
    with torch.no_grad():  # live weights everywhere (a fresh model zeroes its modulation)
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    bf16 = not args.float32 and bf16_supported(device)
    if bf16 and casts_weights(device):  # as WorldModel does
        model = model.to(torch.bfloat16)
    if args.compile:
        model.compile_rollouts(freeze=freezes_compiled(device))  # as WorldModel does
    gen = torch.Generator(device).manual_seed(0)
    ctx = torch.rand(args.batch, args.history, 3, 64, 64, device=device) * 2 - 1
    ctx_actions = torch.zeros(args.batch, args.history, 2, device=device)
    actions = torch.rand(args.batch, args.frames, 2, device=device) * 2 - 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    precision = "float32" if not bf16 else "bf16 weights" if casts_weights(device) else "bf16 autocast"
    with torch.no_grad(), autocast(device, bf16 and precision == "bf16 autocast"):
        for _ in range(2 if args.compile else 1):  # warm-up (compiled: every cache fill of the rollout)
            rollout(model, ctx, ctx_actions, actions, steps=args.steps, generator=gen)
        with profile(activities=activities) as prof:
            rollout(model, ctx, ctx_actions, actions, steps=args.steps, generator=gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"{args.model}, batch {args.batch}, {args.steps} steps, {args.frames} frames, {precision}"
        f"{', compiled' if args.compile else ''} on {device}"
    )
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
