"""The world model: a frame-causal video DiT with per-token adaLN-Zero conditioning.

Conventions (docs/conventions.md):

- Time is the noise level: ``x_t = (1 - t) * x + t * eps``, ``t = 0`` clean, ``t = 1`` pure noise;
  velocity ``v = eps - x``. Clean history frames have ``t = 0``.
- Video ``(B, T, C, H, W)`` in [-1, 1]; tokens ``(B, N, D)`` with ``N = T * L`` and
  ``L = (H / p) * (W / p)`` tokens per frame, frame-major (all of frame 0, then frame 1, ...).
- Actions ``(B, T, A)`` in [-1, 1], per frame: ``actions[:, j]`` produced frame ``j`` from frame
  ``j - 1``, so it conditions frame ``j``'s tokens.
- ``prev (B, T, C, H, W)``: the clean frame before each frame (``shift_frames``); each token gets a
  linear embedding of the same patch of its previous frame, the first frame gets zeros.

A token attends to its own frame and to earlier frames. Temporal positions are RoPE over the absolute
frame index, so scores depend on frame offsets only and cached keys stay valid when a rollout window
slides (``init_cache`` / ``append`` / ``step``).

Parameter counts are pinned by ``tests/test_model.py::test_preset_parameter_counts``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from selfflow_world.cache import KVCache
from selfflow_world.conditioning import ACTION_EMBEDDINGS, Conditioning
from selfflow_world.errors import UserError, check_positive
from selfflow_world.layers import Block, FinalLayer, frame_mask, rope_cos_sin, sincos_2d

PREDICTIONS = ("x", "v")
MLP_ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class ModelConfig:
    """Architecture of :class:`WorldDiT`. ``image_size``, ``action_dim``, ``max_frames`` come from the data."""

    image_size: int  # square frames, pixels
    patch: int  # patch side, pixels
    width: int  # token width D
    depth: int  # number of blocks
    heads: int
    action_dim: int  # A
    max_frames: int  # temporal context the model is trained for (history + targets)
    channels: int = 3
    mlp_ratio: float = 4.0
    prediction: str = "x"  # "x": clean frame, "v": velocity eps - x
    t_min: float = 0.05  # x -> v conversion divides by max(t, t_min)
    prev_frame_path: bool = True  # add a linear embedding of the previous frame's same patch
    action_input_path: bool = True  # add a linear embedding of the frame's action to its tokens
    rope_base: float = 100.0  # temporal RoPE base; frame offsets are small
    # x-prediction as "previous clean frame + predicted change": a fresh model copies the last frame,
    # so training starts from the copy-last baseline instead of a grey frame
    residual: bool = True
    # MLP activation: "gelu" (exact, erf); "gelu_tanh" is the tanh approximation that checkpoints
    # from before this setting use (its CPU kernel is ~3.5x slower than erf's)
    mlp_act: str = "gelu"
    # how actions enter the adaLN conditioning (selfflow_world.conditioning): "fourier" features at
    # the time embedding's scale, or "linear" (checkpoints from before this setting)
    action_embedding: str = "fourier"

    @classmethod
    def from_saved(cls, saved: dict[str, Any], source: object = "checkpoint") -> ModelConfig:
        """The config a checkpoint's ``meta.json`` recorded. Settings it predates take the values
        that checkpoints of its time were built with (:data:`LEGACY_DEFAULTS`), not today's."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - fields)
        if unknown:
            raise UserError(
                f"{source} has model settings this version does not know: {unknown}; it was written by "
                "a newer selfflow-world, upgrade to load it"
            )
        return cls(**{**LEGACY_DEFAULTS, **saved})

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch",
            "width",
            "depth",
            "heads",
            "action_dim",
            "max_frames",
            "channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model {name} must be a positive integer, got {value!r}")
        check_positive("model mlp_ratio", self.mlp_ratio)
        if self.image_size % self.patch:
            raise UserError(f"model image_size {self.image_size} must be divisible by patch {self.patch}")
        if self.width % self.heads or (self.width // self.heads) % 2 or self.width % 4:
            raise UserError(
                f"model width {self.width} must be divisible by 4 and by heads {self.heads}, "
                "with an even head dim"
            )
        if self.prediction not in PREDICTIONS:
            raise UserError(f"model prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0 < self.t_min <= 1:
            raise UserError(f"model t_min must be in (0, 1], got {self.t_min!r}")
        if self.residual and self.prediction != "x":
            raise UserError(
                "model residual=true needs prediction=x (it adds the previous frame to the clean-frame output)"
            )
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise UserError(f"model mlp_act must be one of {MLP_ACTIVATIONS}, got {self.mlp_act!r}")
        if not self.rope_base > 1:
            raise UserError(f"model rope_base must be > 1, got {self.rope_base!r}")
        if self.action_embedding not in ACTION_EMBEDDINGS:
            raise UserError(
                f"model action_embedding must be one of {ACTION_EMBEDDINGS}, got {self.action_embedding!r}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch) ** 2


# ModelConfig fields that come from the dataset, not from a preset or the command line
DATA_FIELDS = ("image_size", "action_dim", "max_frames")

# settings a checkpoint written before they existed was built with (ModelConfig.from_saved)
LEGACY_DEFAULTS: dict[str, Any] = {"residual": False, "mlp_act": "gelu_tanh", "action_embedding": "linear"}

# size presets: only the sizes; every other setting is ModelConfig's default
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=16, patch=4, width=32, depth=2, heads=2),  # tests
    "small": dict(image_size=64, patch=8, width=224, depth=6, heads=4),  # CPU, 64 tokens/frame
    "base": dict(image_size=64, patch=4, width=512, depth=12, heads=8),  # GPU, 256 tokens/frame
}


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides``; ``action_dim`` and ``max_frames`` must be given."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown model setting(s) {unknown}; accepted: {sorted(fields)}")
    values = {**PRESETS[name], **overrides}
    missing = [key for key in ("action_dim", "max_frames") if key not in values]
    if missing:
        raise UserError(f"model preset {name!r} needs {missing} (taken from the data)")
    return ModelConfig(**values)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def default_feature_layer(depth: int) -> int:
    """The block whose hidden state serves as the model's features (planning scores, reward heads):
    the one the Self-Flow teacher is read at by default, ``round(0.7 * depth)``."""
    return max(1, round(0.7 * depth))


