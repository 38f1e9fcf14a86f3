"""Conditioning of the video DiT: noise levels and actions -> one vector per token (or per frame).

Every block's adaLN-Zero modulation (shift, scale, gate) and the final layer's read this vector,
``c = emb_time(t) + emb_action(a)``, so whatever decides how strongly the model can follow its
actions lives here. Each embedding is a fixed feature map followed by ``Linear - SiLU - Linear``:

- noise levels: sinusoidal features of ``t`` in [0, 1] (256 features, norm ``sqrt(128)``);
- actions (``action_embedding``):
  - ``"fourier"``: multi-scale Fourier features of the normalised action, ``cos/sin(W a)`` with 128
    fixed frequencies ``W`` (log-spaced magnitudes from 0.5 to 32 rad per unit action, along fixed
    pseudo-random directions), so the action's features have the same norm as the time features
    and its embedding starts at the same scale as the time embedding; the frequencies resolve
    small action differences, which a linear map of a 2-D action starts out blind to;
  - ``"linear"``: the raw action into the MLP (checkpoints from before the setting use it; its
    embedding starts about 15x smaller than the time embedding's).

The token path (a linear map of the action added to every token of its frame) stays in the model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTION_EMBEDDINGS = ("fourier", "linear")
FEATURES = 256  # input width of both embedding MLPs
_FREQ_SEED = 20261201  # fixes the action frequencies: the same in every process and checkpoint


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of noise levels ``t`` in [0, 1]: ``(...,) -> (..., dim)`` (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * scale * freqs  # (..., dim/2)
    return torch.cat([args.cos(), args.sin()], dim=-1)


def action_frequencies(action_dim: int, count: int = FEATURES // 2) -> Tensor:
    """The fixed frequencies ``W (count, action_dim)`` of :func:`action_features`, float32.

    Magnitudes log-spaced from 0.5 to 32, directions drawn once from a fixed seed, so they depend
    only on ``action_dim``.
    """
    g = torch.Generator().manual_seed(_FREQ_SEED + action_dim)
    directions = torch.randn(count, action_dim, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True).clamp(min=1e-12)
    magnitudes = torch.logspace(math.log10(0.5), math.log10(32.0), count, dtype=torch.float64)
    return (directions * magnitudes[:, None]).float()


def action_features(actions: Tensor, freqs: Tensor) -> Tensor:
    """``cos/sin(W a)`` of normalised actions ``(..., A) -> (..., 2 * count)``, in float32."""
    angles = actions.float() @ freqs.t()  # (..., count)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _mlp(inputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width))


class Conditioning(nn.Module):
    """``c = emb_time(t) + emb_action(a)``: levels ``(B, M)`` and actions ``(B, M, A)`` -> ``(B, M, D)``.

    ``M`` is tokens (training: each token has its own level, its frame's action) or one entry per
    frame (rollouts, where a frame's tokens share a level). The output has the dtype of the weights.
    """

    def __init__(self, width: int, action_dim: int, action_embedding: str = "fourier") -> None:
        super().__init__()
        if action_embedding not in ACTION_EMBEDDINGS:
            raise ValueError(f"action_embedding must be one of {ACTION_EMBEDDINGS}, got {action_embedding!r}")
        self.kind = action_embedding
        self.time_embed = _mlp(FEATURES, width)
        self.action_embed = _mlp(FEATURES if action_embedding == "fourier" else action_dim, width)
        # a plain attribute, not a buffer: casting the model to bf16 must not round the frequencies
        self._freqs = action_frequencies(action_dim) if action_embedding == "fourier" else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        """DiT's initialisation of the embedding MLPs: N(0, 0.02) weights, zero biases."""
        for mlp in (self.time_embed, self.action_embed):
            for layer in (mlp[0], mlp[2]):
                nn.init.normal_(layer.weight, std=0.02, generator=generator)
                nn.init.zeros_(layer.bias)

    def embed_actions(self, actions: Tensor) -> Tensor:
        """``(..., A) -> (..., D)``."""
        dtype = self.action_embed[0].weight.dtype
        if self._freqs is None:
            return self.action_embed(actions.to(dtype))
        if self._freqs.device != actions.device:
            self._freqs = self._freqs.to(actions.device)
        return self.action_embed(action_features(actions, self._freqs).to(dtype))

    def embed_levels(self, t: Tensor) -> Tensor:
        """``(...,) -> (..., D)``."""
        dtype = self.time_embed[0].weight.dtype
        return self.time_embed(timestep_embedding(t, FEATURES).to(dtype))

    def forward(self, t: Tensor, actions: Tensor) -> Tensor:
        return self.embed_levels(t) + self.embed_actions(actions)
