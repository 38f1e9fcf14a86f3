"""The rollout KV cache: per-layer keys and values of the history frames in a ring of frame slots."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Per-layer keys and values of history frames for rollouts (see :meth:`~selfflow_world.model.WorldDiT.append`).

    Holds at most ``window`` frames; the oldest are dropped first. Each layer keeps one preallocated
    ring of ``window + 1`` frame slots, ``keys[l]``, ``values[l]`` of shape
    ``(B, heads, (window + 1) * L, head_dim)``: the cached frames plus the slot ``slot`` where the
    frame being predicted writes its keys and values (and stays, once appended). Sampling a frame
    thus writes only that frame's tokens instead of concatenating the whole history at every step.
    Keys are rotated by their absolute frame index, and a single new frame attends to all cached
    frames, so the ring's order does not matter there; :meth:`history` gives it oldest first.
    ``start`` is the absolute index of the oldest cached frame; ``last`` the most recently appended
    frame ``(B, C, H, W)``, the previous frame of the next one. ``valid``: None, or ``(B, window + 1)``
    booleans, False where a row must not attend to a slot (rows restarted from a shorter context,
    :func:`~selfflow_world.rollout.restart`, until new frames overwrite the old trajectory's slots).
    """

    batch: int
    window: int
    tokens: int  # L, tokens per frame
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    start: int = 0
    frames: int = 0
    slot: int = 0
    last: Tensor | None = None
    valid: Tensor | None = None

    def key_mask(self) -> Tensor | None:
        """The attention mask ``(B, 1, 1, (frames + 1) * L)`` of one new frame over the used slots
        (True = attend), or None when every row may attend to every cached frame."""
        if self.valid is None:
            return None
        mask = self.valid.clone()
        mask[:, self.slot] = True  # the new frame itself
        return mask[:, : self.frames + 1].repeat_interleave(self.tokens, dim=1)[:, None, None]

    @property
    def next_index(self) -> int:
        """Absolute frame index of the next frame to predict or append."""
        return self.start + self.frames

    def history(self, layer: int) -> tuple[Tensor, Tensor]:
        """Cached keys and values of ``layer``, oldest frame first, ``(B, heads, frames * L, d)``."""
        slots = self.window + 1
        order = [(self.slot - self.frames + i) % slots for i in range(self.frames)]
        return tuple(  # type: ignore[return-value]
            ring.unflatten(2, (slots, self.tokens))[:, :, order].flatten(2, 3)
            for ring in (self.keys[layer], self.values[layer])
        )

    def access(self, layer: int, count: int) -> LayerAccess:
        """How one block reads and writes ``layer`` when ``count`` new frames pass through it."""
        direct = count == 1 and layer < len(self.keys)  # a single frame, once the ring exists
        if not direct:
            return LayerAccess(self, layer, None)
        lo = self.slot * self.tokens
        return LayerAccess(
            self,
            layer,
            tuple(ring[:, :, lo : lo + self.tokens] for ring in (self.keys[layer], self.values[layer])),
        )

    def _used(self, layer: int) -> tuple[Tensor, Tensor]:
        # one new frame in ``slot``: the cached frames (at most ``window``) and it; until the ring
        # first fills, those are the slots 0..frames, the new one last
        used = (self.frames + 1) * self.tokens
        return self.keys[layer][:, :, :used], self.values[layer][:, :, :used]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values that the new tokens ``k, v (B, heads, n * L, d)`` of ``layer`` attend to: the
        cached frames and themselves. Writes them into the ring from ``slot`` on; :meth:`~selfflow_world.model.WorldDiT.append`
        then advances the state (a :meth:`~selfflow_world.model.WorldDiT.step` leaves it, so its frame stays scratch)."""
        length, slots = self.tokens, self.window + 1
        if layer == len(self.keys):  # first use: allocate this layer's ring
            shape = (*k.shape[:2], slots * length, k.shape[3])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        key_ring, value_ring = self.keys[layer], self.values[layer]
        count = k.shape[2] // length
        if count > 1:  # a clip: attend in time order (with the caller's mask), then store
            past_k, past_v = self.history(layer)
            keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        for i in range(count):
            lo = ((self.slot + i) % slots) * length
            key_ring[:, :, lo : lo + length] = k[:, :, i * length : (i + 1) * length]
            value_ring[:, :, lo : lo + length] = v[:, :, i * length : (i + 1) * length]
        return (keys, values) if count > 1 else self._used(layer)


@dataclass
class LayerAccess:
    """One block's use of one cache layer in one call (:meth:`KVCache.access`).

    ``out``: the ring slot ``(B, heads, L, d)`` keys and values where the block writes its new frame's
    keys/values itself (a single frame into an existing ring), so a compiled block stores them from
    the kernel that computes them instead of in a separate copy; None when the cache stores them.
    Called with the new keys/values (None, None when written to ``out``), it returns everything
    they attend to.
    """

    cache: KVCache
    layer: int
    out: tuple[Tensor, Tensor] | None

    def __call__(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.out is None:
            return self.cache.extend(self.layer, k, v)
        return self.cache._used(self.layer)