def shift_frames(clean: Tensor) -> Tensor:
    """Previous frames ``(B, T, C, H, W)``: ``prev[:, 0] = 0``, ``prev[:, j] = clean[:, j - 1]``."""
    return torch.cat([torch.zeros_like(clean[:, :1]), clean[:, :-1]], dim=1)


def tokens_t(t: Tensor | float, batch: int, frames: int, tokens_per_frame: int) -> Tensor:
    """Broadcast noise levels to tokens ``(B, N)``, ``N = frames * tokens_per_frame``.

    Accepts a scalar, per-example ``(B,)``, per-frame ``(B, T)`` or per-token ``(B, N)`` levels.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    n = frames * tokens_per_frame
    if t.ndim == 0:
        return t.expand(batch, n)
    if t.shape == (batch,):
        return repeat(t, "b -> b n", n=n)
    if t.shape == (batch, n):
        return t
    if t.shape == (batch, frames):
        return repeat(t, "b t -> b (t l)", l=tokens_per_frame)
    raise ValueError(
        f"noise levels of shape {tuple(t.shape)}; expected (), ({batch},), ({batch}, {frames}) or ({batch}, {n})"
    )


def expand_t(t: Tensor | float, shape: Sequence[int], patch: int) -> Tensor:
    """Noise levels as a pixel map ``(B, T, 1, H, W)`` for video of ``shape = (B, T, C, H, W)``.

    ``t`` is anything :func:`tokens_t` accepts; each token's level covers its ``patch x patch`` pixels.
    """
    b, frames, _, height, width = shape
    gh, gw = height // patch, width // patch
    t_tok = tokens_t(t, b, frames, gh * gw)
    return repeat(t_tok, "b (t gh gw) -> b t 1 (gh ph) (gw pw)", t=frames, gh=gh, gw=gw, ph=patch, pw=patch)


def to_velocity(pred: Tensor, x_t: Tensor, t: Tensor, prediction: str, t_min: float) -> Tensor:
    """Velocity ``eps - x`` from a model output; ``t`` broadcastable to ``pred`` (e.g. ``expand_t``).

    x-prediction: ``v = (x_t - x_hat) / max(t, t_min)``; v-prediction: the output itself.
    """
    if prediction == "v":
        return pred
    return (x_t - pred) / t.clamp(min=t_min)


def to_clean(pred: Tensor, x_t: Tensor, t: Tensor, prediction: str) -> Tensor:
    """Clean-frame estimate from a model output: x-prediction as is, v-prediction ``x_t - t * v``."""
    if prediction == "x":
        return pred
    return x_t - t * pred


class WorldDiT(nn.Module):
    """Frame-causal video DiT predicting clean frames (or velocities) per token.

    ``generator`` seeds the weight initialisation (default: seed 0), so two models built from one
    config and one seed are identical.
    """

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        p, d = config.patch, config.width
        self.grid = config.image_size // p
        self.tokens_per_frame = self.grid**2
        patch_dim = config.channels * p * p
        self.patch_embed = nn.Linear(patch_dim, d)
        self.prev_embed = nn.Linear(patch_dim, d) if config.prev_frame_path else None
        self.action_in = nn.Linear(config.action_dim, d) if config.action_input_path else None
        self.register_buffer("pos", sincos_2d(self.grid, self.grid, d), persistent=False)  # (L, D)
        self.conditioning = Conditioning(d, config.action_dim, config.action_embedding)
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio, config.mlp_act) for _ in range(config.depth)
        )
        self.final = FinalLayer(d, patch_dim)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embedding MLPs, zeroed modulation and head."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
        self.conditioning.reset_parameters(generator)
        for block in self.blocks:
            block.zero_init()
        self.final.zero_init()

    # ----------------------------------------------------------------------------------------------
    # pieces shared by the full forward and the cached rollout path

    def _patchify(self, video: Tensor) -> Tensor:
        """``(B, T, C, H, W) -> (B, N, C * p * p)``, frame-major, row-major within a frame."""
        p = self.config.patch
        return rearrange(video, "b t c (gh ph) (gw pw) -> b (t gh gw) (ph pw c)", ph=p, pw=p)

    def _unpatchify(self, tokens: Tensor, frames: int) -> Tensor:
        """``(B, N, C * p * p) -> (B, T, C, H, W)``."""
        p = self.config.patch
        return rearrange(
            tokens, "b (t gh gw) (ph pw c) -> b t c (gh ph) (gw pw)", t=frames, gh=self.grid, ph=p, pw=p
        )

    def _embed(self, x: Tensor, t: Tensor | float, actions: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
        """Input tokens ``(B, N, D)`` and conditioning ``(B, N, D)``, or ``(B, 1, D)`` when shared."""
        b, frames = x.shape[:2]
        expected = (b, frames, self.config.channels, self.config.image_size, self.config.image_size)
        if tuple(x.shape) != expected or tuple(prev.shape) != expected:
            raise ValueError(
                f"x and prev must have shape {expected}, got {tuple(x.shape)}, {tuple(prev.shape)}"
            )
        if tuple(actions.shape) != (b, frames, self.config.action_dim):
            raise ValueError(
                f"actions must have shape {(b, frames, self.config.action_dim)}, got {tuple(actions.shape)}"
            )
        per_frame = "b t d -> b (t l) d"
        dtype = self.patch_embed.weight.dtype  # float32, or bf16 for a model cast for inference
        x, prev, actions = x.to(dtype), prev.to(dtype), actions.to(dtype)
        h = self.patch_embed(self._patchify(x)) + self.pos.repeat(frames, 1)  # (B, N, D)
        if self.prev_embed is not None:
            h = h + self.prev_embed(self._patchify(prev))
        if self.action_in is not None:
            h = h + repeat(self.action_in(actions), per_frame, l=self.tokens_per_frame)
        t_in = torch.as_tensor(t, dtype=torch.float32)
        if frames == 1 and t_in.numel() in (1, b) and t_in.ndim <= 1:
            # one frame at one level per example (every sampler step, every appended frame): its
            # tokens share one conditioning vector, (B, 1, D), which the blocks broadcast, so the
            # adaLN modulation is computed once per frame instead of once per token
            t_ex = t_in.reshape(-1).expand(b).to(x.device)[:, None]  # (B, 1)
            return h, self.conditioning(t_ex, actions)
        t_tok = tokens_t(t, b, frames, self.tokens_per_frame).to(x.device)  # (B, N)
        c = self.conditioning.embed_levels(t_tok)  # (B, N, D)
        c = c + repeat(self.conditioning.embed_actions(actions), per_frame, l=self.tokens_per_frame)
        return h, c

    @staticmethod
    def upgrade_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weights saved before the conditioning became its own module, under today's names."""
        renamed = {}
        for key, value in state.items():
            if key.startswith(("time_embed.", "action_embed.")):
                key = "conditioning." + key
            renamed[key] = value
        return renamed

    def _frame_ids(self, first: int, frames: int, device: torch.device) -> Tensor:
        """Absolute frame index of each token ``(frames * L,)``."""
        ids = torch.arange(first, first + frames, device=device)
        return ids.repeat_interleave(self.tokens_per_frame)

    def _trunk(
        self,
        h: Tensor,
        c: Tensor,
        query_ids: Tensor,
        mask: Tensor | None,
        past: KVCache | None = None,
        return_hidden: Sequence[int] = (),
        stop_at: int | None = None,
        store_only_last: bool = False,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run the blocks; returns the last hidden state and the requested hidden states; ``past``
        (a rollout cache) stores each block's keys/values of the new tokens. ``store_only_last``
        (appending to ``past``): the last block only computes and stores its keys/values, and the
        returned hidden state is stale."""
        depth = self.config.depth
        last = depth if stop_at is None else stop_at
        if not 1 <= last <= depth:
            raise UserError(f"stop_at must be in [1, {depth}], got {stop_at!r}")
        wanted = set(return_hidden)
        if any(not 0 <= i <= last for i in wanted):
            raise UserError(f"return_hidden indices must be in [0, {last}], got {sorted(wanted)}")
        cos, sin = rope_cos_sin(query_ids, self.config.width // self.config.heads, self.config.rope_base)
        hidden = {0: h} if 0 in wanted else {}
        count = h.shape[1] // self.tokens_per_frame
        for index, block in enumerate(self.blocks[:last], start=1):
            cached = None if past is None else past.access(index - 1, count)
            if store_only_last and index == depth and index not in wanted:
                cached(*block.key_values(h, c, cos, sin, cached.out))  # nothing reads this block's output
                break
            h = block(h, c, cos, sin, mask, cached)
            if index in wanted:
                hidden[index] = h
        return h, hidden

    # ----------------------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        actions: Tensor,
        prev: Tensor,
        *,
        return_hidden: Sequence[int] = (),
        stop_at: int | None = None,
        frame_offset: int = 0,
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]] | dict[int, Tensor]:
        """Predict every frame of a clip at once.

        Args:
            x: noisy frames ``(B, T, C, H, W)``, ``T <= max_frames``.
            t: noise levels, per example ``(B,)``, per frame ``(B, T)`` or per token ``(B, N)``.
            actions: ``(B, T, A)``, ``actions[:, j]`` produced frame ``j``.
            prev: clean previous frames ``(B, T, C, H, W)``, usually ``shift_frames(clean)``.
            return_hidden: block indices ``l`` whose output (hidden state after the ``l``-th block,
                ``(B, N, D)``; 0 is the input embedding) to return as well.
            stop_at: stop after block ``k`` and return only ``{l: hidden}`` (a teacher forward).
            frame_offset: absolute index of the first frame (only relative offsets matter).

        Returns:
            the prediction ``(B, T, C, H, W)`` (clean frame or velocity, ``config.prediction``);
            ``(prediction, hidden)`` when ``return_hidden`` is given; ``hidden`` when ``stop_at`` is.
        """
        frames = x.shape[1]
        if frames > self.config.max_frames:
            raise UserError(
                f"clip of {frames} frames exceeds the model's max_frames {self.config.max_frames}"
            )
        h, c = self._embed(x, t, actions, prev)
        ids = self._frame_ids(frame_offset, frames, x.device)
        mask = frame_mask(ids, ids) if frames > 1 else None
        wanted = tuple(return_hidden) + ((stop_at,) if stop_at is not None else ())
        h, hidden = self._trunk(h, c, ids, mask, return_hidden=wanted, stop_at=stop_at)
        if stop_at is not None:
            return hidden
        out = self._head(h, c, prev, frames)
        return (out, hidden) if return_hidden else out

    def _head(self, h: Tensor, c: Tensor, prev: Tensor, frames: int) -> Tensor:
        """The output ``(B, T, C, H, W)`` in float32 (whatever the weights) from the last hidden
        state; with the residual head the change is predicted and the previous frame added."""
        out = self._unpatchify(self.final(h, c), frames).float()
        return out + prev if self.config.residual else out

    def velocity(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from this model's output ``(B, T, C, H, W)``; ``t`` as in :meth:`forward`."""
        t_pix = expand_t(t, x_t.shape, self.config.patch).to(x_t)
        return to_velocity(pred, x_t, t_pix, self.config.prediction, self.config.t_min)

    def clean(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Clean-frame estimate from this model's output ``(B, T, C, H, W)``."""
        t_pix = expand_t(t, x_t.shape, self.config.patch).to(x_t)
        return to_clean(pred, x_t, t_pix, self.config.prediction)

    # ----------------------------------------------------------------------------------------------
    # rollouts with a sliding-window KV cache; call these under torch.no_grad()

    def init_cache(self, batch: int, window: int | None = None) -> KVCache:
        """An empty cache keeping at most ``window`` history frames (default ``max_frames - 1``, so a
        predicted frame and its history never exceed the trained context)."""
        window = self.config.max_frames - 1 if window is None else window
        if window < 1:
            raise UserError(
                f"cache window must be at least 1 frame, got {window} (max_frames {self.config.max_frames})"
            )
        return KVCache(batch=batch, window=window, tokens=self.tokens_per_frame)

    def compile_rollouts(self, freeze: bool = False) -> None:
        """Compile the per-frame work of :meth:`step` and :meth:`append` with ``torch.compile``.

        Compiled: the input embedding, each block's two stages around the cache
        (:meth:`~selfflow_world.layers.Block.attention_inputs` and ``finish``), the last block's
        keys/values, the output head and the velocity conversion. The cache's ring stays outside
        the graphs, so its slot arithmetic does not break them. The first rollout of a new shape
        (batch size, context length) compiles; later rollouts run faster (BENCHMARKS.md). Needs a
        C++ compiler on CPU. Calling it again does nothing.

        ``freeze=False``: the blocks share graphs, with their parameters as inputs rather than
        constants, so weights loaded or updated in place later are the ones used (15-60 s of
        compiling for ``small`` on 2 CPU cores). ``freeze=True``, for inference with fixed weights:
        each block gets graphs of its own with its weights folded in as constants (inductor's
        freezing: on CPU, oneDNN linears with prepacked weights and fused epilogues), about 1.1x
        faster than shared graphs on 2 CPU cores, compiling about 4x longer; weights changed after
        the first rollout are not seen.
        """
        if getattr(self, "_compiled_rollouts", False):
            return
        # each batch size, context length and cache fill (the ring's views) is a graph of its own,
        # and the blocks share them (or, frozen, have one per block): past dynamo's default of 8
        # per function, calls would quietly fall back to eager (process-wide; raised, never lowered)
        config = torch._dynamo.config
        limit = max(64, 16 * len(self.blocks)) if freeze else 64
        config.recompile_limit = max(config.recompile_limit, limit)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)

        def compiled(fn):
            graph = torch.compile(fn)
            if not freeze:
                return graph
            from torch._inductor import config as inductor

            def frozen(*args, **kwargs):  # dynamo reads it while tracing, inductor while compiling
                with inductor.patch(freezing=True):
                    return graph(*args, **kwargs)

            return frozen

        for block in self.blocks:
            for name in ("attention_inputs", "finish", "key_values"):
                setattr(block, name, compiled(getattr(block, name)))
        embed = compiled(self._embed)

        def embed_levels_as_tensor(x: Tensor, t: Tensor | float, actions: Tensor, prev: Tensor):
            # a Python float level would be a graph constant: one recompile per value
            return embed(x, torch.as_tensor(t, dtype=torch.float32, device=x.device), actions, prev)

        self._embed = embed_levels_as_tensor  # type: ignore[method-assign]
        # the pixel-space tail of a step: final layer, unpatchify, residual, velocity (at large
        # batches these full-frame float32 passes cost about as much as a block's elementwise work)
        self._head = compiled(self._head)  # type: ignore[method-assign]
        self.velocity = compiled(self.velocity)  # type: ignore[method-assign]
        self._compiled_rollouts = True

    def _as_clip(self, cache: KVCache, frames: Tensor, actions: Tensor, prev: Tensor | None):
        """Add a time axis to single frames and fill in ``prev`` from the cache."""
        if frames.ndim == 4:
            frames, actions = frames[:, None], actions[:, None]
            prev = None if prev is None else prev[:, None]
        if frames.shape[0] != cache.batch:
            raise ValueError(f"batch of {frames.shape[0]} rows for a cache of {cache.batch}")
        if prev is None:
            first = torch.zeros_like(frames[:, 0]) if cache.last is None else cache.last
            prev = first[:, None] if frames.shape[1] == 1 else torch.cat([first[:, None], frames[:, :-1]], 1)
        return frames, actions, prev

    def append(
        self,
        cache: KVCache,
        frames: Tensor,
        actions: Tensor,
        prev: Tensor | None = None,
        *,
        t: Tensor | float = 0.0,
        return_hidden: Sequence[int] = (),
    ) -> dict[int, Tensor]:
        """Encode history frames into ``cache`` (in place), sliding its window.

        ``frames`` ``(B, T, C, H, W)`` or one frame ``(B, C, H, W)`` (with ``actions (B, T, A)`` or
        ``(B, A)``) take the next absolute indices; ``prev`` defaults to ``cache.last`` followed by
        ``frames[:, :-1]``; ``t`` defaults to 0 (clean; a small level stabilises generated history).
        Each frame attends to at most ``window`` earlier frames, exactly as if appended one by one.
        Returns the requested hidden states ``{l: (B, T * L, D)}``.
        """
        frames, actions, prev = self._as_clip(cache, frames, actions, prev)
        count = frames.shape[1]
        if cache.valid is not None and count > 1:
            raise UserError("append one frame at a time to a rollout with restarted rows")
        h, c = self._embed(frames, t, actions, prev)
        query_ids = self._frame_ids(cache.next_index, count, frames.device)
        key_ids = torch.cat([self._frame_ids(cache.start, cache.frames, frames.device), query_ids])
        mask = frame_mask(query_ids, key_ids, cache.window) if count > 1 else cache.key_mask()
        _, hidden = self._trunk(
            h, c, query_ids, mask, past=cache, return_hidden=return_hidden, store_only_last=True
        )
        total = cache.frames + count
        cache.frames = min(total, cache.window)
        cache.start += total - cache.frames
        if cache.valid is not None:  # the slot now holds this frame for every row
            cache.valid[:, cache.slot] = True
            if bool(cache.valid.all()):
                cache.valid = None
        cache.slot = (cache.slot + count) % (cache.window + 1)
        cache.last = frames[:, -1]
        return hidden

    def step(
        self,
        cache: KVCache,
        x_t: Tensor,
        t: Tensor | float,
        action: Tensor,
        prev: Tensor | None = None,
        *,
        return_hidden: Sequence[int] = (),
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Predict the frame after the cached history without writing to ``cache``.

        Args:
            x_t: the noisy next frame ``(B, C, H, W)`` at noise level ``t`` (``(B,)`` or per token
                ``(B, L)``).
            action: ``(B, A)``, the action that produces this frame from ``cache.last``.
            prev: its clean previous frame ``(B, C, H, W)``, default ``cache.last``.

        Returns the prediction ``(B, C, H, W)`` (and hidden states ``{l: (B, L, D)}`` if asked).
        """
        clip, actions, prev = self._as_clip(cache, x_t, action, prev)
        h, c = self._embed(clip, t, actions, prev)
        ids = self._frame_ids(cache.next_index, 1, x_t.device)
        h, hidden = self._trunk(h, c, ids, cache.key_mask(), past=cache, return_hidden=return_hidden)
        out = self._head(h, c, prev, 1)[:, 0]
        return (out, hidden) if return_hidden else out
