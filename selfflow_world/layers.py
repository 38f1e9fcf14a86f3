"""Building blocks of the video DiT: positions, attention and adaLN-Zero blocks.

Shapes: ``B`` batch, ``N`` tokens (frame-major), ``D`` width, ``h`` heads, ``d`` head dim.
Conditioning is per token, ``c`` of shape ``(B, N, D)``, so every block modulates each token with its
own noise level and action.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class KVSource(Protocol):
    """A rollout cache as one block sees it (:class:`~selfflow_world.cache.LayerAccess`): ``out``,
    where the block writes its new keys/values ``(B, h, N, d)`` itself (or None), and a call mapping
    the new keys/values (None, None once written to ``out``) to everything they attend to
    ``(B, h, M + N, d)``."""

    out: tuple[Tensor, Tensor] | None

    def __call__(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor]: ...


def sincos_2d(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos positions at unit scale, ``(height * width, dim)``, row-major.

    The first half of the channels encodes the row, the second half the column. ``dim % 4 == 0``.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1).to(torch.float64) * omega  # (hw, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (hw, dim/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (hw, dim)


def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Rotary tables for integer positions ``(N,)``: ``cos, sin`` each ``(N, head_dim)``.

    Used over the frame index only, so attention scores depend on relative frame offsets.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (N, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (N, d)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (B, h, N, d)`` by the tables ``(N, d)`` (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def frame_mask(query_frames: Tensor, key_frames: Tensor, window: int | None = None) -> Tensor:
    """Block-causal attention mask ``(Nq, Nk)`` from frame indices: True where a query may attend.

    A token attends to every token of its own frame and of earlier frames; with ``window`` only to
    frames at most ``window`` frames back.
    """
    offset = query_frames[:, None] - key_frames[None, :]  # (Nq, Nk)
    mask = offset >= 0
    if window is not None:
        mask = mask & (offset <= window)
    return mask


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned gain (used on queries and keys)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # the fused kernel (statistics in float32); the output keeps the input's dtype, so bf16
        # queries and keys stay bf16 under autocast (faster than the composed ops on CPU, BENCHMARKS.md)
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and temporal RoPE, in two halves: :meth:`project` (the
    queries, keys and values of the new tokens) and :meth:`output`; :class:`Block` attends in between,
    over cached keys/values too in a rollout."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.q_norm = RMSNorm(width // heads)
        self.k_norm = RMSNorm(width // heads)

    def output(self, heads: Tensor) -> Tensor:
        """The heads' outputs ``(B, h, N, d)`` merged and projected, ``(B, N, D)``."""
        return self.proj(rearrange(heads, "b h n d -> b n (h d)"))

    def project(
        self, x: Tensor, cos: Tensor, sin: Tensor, queries: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Normalised, rotated queries and keys and the values of ``x``'s tokens, each ``(B, h, N, d)``;
        ``queries=False`` skips the query third of the projection (and returns None for it)."""
        width = x.shape[-1]
        if queries:
            qkv = self.qkv(x)
        else:
            qkv = F.linear(x, self.qkv.weight[width:], self.qkv.bias[width:])
        *q, k, v = rearrange(qkv, "b n (p h d) -> p b h n d", h=self.heads, d=width // self.heads)
        cos, sin = cos.to(k.dtype), sin.to(k.dtype)
        k = apply_rope(self.k_norm(k), cos, sin)
        return (apply_rope(self.q_norm(q[0]), cos, sin) if queries else None), k, v


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax attention ``(B, h, Nq, d)`` over ``(B, h, Nk, d)`` keys/values (mask: True = attend).

    ``scaled_dot_product_attention`` everywhere, except bf16 inference on CPU: there two batched
    matmuls around a softmax (which accumulates in float32 internally) replace it, because at rollout
    shapes (one frame's queries over a few frames of keys) they beat its CPU flash kernel with the same
    error against a float32 reference, the rounding of the bf16 output (BENCHMARKS.md).
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # scaling the queries is the cheaper side
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation, per token: all of shape ``(B, N, D)``."""
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift in one pass over x


def _store(k: Tensor, v: Tensor, out: tuple[Tensor, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
    """Write keys/values into ``out`` (a rollout cache's slot) if given; what the caller returns."""
    if out is None:
        return k, v
    out[0].copy_(k)
    out[1].copy_(v)
    return None, None


class Block(nn.Module):
    """Transformer block with per-token adaLN-Zero: shift, scale and gate come from ``c (B, N, D)``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str = "gelu_tanh") -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        gelu = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.mlp = nn.Sequential(nn.Linear(width, hidden), gelu, nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        past: KVSource | None = None,
    ) -> Tensor:
        """``x, c (B, N, D) -> (B, N, D)``.

        ``cos, sin (N, d)`` rotate the new queries and keys; ``mask (N, M + N)`` or None; ``past``
        (a rollout cache, :class:`KVSource`) stores the new keys/values and gives all keys/values to
        attend to ``(B, h, M + N, d)``.

        Two stages around the attention's keys/values (where a rollout cache reads and writes):
        :meth:`attention_inputs` and :meth:`finish`, pure tensor functions, so that
        :meth:`~selfflow_world.model.WorldDiT.compile_rollouts` can compile them around the cache.
        """
        q, k, v, mods = self.attention_inputs(x, c, cos, sin, None if past is None else past.out)
        keys, values = (k, v) if past is None else past(k, v)
        return self.finish(x, q, keys, values, mask, mods)

    def attention_inputs(
        self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor, out: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, tuple[Tensor, ...]]:
        """Queries, keys and values ``(B, h, N, d)`` of ``x``'s tokens, and the modulation the rest
        of the block needs (``gate1, shift2, scale2, gate2``, each ``(B, N or 1, D)``). With ``out``,
        the keys and values are written there and returned as None."""
        shift1, scale1, *mods = self.modulation(c).chunk(6, dim=-1)  # (B, N, D) each
        q, k, v = self.attn.project(modulate(self.norm1(x), shift1, scale1), cos, sin)
        k, v = _store(k, v, out)
        return q, k, v, tuple(mods)

    def finish(
        self,
        x: Tensor,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None,
        mods: tuple[Tensor, ...],
    ) -> Tensor:
        """The block's output from its queries, everything they attend to, and the modulation."""
        gate1, shift2, scale2, gate2 = mods
        attended = self.attn.output(attention(q, keys.to(q.dtype), values.to(q.dtype), mask))
        x = torch.addcmul(x, gate1, attended)  # x + gate1 * attended, one pass
        return torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))

    def key_values(
        self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor, out: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Only this block's rotated keys/values of ``x``'s tokens, ``(B, h, N, d)`` each: what
        appending a frame to a rollout cache needs from the last block (a quarter of its work).
        With ``out``, written there and returned as None."""
        shift1, scale1 = self.modulation(c)[..., : 2 * x.shape[-1]].chunk(2, dim=-1)
        _, k, v = self.attn.project(modulate(self.norm1(x), shift1, scale1), cos, sin, queries=False)
        return _store(k, v, out)

    def zero_init(self) -> None:
        """Zero the modulation so the fresh block is the identity."""
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)


class FinalLayer(nn.Module):
    """Per-token adaLN (shift, scale) and a linear map from width to one patch of pixels."""

    def __init__(self, width: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x, c (B, N, D) -> (B, N, patch_dim)``."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

    def zero_init(self) -> None:
        """Zero modulation and output so a fresh model predicts exactly zero."""
        for layer in (self.modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
