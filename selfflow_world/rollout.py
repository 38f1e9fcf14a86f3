"""Stateful, batched imagination: start rollouts from contexts, step them frame by frame.

The one rollout path of the library: :func:`~selfflow_world.sampler.rollout` (and through it
``WorldModel.imagine``, training's sample videos and ``sfw eval``), planners and dream envs all
advance a :class:`RolloutState` with :func:`advance`. Everything here works in the model's units:
float frames ``(B, C, H, W)`` in [-1, 1] and normalised actions; :class:`~selfflow_world.world_model.WorldModel`
wraps it with env units, uint8 frames and its device/precision policy.

    state = start(model, context, context_actions)           # (B, H, C, h, w), (B, H, A)
    frame = advance(model, state, action, steps=1)           # (B, C, h, w): the next frame
    many = state.repeat(8)                                   # each row as 8 candidates
    restart(model, many, rows, new_context, new_actions)     # chosen rows start over, others go on

A generated frame enters the history (the KV cache) lazily, at the next :func:`advance` (or when its
features are asked for), so the last frame of a rollout costs no cache write. Rows restarted from a
context shorter than the history the others hold attend only to their own frames (a per-row mask of
cache slots), so a restarted row imagines exactly what a fresh rollout from that context would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from selfflow_world.cache import KVCache
from selfflow_world.errors import UserError
from selfflow_world.model import WorldDiT
from selfflow_world.sampler import renoise, sample_next


@dataclass
class RolloutState:
    """A batch of rollouts in progress: the history cache and the newest frame not yet in it.

    ``cache`` holds the history's keys/values (:class:`~selfflow_world.cache.KVCache`);
    ``pending``/``pending_action``: the last generated frame ``(B, C, H, W)`` and the action that
    produced it, appended to the cache at the next step; ``history_level``: the noise level generated
    frames enter the history with; ``imagined``: frames generated since the start, per row ``(B,)``
    (a restarted row counts from 0 again).
    """

    cache: KVCache
    imagined: Tensor
    history_level: float = 0.0
    pending: Tensor | None = None
    pending_action: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.cache.batch

    def _map_rows(self, fn) -> RolloutState:
        cache = self.cache
        new = replace(
            cache,
            keys=[fn(k) for k in cache.keys],
            values=[fn(v) for v in cache.values],
            last=None if cache.last is None else fn(cache.last),
            valid=None if cache.valid is None else fn(cache.valid),
        )
        new.batch = new.keys[0].shape[0] if new.keys else fn(self.imagined).shape[0]
        return RolloutState(
            new,
            fn(self.imagined),
            self.history_level,
            None if self.pending is None else fn(self.pending),
            None if self.pending_action is None else fn(self.pending_action),
        )

    def repeat(self, n: int) -> RolloutState:
        """Each row ``n`` times in a row (row ``i`` becomes rows ``i * n .. i * n + n - 1``): one
        context as ``n`` candidates. A new state; this one is unchanged."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"repeat count must be a positive integer, got {n!r}")
        return self._map_rows(lambda x: x.repeat_interleave(n, dim=0))

    def select(self, rows: Sequence[int] | Tensor) -> RolloutState:
        """The rows ``rows`` (indices, repeats allowed, in that order) as a new state."""
        index = _rows(rows, self.batch, self.imagined.device)
        return self._map_rows(lambda x: x.index_select(0, index.to(x.device)))


def _rows(rows: Sequence[int] | Tensor, batch: int, device: torch.device) -> Tensor:
    index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if index.numel() and (index.min() < 0 or index.max() >= batch):
        raise UserError(f"row indices must be in [0, {batch}), got {index.tolist()}")
    return index.to(device)


def start(
    model: WorldDiT,
    context: Tensor,
    context_actions: Tensor,
    *,
    window: int | None = None,
    history_level: float = 0.0,
) -> RolloutState:
    """Encode clean ``context (B, H, C, h, w)`` and its ``context_actions (B, H, A)`` (row 0: the
    action before the first context frame, zeros if unknown) into a new rollout state.

    ``window``: history frames kept (default ``max_frames - 1``); ``history_level``: generated
    frames enter the history re-noised to this level (:func:`~selfflow_world.sampler.renoise`).
    """
    if context.ndim != 5 or context.shape[1] < 1:
        raise UserError(f"context must be (B, H >= 1, C, h, w), got shape {tuple(context.shape)}")
    cache = model.init_cache(context.shape[0], window)
    if context.shape[1] > cache.window:
        raise UserError(
            f"context of {context.shape[1]} frames is longer than the rollout window ({cache.window})"
        )
    model.append(cache, context, context_actions)
    imagined = torch.zeros(context.shape[0], dtype=torch.long, device=context.device)
    return RolloutState(cache, imagined, history_level)


