"""Integrators from noise to a clean next frame, and a batched frame-causal rollout.

Sampling integrates ``dx/dt = v`` from ``t = 1`` (noise) down to ``t = 0`` (clean) with all tokens of
the new frame at one shared ``t`` (no mask, teacher or projector). The history lives in the model's
KV cache, so generating frame ``n`` never recomputes frames ``< n``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfflow_world.cache import KVCache
from selfflow_world.errors import UserError
from selfflow_world.model import WorldDiT

METHODS = ("euler", "heun")


def time_grid(steps: int, device: torch.device | str) -> Tensor:
    """``steps + 1`` levels from 1 down to 0, uniform."""
    if not 1 <= steps <= 1000:
        raise UserError(f"sampler steps must be in [1, 1000], got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


@torch.no_grad()
def sample_next(
    model: WorldDiT,
    cache: KVCache,
    action: Tensor,
    *,
    steps: int = 4,
    method: str = "euler",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Generate the frame that follows the cached history under ``action``.

    Args:
        action: ``(B, A)`` normalised action that produces the new frame from ``cache.last``.
        noise: the starting noise ``(B, C, H, W)``; drawn from ``generator`` when omitted.

    Returns the clean frame ``(B, C, H, W)`` in [-1, 1] (clamped).
    """
    if method not in METHODS:
        raise UserError(f"sampler method must be one of {METHODS}, got {method!r}")
    cfg = model.config
    shape = (cache.batch, cfg.channels, cfg.image_size, cfg.image_size)
    device = action.device
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device).to(device)
    x = noise.to(action.dtype if action.is_floating_point() else torch.float32)
    grid = time_grid(steps, device)

    def velocity(x_t: Tensor, level: Tensor) -> Tensor:
        t = level.expand(cache.batch)
        pred = model.step(cache, x_t, t, action)
        return model.velocity(pred[:, None], x_t[:, None], t)[:, 0]

    for i in range(steps):
        t_now, t_next = grid[i], grid[i + 1]
        v = velocity(x, t_now)
        x_euler = x + (t_next - t_now) * v
        if method == "heun" and t_next > 0:
            x = x + (t_next - t_now) * 0.5 * (v + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x.clamp(-1.0, 1.0)


def renoise(frame: Tensor, level: float, generator: torch.Generator | None = None) -> Tensor:
    """``(1 - level) * frame + level * eps`` (``eps`` standard normal from ``generator``); the frame
    itself at level 0, with no draw."""
    if level == 0:
        return frame
    gen_device = generator.device if generator is not None else frame.device
    eps = torch.randn(frame.shape, generator=generator, device=gen_device).to(frame)
    return (1 - level) * frame + level * eps


@torch.no_grad()
def rollout(
    model: WorldDiT,
    context: Tensor,
    context_actions: Tensor,
    actions: Tensor,
    *,
    steps: int = 4,
    method: str = "euler",
    generator: torch.Generator | None = None,
    window: int | None = None,
    history_level: float = 0.0,
) -> Tensor:
    """Imagine ``T`` frames after a context, one at a time.

    Args:
        context: clean context frames ``(B, H, C, h, w)`` in [-1, 1].
        context_actions: ``(B, H, A)``, the actions that produced each context frame (row 0 may be
            zeros).
        actions: ``(B, T, A)``; ``actions[:, j]`` produces imagined frame ``j`` from the frame before.
        window: history frames kept in the KV cache (default ``max_frames - 1``).
        history_level: generated frames enter the history re-noised to this level,
            ``(1 - l) * frame + l * eps`` with fresh noise from ``generator``, and labelled with it,
            as training's ``history_noise`` presents history frames (drift stabilisation; 0: clean).

    Returns the imagined frames ``(B, T, C, h, w)`` in [-1, 1].
    """
    from selfflow_world.rollout import advance, start

    state = start(model, context, context_actions, window=window, history_level=history_level)
    frames = [
        advance(model, state, actions[:, j], steps=steps, method=method, generator=generator)
        for j in range(actions.shape[1])
    ]
    return torch.stack(frames, dim=1)
