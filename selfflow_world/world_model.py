"""The user-facing world model: load a trained checkpoint, imagine frames under actions.

    from selfflow_world import WorldModel
    wm = WorldModel.load("runs/reacher", device="cuda")   # or "cpu"; a run dir or a checkpoint dir
    frames = wm.imagine(context_frames, actions, generator=g)  # sampler steps: wm.sampler_steps

Frames come in either layout and go back in the same one: uint8 ``(B, H, h, w, 3)`` (as on disk and
from envs) or float ``(B, H, 3, h, w)`` in [-1, 1] (as inside the model). Actions are in the env's
units and normalised inside with the action bounds stored in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from selfflow_world import rollout as rollouts
from selfflow_world.checkpoint import load_weights, read_meta, resolve_checkpoint
from selfflow_world.errors import UserError
from selfflow_world.heads import Heads, load_heads, missing_heads_message
from selfflow_world.model import ModelConfig, WorldDiT, default_feature_layer
from selfflow_world.rollout import RolloutState
from selfflow_world.runtime import autocast, casts_weights, freezes_compiled, tune_allocator
from selfflow_world.sampler import METHODS
from selfflow_world.video import to_float


@dataclass
class _Layout:
    uint8: bool
    numpy: bool


class Step(NamedTuple):
    """What :meth:`WorldModel.step` returns when more than the frames is asked for."""

    frames: Tensor | np.ndarray  # (B, ...) in the layout given to start
    features: Tensor | None  # (B, L, D) float32, block hidden states of the new frames' tokens
    reward: Tensor | None  # (B,) predicted reward received on arriving at the new frames
    termination: Tensor | None  # (B,) predicted probability that the episode terminated there


class Imagination:
    """Rollouts in progress (:meth:`WorldModel.start`): step them with :meth:`WorldModel.step`.

    ``repeat(n)`` gives each rollout as ``n`` candidates in a row (planners), ``select(rows)`` keeps
    chosen rows, and :meth:`WorldModel.restart` starts chosen rows over while the others continue
    (dream envs). ``imagined``: frames imagined per row since its (re)start.
    """

    def __init__(self, wm: WorldModel, state: RolloutState, layout: _Layout):
        self.wm, self.state, self.layout = wm, state, layout

    @property
    def batch(self) -> int:
        return self.state.batch

    @property
    def imagined(self) -> Tensor:
        return self.state.imagined

    def repeat(self, n: int) -> Imagination:
        return Imagination(self.wm, self.state.repeat(n), self.layout)

    def select(self, rows) -> Imagination:
        return Imagination(self.wm, self.state.select(rows), self.layout)


class WorldModel:
    """A trained :class:`~selfflow_world.model.WorldDiT` with its action bounds and training setup."""

    def __init__(
        self,
        model: WorldDiT,
        meta: dict[str, Any],
        device: torch.device,
        bf16: bool = True,
        compile: bool = False,
    ):
        self.bf16 = bf16  # bf16 where native: CUDA, CPUs with AVX512-BF16 or AMX
        self.bf16_weights = bf16 and casts_weights(device)  # the residual stream in bf16 too
        self.model = (model.to(torch.bfloat16) if self.bf16_weights else model).eval()
        self.compiled = compile
        if compile:  # the weights never change here, so they may be frozen into the graphs
            self.model.compile_rollouts(freeze=freezes_compiled(device))
        self.meta = meta
        self.device = device
        self.source = "model"  # what it was loaded from (a path or a shipped model's name)
        self.heads: Heads | None = None  # reward/termination heads (selfflow_world.heads), if trained
        self.heads_meta: dict[str, Any] = {}
        self.config: ModelConfig = self.model.config
        self.history: int = int(meta.get("config", {}).get("history", 1))
        low = np.asarray(meta["action_low"], np.float32)
        high = np.asarray(meta["action_high"], np.float32)
        self.action_low, self.action_high = low, high  # env units, (A,)
        self._center = torch.from_numpy((high + low) / 2).to(device)
        self._half = torch.from_numpy((high - low) / 2).to(device)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        weights: str = "ema",
        bf16: bool = True,
        compile: bool = False,
    ) -> WorldModel:
        """Load from a run directory (its newest checkpoint) or a checkpoint directory.

        ``weights``: ``ema`` (the evaluation weights, default) or ``model`` (the raw student).
        ``bf16``: imagine in bf16 where the device runs it natively: autocast on CUDA, the weights
        cast to bf16 on CPUs with AVX512-BF16 or AMX; ``False`` keeps float32 everywhere.
        ``compile``: ``torch.compile`` the per-frame work of rollouts
        (:meth:`~selfflow_world.model.WorldDiT.compile_rollouts`, on CPU with the weights frozen
        into the graphs): the first rollout of each new shape compiles first, which is slow, and
        later ones run faster (BENCHMARKS.md); worth it for many rollouts of one shape (planning,
        long evaluations), not for a few rollouts.
        """
        if weights not in ("ema", "model"):
            raise UserError(f"weights must be 'ema' or 'model', got {weights!r}")
        device = torch.device(device)
        if device.type == "cpu":
            tune_allocator()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device} requested but CUDA is not available here; use device='cpu'")
        ckpt = resolve_checkpoint(path)
        meta = read_meta(ckpt)
        if "model_config" not in meta or "action_low" not in meta:
            raise UserError(f"{ckpt} is not a selfflow-world checkpoint (meta.json lacks model_config)")
        model = WorldDiT(ModelConfig.from_saved(meta["model_config"], ckpt))
        load_weights(ckpt, weights, model)
        wm = cls(model.to(device), meta, device, bf16, compile)
        wm.source = str(path)
        wm.attach_heads(ckpt, required=False)
        return wm

    def attach_heads(self, path: str | Path, required: bool = True) -> None:
        """Use the reward/termination heads stored in directory ``path`` (``sfw heads ... out=``);
        loading a checkpoint attaches the heads stored beside its weights by itself."""
        found = load_heads(Path(path), self.config.width, self.config.tokens_per_frame)
        if found is None:
            if required:
                raise UserError(f"no heads in {path} (expected heads.safetensors and heads.json)")
            return
        self.heads, self.heads_meta = found[0].to(self.device), found[1]

    @classmethod
    def untrained(cls, like: WorldModel, seed: int = 0, compile: bool | None = None) -> WorldModel:
        """A freshly initialised model of the same config (a baseline for evaluation); compiled
        like ``like`` unless ``compile`` says otherwise."""
        model = WorldDiT(like.config, generator=torch.Generator().manual_seed(seed))
        compile = like.compiled if compile is None else compile
        return cls(model.to(like.device), like.meta, like.device, like.bf16, compile)

    # -- conversions ------------------------------------------------------------------------------
    def normalize_actions(self, actions: Tensor) -> Tensor:
        """Env units -> [-1, 1]."""
        return (actions - self._center) / self._half

    def denormalize_actions(self, actions: Tensor) -> Tensor:
        """[-1, 1] -> env units (the inverse of :meth:`normalize_actions`)."""
        return actions * self._half + self._center

    @property
    def sampler_steps(self) -> int:
        """Sampler steps per frame when none are given: 1 for a model trained only at ``t = 1``
        (``objective.t_one=1``: it never saw a partly noisy target, so more steps only add error),
        else 4."""
        from selfflow_world.objective import default_sampler_steps

        return default_sampler_steps(self.meta.get("config", {}).get("objective", {}).get("t_one", 0.0))

    @property
    def feature_layer(self) -> int:
        """The block whose hidden states :meth:`step` returns as features by default: the one the
        Self-Flow teacher is read at, ``round(0.7 * depth)``."""
        return default_feature_layer(self.config.depth)

    def _frames_in(self, frames: Tensor | np.ndarray, name: str) -> tuple[Tensor, _Layout]:
        layout = _Layout(uint8=False, numpy=isinstance(frames, np.ndarray))
        x = torch.as_tensor(frames)
        size, channels = self.config.image_size, self.config.channels
        if x.ndim != 5:
            raise UserError(
                f"{name} must be 5-D: uint8 (B, T, {size}, {size}, 3) or float (B, T, 3, {size}, {size}), "
                f"got shape {tuple(x.shape)}"
            )
        if x.dtype == torch.uint8:
            if tuple(x.shape[2:]) != (size, size, channels):
                raise UserError(
                    f"{name} uint8 frames must be (B, T, {size}, {size}, {channels}), got {tuple(x.shape)}"
                )
            layout.uint8 = True
            x = to_float(x)
        elif x.is_floating_point():
            if tuple(x.shape[2:]) != (channels, size, size):
                raise UserError(
                    f"{name} float frames must be (B, T, {channels}, {size}, {size}) in [-1, 1], got "
                    f"{tuple(x.shape)}"
                )
            x = x.float()
        else:
            raise UserError(f"{name} must be uint8 or float, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise UserError(f"{name} contains NaN or infinite values")
        return x.to(self.device), layout

    def _frames_out(self, x: Tensor, layout: _Layout) -> Tensor | np.ndarray:
        if layout.uint8:
            x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
        x = x.cpu()
        return x.numpy() if layout.numpy else x

    def _actions_in(
        self,
        actions: Tensor | np.ndarray,
        batch: int,
        name: str,
        normalized: bool = False,
        steps: bool = True,
    ) -> Tensor:
        """Actions ``(B, T, A)`` (``steps=False``: ``(B, A)``) in env units (or already normalised)
        as normalised float32 on the model's device."""
        a = torch.as_tensor(actions, dtype=torch.float32)
        dim = self.config.action_dim
        shape = f"(B={batch}, T, A={dim})" if steps else f"(B={batch}, A={dim})"
        if a.ndim != (3 if steps else 2) or a.shape[0] != batch or a.shape[-1] != dim:
            units = "normalised to [-1, 1]" if normalized else "in env units"
            raise UserError(f"{name} must be {shape} {units}, got shape {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise UserError(f"{name} contain NaN or infinite values")
        a = a.to(self.device)
        return a if normalized else self.normalize_actions(a)

    # -- imagination ------------------------------------------------------------------------------
    @torch.no_grad()
    def imagine(
        self,
        context_frames: Tensor | np.ndarray,
        actions: Tensor | np.ndarray,
        *,
        steps: int | None = None,
        method: str = "euler",
        generator: torch.Generator | None = None,
        context_actions: Tensor | np.ndarray | None = None,
        window: int | None = None,
        history_level: float = 0.0,
    ) -> Tensor | np.ndarray:
        """Imagine ``T`` frames after ``H`` context frames, batched and frame-causal.

        Args:
            context_frames: uint8 ``(B, H, h, w, 3)`` or float ``(B, H, 3, h, w)`` in [-1, 1].
            actions: ``(B, T, A)`` in env units; ``actions[:, j]`` produces imagined frame ``j`` from
                the frame before it (the last context frame for ``j = 0``).
            steps: sampler steps per frame (1 to 50; default :attr:`sampler_steps`); ``method``:
                ``euler`` or ``heun``.
            generator: makes the result deterministic.
            context_actions: ``(B, H, A)`` actions that produced the context frames, if known
                (row 0 is the action before the first context frame); zeros otherwise.
            window: history frames kept in the KV cache (default: the trained context minus one).
            history_level: noise level of generated frames in the history (drift stabilisation).

        Returns:
            ``T`` imagined frames per trajectory, in the layout of ``context_frames``.
        """
        state = self.start(context_frames, context_actions, window=window, history_level=history_level)
        acts = self._actions_in(actions, state.batch, "actions", normalized=False)
        if acts.shape[1] < 1:
            raise UserError("actions must hold at least one step (horizon >= 1)")
        frames = [
            self._step_normalized(state, acts[:, j], steps, method, generator, None)
            for j in range(acts.shape[1])
        ]
        return self._frames_out(torch.stack(frames, 1).float(), state.layout)

    # -- stateful rollouts ------------------------------------------------------------------------
    @torch.no_grad()
    def start(
        self,
        context_frames: Tensor | np.ndarray,
        context_actions: Tensor | np.ndarray | None = None,
        *,
        window: int | None = None,
        history_level: float = 0.0,
    ) -> Imagination:
        """Start a batch of rollouts from context frames (encoded into the KV cache once).

        ``context_frames``: uint8 ``(B, H, h, w, 3)`` or float ``(B, H, 3, h, w)`` in [-1, 1]; the
        frames :meth:`step` returns come in the same layout. ``context_actions`` ``(B, H, A)`` in env
        units (row 0: the action before the first context frame), zeros if None. ``window`` and
        ``history_level`` as in :meth:`imagine`. See :class:`Imagination` for repeat/select/restart.
        """
        context, layout = self._frames_in(context_frames, "context_frames")
        ctx_acts = self._context_actions(context, context_actions)
        if not 0.0 <= history_level < 1.0:
            raise UserError(f"history_level must be in [0, 1), got {history_level}")
        with self._precision():
            state = rollouts.start(self.model, context, ctx_acts, window=window, history_level=history_level)
        return Imagination(self, state, layout)

    @torch.no_grad()
    def step(
        self,
        state: Imagination,
        actions: Tensor | np.ndarray,
        *,
        steps: int | None = None,
        method: str = "euler",
        generator: torch.Generator | None = None,
        features: bool | int = False,
        rewards: bool = False,
        normalized: bool = False,
        noise: Tensor | None = None,
    ) -> Tensor | np.ndarray | Step:
        """Imagine the next frame of every rollout in ``state`` under ``actions (B, A)``, in place.

        ``actions`` in env units (``normalized=True``: already in the model's [-1, 1]).
        ``features``: also return the model's features of the new frames, the hidden state of block
        :attr:`feature_layer` (or of the block given as an int) per token, float32 ``(B, L, D)``.
        ``rewards``: also the reward and termination probability the heads predict (needs heads:
        ``sfw heads``). ``noise``: the sampler's starting noise ``(B, C, H, W)`` (or ``(1, C, H, W)``,
        shared by every row, as planners compare candidates under common noise); drawn from
        ``generator`` when omitted. Returns the frames ``(B, ...)`` in the layout of the context
        given to :meth:`start`, or a :class:`Step` when features or rewards are asked for.
        """
        acts = self._actions_in(actions, state.batch, "actions", normalized=normalized, steps=False)
        if rewards and self.heads is None:
            raise UserError(missing_heads_message(self.source))
        layer = None if features is False else (self.feature_layer if features is True else int(features))
        if rewards and layer is not None and layer != self.heads_meta["layer"]:
            raise UserError(
                f"rewards need the features of block {self.heads_meta['layer']}, got features={layer}"
            )
        if rewards:
            layer = self.heads_meta["layer"]
        if layer is not None and not 1 <= layer <= self.config.depth:
            raise UserError(f"features must name a block in [1, {self.config.depth}], got {layer}")
        if noise is not None:
            shape = (self.config.channels, self.config.image_size, self.config.image_size)
            if noise.ndim != 4 or tuple(noise.shape[1:]) != shape or noise.shape[0] not in (1, state.batch):
                raise UserError(
                    f"noise must be (B={state.batch} or 1, {shape[0]}, {shape[1]}, {shape[2]}), got {tuple(noise.shape)}"
                )
            noise = noise.to(self.device).expand(state.batch, *shape)
        out = self._step_normalized(state, acts, steps, method, generator, layer, noise)
        frame, feats = out if layer is not None else (out, None)
        frame = self._frames_out(frame[:, None].float(), state.layout)[:, 0]
        if layer is None:
            return frame
        reward = termination = None
        if rewards:
            reward, termination = self.heads(feats)
        return Step(frame, feats.float() if features is not False else None, reward, termination)

    def _step_normalized(self, state, acts, steps, method, generator, layer, noise=None):
        steps = self.sampler_steps if steps is None else steps
        if not 1 <= steps <= 50:
            raise UserError(f"steps must be in [1, 50], got {steps}")
        if method not in METHODS:
            raise UserError(f"method must be one of {METHODS}, got {method!r}")
        with self._precision():
            return rollouts.advance(
                self.model,
                state.state,
                acts,
                steps=steps,
                method=method,
                generator=generator,
                noise=noise,
                features=layer,
            )

    @torch.no_grad()
    def restart(
        self,
        state: Imagination,
        rows: list[int] | Tensor,
        context_frames: Tensor | np.ndarray,
        context_actions: Tensor | np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Start ``rows`` of ``state`` over from new context frames (``(R, H, ...)``, the layout given
        to :meth:`start`), in place; the other rows continue as if nothing happened."""
        context, layout = self._frames_in(context_frames, "context_frames")
        if layout.uint8 != state.layout.uint8:
            raise UserError("restart frames must come in the layout given to start (uint8 or float)")
        ctx_acts = self._context_actions(context, context_actions)
        with self._precision():
            rollouts.restart(self.model, state.state, rows, context, ctx_acts, generator)

    def _precision(self):
        return autocast(self.device, self.bf16 and not self.bf16_weights)

    def _context_actions(self, context: Tensor, context_actions) -> Tensor:
        batch = context.shape[0]
        if context_actions is None:
            return torch.zeros(batch, context.shape[1], self.config.action_dim, device=self.device)
        ctx_acts = self._actions_in(context_actions, batch, "context_actions")
        if ctx_acts.shape[1] != context.shape[1]:
            raise UserError(
                f"context_actions must have one row per context frame ({context.shape[1]}), "
                f"got {ctx_acts.shape[1]}"
            )
        return ctx_acts

    @torch.no_grad()
    def clip_features(
        self,
        frames: Tensor | np.ndarray,
        actions: Tensor | np.ndarray | None = None,
        layer: int | None = None,
    ) -> Tensor:
        """Features of the last frame of clean clips, as :meth:`step` returns them for an imagined
        frame: block ``layer``'s (default :attr:`feature_layer`) hidden state of its tokens at
        ``t = 0`` given the frames before it, float32 ``(B, L, D)``.

        ``frames`` in either layout ``(B, T, ...)``, ``T <= max_frames``; ``actions (B, T, A)`` the
        per-frame actions in env units (zeros if None)."""
        from selfflow_world.model import shift_frames

        x, _ = self._frames_in(frames, "frames")
        layer = self.feature_layer if layer is None else layer
        acts = self._context_actions(x, actions)
        zeros = torch.zeros(x.shape[0], device=self.device)
        with self._precision():
            _, hidden = self.model(x, zeros, acts, shift_frames(x), return_hidden=(layer,))
        return hidden[layer][:, -self.config.tokens_per_frame :].float()

    @torch.no_grad()
    def features(self, frames: Tensor, actions: Tensor, layers: list[int] | None = None) -> dict[int, Tensor]:
        """Hidden states at ``t = 0`` of clean clips, mean-pooled over the last frame's tokens.

        Args:
            frames: float ``(B, T, 3, h, w)`` in [-1, 1]; actions: normalised ``(B, T, A)``.
            layers: block indices (default: every block, 1..depth).

        Returns ``{layer: (B, D)}``.
        """
        from selfflow_world.model import shift_frames

        layers = list(range(1, self.config.depth + 1)) if layers is None else layers
        frames, actions = frames.to(self.device), actions.to(self.device)
        zeros = torch.zeros(frames.shape[0], device=self.device)
        _, hidden = self.model(frames, zeros, actions, shift_frames(frames), return_hidden=tuple(layers))
        per_frame = self.config.tokens_per_frame
        return {layer: hidden[layer][:, -per_frame:].float().mean(1) for layer in layers}
