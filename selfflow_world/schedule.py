"""The training schedule as pure functions of ``(seed, step)``: the learning-rate factor and the
order in which examples are drawn, so that a resumed run continues the exact same curve."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n: int, batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Dataset indices of ``step``'s batch on ``rank``: a pure function of (seed, step).

    The stream is epoch after epoch of seeded permutations of ``range(n)``; each step takes
    ``batch * world`` consecutive entries and this rank the ``rank``-th share.
    """
    per_step = batch * world
    first = step * per_step + rank * batch
    out = []
    for pos in range(first, first + batch):
        epoch, offset = divmod(pos, n)
        perm = _permutation(n, seed, epoch)
        out.append(int(perm[offset]))
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of ``range(n)`` in ``epoch`` (cached: consecutive steps share an epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler yielding :func:`batch_indices` for steps ``start, start+1, ..., total-1``."""

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1):
        self.args = (n, batch, seed, rank, world)
        self.start, self.total = start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        n, batch, seed, rank, world = self.args
        for step in range(self.start, self.total):
            yield batch_indices(n, batch, step, seed, rank, world)