@torch.no_grad()
def flush(
    model: WorldDiT, state: RolloutState, generator: torch.Generator | None = None, layer: int | None = None
):
    """Append the pending frame to the history (re-noised to ``history_level``). With ``layer``,
    returns that block's hidden state of the frame's tokens ``(B, L, D)`` (clean, ``t = 0``)."""
    frame, action = state.pending, state.pending_action
    if frame is None:
        return None
    state.pending = state.pending_action = None
    level = state.history_level
    hidden = None
    if layer is not None and level > 0:  # features of the clean frame, not of its re-noised copy
        zeros = torch.zeros(state.batch, device=frame.device)
        _, got = model.step(state.cache, frame, zeros, action, return_hidden=(layer,))
        hidden = got[layer]
    want = (layer,) if layer is not None and level == 0 else ()
    got = model.append(state.cache, renoise(frame, level, generator), action, t=level, return_hidden=want)
    return got[layer] if want else hidden


@torch.no_grad()
def advance(
    model: WorldDiT,
    state: RolloutState,
    action: Tensor,
    *,
    steps: int = 4,
    method: str = "euler",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    features: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Imagine the next frame of every row under ``action (B, A)`` (normalised), in place.

    ``features``: also return block ``features``'s hidden state of the new frame's tokens
    ``(B, L, D)`` (clean, ``t = 0``: what reward heads and feature-space scores read); the frame
    then enters the history at once instead of at the next step.

    Returns the frame ``(B, C, H, W)`` in [-1, 1] (and the features).
    """
    if action.shape != (state.batch, model.config.action_dim):
        raise UserError(
            f"action must be (B={state.batch}, A={model.config.action_dim}), got shape {tuple(action.shape)}"
        )
    flush(model, state, generator)
    frame = sample_next(
        model, state.cache, action, steps=steps, method=method, generator=generator, noise=noise
    )
    state.pending, state.pending_action = frame, action
    state.imagined = state.imagined + 1
    if features is None:
        return frame
    return frame, flush(model, state, generator, layer=features)


@torch.no_grad()
def restart(
    model: WorldDiT,
    state: RolloutState,
    rows: Sequence[int] | Tensor,
    context: Tensor,
    context_actions: Tensor,
    generator: torch.Generator | None = None,
) -> None:
    """Start ``rows`` over from ``context (R, H, C, h, w)`` and ``context_actions (R, H, A)``, in place;
    the other rows continue unchanged. ``H`` may not exceed the frames the state's history holds."""
    index = _rows(rows, state.batch, state.imagined.device)
    if index.numel() == 0:
        return
    if len(set(index.tolist())) != index.numel():
        raise UserError(f"restart rows must be distinct, got {index.tolist()}")
    if context.shape[0] != index.numel() or context.ndim != 5:
        raise UserError(
            f"restart context must be (R={index.numel()}, H, C, h, w), got shape {tuple(context.shape)}"
        )
    flush(
        model, state, generator
    )  # pending frames of the other rows enter the history first (clean if level 0)
    main = state.cache
    length = context.shape[1]
    if not 1 <= length <= main.frames:
        raise UserError(
            f"restart context of {length} frames; the rollout's history holds {main.frames} "
            f"(give 1 to {main.frames} frames)"
        )
    slots = main.window + 1
    # a fresh cache for the restarted rows, laid out like the main one: its context ends right
    # before the main cache's next frame, in the same ring slots and at the same absolute indices
    sub = KVCache(batch=index.numel(), window=main.window, tokens=main.tokens)
    sub.start, sub.slot = main.next_index - length, (main.slot - length) % slots
    model.append(sub, context, context_actions)
    for layer in range(len(main.keys)):
        main.keys[layer][index] = sub.keys[layer]
        main.values[layer][index] = sub.values[layer]
    main.last[index] = sub.last.to(main.last.dtype)
    if length < main.frames:  # the rows' older slots hold another trajectory: mask them out
        if main.valid is None:
            main.valid = torch.ones(main.batch, slots, dtype=torch.bool, device=main.keys[0].device)
        own = torch.zeros(slots, dtype=torch.bool, device=main.valid.device)
        own[[(main.slot - length + i) % slots for i in range(length)]] = True
        main.valid[index] = own
    state.imagined[index] = 0
