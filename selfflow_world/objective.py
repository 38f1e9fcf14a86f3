"""The Self-Flow objective for an action-conditioned world model, as pure functions.

A training clip is ``history`` clean frames followed by target frames (docs/method.md). History
tokens sit at ``t = 0`` (or a small ``t_hist ~ U[0, history_noise]`` per frame) and carry no loss.
On target tokens:

- ``flow``: one ``t ~ p(t)`` per example for every target token; velocity MSE.
- ``dts``: Dual-Timestep Scheduling: ``t, s ~ p(t)`` per example, independent and unsorted; each
  target token takes ``s`` with probability ``mask_ratio``, else ``t``. Velocity MSE, nothing else.
- ``selfflow``: DTS plus a representation loss: an EMA teacher (no gradient) sees every target token
  at ``min(t, s)`` (the cleaner level: ``t = 0`` is clean here) with the same noise, history,
  actions and previous frames, stopped at block ``k``; the student's hidden state after block ``l``
  goes through a :class:`Projector`; ``L = L_flow + gamma * mean(1 - cos)`` over target tokens only
  (history tokens are identical for both, at the same noise level, and carry no signal).

With ``heads_weight > 0`` the reward/termination heads (:mod:`selfflow_world.heads`) read the
student's hidden state at the feature block (``round(0.7 * depth)``) of every history frame that has
a frame before it, i.e. a clean frame seen after its own history, as imagined frames are seen when
their features are computed; :func:`~selfflow_world.heads.head_loss` times ``heads_weight`` joins
the loss, and its gradient reaches the model, so the features learn what the reward depends on.

The flow loss's weighting over noise levels (``weighting``: velocity-space or clean-frame error), the
share of examples at pure noise (``t_one``) and the weight on pixels that move (``motion_weight``) are
shared by all three modes, so they stay comparable at equal steps (:func:`flow_error`).

Every mode draws the same random numbers in the same order (noise, ``t``, ``s``, mask, history
levels), so runs of different modes with one seed share their noise and their ``t``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from selfflow_world import rollout as rollouts
from selfflow_world.errors import UserError
from selfflow_world.heads import head_loss
from selfflow_world.model import default_feature_layer, expand_t, shift_frames, to_clean, to_velocity

MODES = ("flow", "dts", "selfflow")
TIME_DISTS = ("uniform", "logit_normal")
WEIGHTINGS = ("velocity", "x")
# t_one when unset: flow trains every example at pure noise, what one-step imagination sees (the
# shipped models; docs/study.md compares it with 0.25); DTS and Self-Flow need partly noisy targets
DEFAULT_T_ONE = {"flow": 1.0, "dts": 0.25, "selfflow": 0.25}


@dataclass
class ObjectiveConfig:
    """Settings of :func:`compute_loss` (and of the trainer's EMA teacher)."""

    mode: str = "flow"  # "flow" | "dts" | "selfflow"
    mask_ratio: float = 0.25  # R_M: probability that a target token takes the second timestep s
    time_dist: str = "uniform"  # p(t): "uniform" | "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # t' = shift * t / (1 + (shift - 1) * t); > 1 moves mass towards noise
    # what the flow loss averages over target pixels (see flow_error):
    # "velocity": |v_hat - v|^2, which for x-prediction is |x_hat - x|^2 / max(t, t_min)^2;
    # "x": the clean-frame error |x_hat - x|^2, the same weight at every noise level
    weighting: str = "x"
    # share of examples whose target frames sit at t = 1 (pure noise; DTS's s too); None: 1.0 for flow,
    # 0.25 for dts and selfflow, which at t_one = 1 have no second noise level to work with
    t_one: float | None = None
    motion_weight: float = 0.0  # pixels whose value changed from the previous frame weigh 1 + this
    student_layer: int | None = None  # l, 1-based; None: round(0.3 * depth)
    teacher_layer: int | None = None  # k, 1-based; None: round(0.7 * depth)
    gamma: float = 0.8  # weight of the representation loss
    history_noise: float = 0.0  # history frames get t_hist ~ U[0, history_noise]
    # share of clips whose context actions (those that led into the history frames; never the
    # target's) are replaced by 0 (normalised: the middle of the bounds), so that the motion in the
    # history must be read from the frames
    context_action_dropout: float = 0.0
    ema_decay: float = 0.999  # teacher EMA decay after warm-up
    ema_warmup: int = 10000  # steps over which the EMA window grows linearly to 1 / (1 - ema_decay);
    # keep it >= 10 / (1 - ema_decay): the EMA then averages at most ~the last 10% of the run so far
    heads_weight: float = 0.0  # > 0: train reward/termination heads jointly, with this loss weight

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"objective mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.mask_ratio <= 0.5:
            raise UserError(f"objective mask_ratio must be in [0, 0.5], got {self.mask_ratio!r}")
        if self.time_dist not in TIME_DISTS:
            raise UserError(f"objective time_dist must be one of {TIME_DISTS}, got {self.time_dist!r}")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"objective weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.t_one is None:
            self.t_one = DEFAULT_T_ONE[self.mode]
        if not 0.0 <= self.t_one <= 1.0:
            raise UserError(f"objective t_one must be in [0, 1], got {self.t_one!r}")
        if self.mode != "flow" and self.t_one == 1.0:
            # every example at t = s = 1: DTS has nothing to mask, and Self-Flow's teacher sees the
            # student's own pure-noise input, so there is no information gap to distil
            warnings.warn(
                f"objective mode {self.mode} with t_one=1 is plain flow matching"
                + (" plus self-distillation" if self.mode == "selfflow" else "")
                + "; use t_one < 1 (e.g. 0.25) for Dual-Timestep Scheduling to act",
                stacklevel=2,
            )
        if not 0.0 <= self.context_action_dropout <= 1.0:
            raise UserError(
                f"objective context_action_dropout must be in [0, 1], got {self.context_action_dropout!r}"
            )
        if not self.motion_weight >= 0:
            raise UserError(f"objective motion_weight must be >= 0, got {self.motion_weight!r}")
        if not self.logit_std > 0 or not self.shift > 0:
            raise UserError(
                f"objective logit_std and shift must be > 0, got {self.logit_std!r}, {self.shift!r}"
            )
        for name in ("student_layer", "teacher_layer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"objective {name} must be a block index >= 1 or None, got {value!r}")
        if not self.gamma >= 0:
            raise UserError(f"objective gamma must be >= 0, got {self.gamma!r}")
        if not 0.0 <= self.history_noise <= 1.0:
            raise UserError(f"objective history_noise must be in [0, 1], got {self.history_noise!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"objective ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not isinstance(self.ema_warmup, int) or self.ema_warmup < 0:
            raise UserError(f"objective ema_warmup must be a step count >= 0, got {self.ema_warmup!r}")
        if not self.heads_weight >= 0:
            raise UserError(f"objective heads_weight must be >= 0, got {self.heads_weight!r}")

    def resolve_layers(self, depth: int) -> tuple[int, int]:
        """Student and teacher block ``(l, k)`` for a model of ``depth`` blocks, ``1 <= l < k <= depth``.

        Defaults are ``round(0.3 * depth)`` and ``round(0.7 * depth)``, moved apart where rounding
        makes them meet (depth 2 gives (1, 2)).
        """
        student = self.student_layer if self.student_layer is not None else max(1, round(0.3 * depth))
        teacher = (
            self.teacher_layer if self.teacher_layer is not None else max(student + 1, round(0.7 * depth))
        )
        if not 1 <= student < teacher <= depth:
            raise UserError(
                f"objective needs 1 <= student_layer < teacher_layer <= depth {depth}, "
                f"got student_layer={student}, teacher_layer={teacher}"
            )
        return student, teacher


class Projector(nn.Module):
    """``Linear(d, 2d) - SiLU - Linear(2d, d)`` on the student's features ``(B, N, d)``."""

    def __init__(self, width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        for layer in (self.net[0], self.net[2]):
            nn.init.xavier_uniform_(layer.weight, generator=generator)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _rand(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device, normal: bool = False
) -> Tensor:
    """Uniform [0, 1) or standard normal draw on the generator's device, moved to ``device``."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=generator.device).to(device)


def sample_times(
    n: int, cfg: ObjectiveConfig, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """``n`` noise levels ``(n,)`` from p(t): uniform or logit-normal, then the SD3/Flux shift."""
    if cfg.time_dist == "uniform":
        t = _rand((n,), generator, torch.device(device))
    else:
        t = torch.sigmoid(
            cfg.logit_mean + cfg.logit_std * _rand((n,), generator, torch.device(device), normal=True)
        )
    return cfg.shift * t / (1 + (cfg.shift - 1) * t)


def flow_error(
    pred: Tensor,
    x_t: Tensor,
    frames: Tensor,
    eps: Tensor,
    t_pix: Tensor,
    prev: Tensor,
    cfg: ObjectiveConfig,
    prediction: str,
    t_min: float,
) -> Tensor:
    """Per-pixel flow loss ``(B, T, C, H, W)`` (float32) of a model output, as ``cfg`` weighs it.

    ``weighting="velocity"``: ``|v_hat - (eps - x)|^2`` with ``v_hat`` from :func:`to_velocity`; for
    x-prediction that is the clean-frame error times ``1 / max(t, t_min)^2``, which leaves almost no
    weight on high noise levels, the only ones where the next frame is not visible in ``x_t`` and the
    action has to decide it. ``weighting="x"``: ``|x_hat - x|^2`` (``x_hat`` from :func:`to_clean`),
    equal weight at every level. ``motion_weight`` ``m``: pixels whose clean value differs from
    ``prev`` (the previous frame; by more than 1/127.5, one uint8 level) weigh ``1 + m``.
    """
    if cfg.weighting == "velocity":
        err = (to_velocity(pred, x_t, t_pix, prediction, t_min) - (eps - frames)).float().pow(2)
    else:
        err = (to_clean(pred, x_t, t_pix, prediction) - frames).float().pow(2)
    if cfg.motion_weight > 0:
        moved = (frames - prev).abs().amax(dim=2, keepdim=True) > 1.0 / 127.5  # (B, T, 1, H, W)
        err = err * (1.0 + cfg.motion_weight * moved.float())
    return err


def make_noisy(frames: Tensor, eps: Tensor, t: Tensor | float, patch: int) -> Tensor:
    """``x_t = (1 - t) * x + t * eps`` for video ``(B, T, C, H, W)``.

    ``t`` per example ``(B,)``, per frame ``(B, T)`` or per token ``(B, N)``; each token's level covers
    its ``patch x patch`` pixels.
    """
    t_pix = expand_t(t, frames.shape, patch).to(frames)  # (B, T, 1, H, W)
    return (1 - t_pix) * frames + t_pix * eps


def default_sampler_steps(t_one: float | None, steps: int = 4) -> int:
    """Sampler steps per imagined frame for a model trained with ``t_one``: 1 when every target sat at
    ``t = 1`` (``t_one >= 1``: the model never saw a partly noisy target, so more steps only add
    error), else ``steps``."""
    return 1 if t_one is not None and float(t_one) >= 1.0 else steps


def ema_decay_at(step: int, cfg: ObjectiveConfig) -> float:
    """Teacher EMA decay at optimizer step ``step`` (0-based).

    Without warm-up, ``cfg.ema_decay``. With ``ema_warmup = W`` steps the averaging window
    ``1 / (1 - decay)`` grows linearly from 1 (decay 0: the teacher copies the student) at step 0 to
    ``1 / (1 - ema_decay)`` at step ``W``, so a short run is not stuck with a stale teacher.
    """
    if cfg.ema_warmup == 0 or step >= cfg.ema_warmup:
        return cfg.ema_decay
    window = 1.0 + (step / cfg.ema_warmup) * (1.0 / (1.0 - cfg.ema_decay) - 1.0)
    return 1.0 - 1.0 / window


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for parameters; buffers are copied."""
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        t_param.lerp_(s_param.detach(), 1.0 - decay)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        t_buf.copy_(s_buf)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student to be updated by :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def imagined_history_batch(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    history: int,
    imagined: int,
    share: float,
    generator: torch.Generator,
    steps: int = 1,
) -> tuple[dict[str, Tensor], int]:
    """Training on the model's own predictions: clips whose history holds imagined frames.

    A model trained only on clean recorded history never sees the frames it makes itself, which
    at imagination time become its history: small errors compound over a rollout (exposure bias).
    Here a share of the clips get a history that the model (``model``, without gradient, through
    the library's one rollout path) imagined from the clip's first ``history`` recorded frames under
    the recorded actions; the target frames stay recorded, so the loss asks the model to predict
    the real next frame from its own, slightly wrong, history.

    ``batch`` holds clips of ``history + imagined + F`` frames (``frames (B, T, C, H, W)``,
    ``actions (B, T, A)``, optionally per-frame ``rewards``/``terminated``). Each row is chosen with
    probability ``share``; a chosen row draws ``r ~ U{1..imagined}``, imagines frames ``history ..
    history + r - 1`` and takes the window of ``history + F`` frames that starts at ``r`` (its last
    ``min(r, history)`` history frames imagined); other rows take the first ``history + F`` frames,
    all recorded. Actions, rewards and flags are cut to the same windows. ``steps``: sampler steps
    per imagined frame, as the model imagines at run time.

    Returns the batch of ``history + F`` frames and the number of rows whose history holds
    imagined frames.
    """
    frames, actions = batch["frames"], batch["actions"]
    b, total = frames.shape[:2]
    length = total - imagined
    if imagined < 1 or share < 0 or share > 1:
        raise UserError(f"imagined history needs imagined >= 1 and share in [0, 1], got {imagined}, {share}")
    if length <= history:
        raise UserError(
            f"clips of {total} frames leave no target after {history} history and {imagined} imagined frames"
        )
    device = frames.device
    chosen = _rand((b,), generator, device) < share
    offset = (_rand((b,), generator, device) * imagined).long().clamp(max=imagined - 1) + 1
    offset = torch.where(chosen, offset, torch.zeros_like(offset))  # (B,) window start per row
    full = frames
    rows = chosen.nonzero().flatten()
    if rows.numel():
        state = rollouts.start(model, frames[rows, :history], actions[rows, :history])
        full = frames.clone()
        for k in range(int(offset.max())):  # imagined frame history + k, kept by rows with r > k
            frame = rollouts.advance(
                model, state, actions[rows, history + k], steps=steps, generator=generator
            )
            keep = offset[rows] > k
            full[rows[keep], history + k] = frame[keep].to(frames.dtype)
    window = offset[:, None] + torch.arange(length, device=device)  # (B, history + F)
    pick = torch.arange(b, device=device)[:, None]
    out = {key: value[pick, window] for key, value in batch.items() if key != "frames"}
    out["frames"] = full[pick, window]
    return out, int(rows.numel())


def compute_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    cfg: ObjectiveConfig,
    generator: torch.Generator,
    *,
    teacher: nn.Module | None = None,
    projector: nn.Module | None = None,
    heads: nn.Module | None = None,
    history: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of one batch.

    Args:
        model: the student :class:`~selfflow_world.model.WorldDiT` (or a DDP / compiled wrapper).
        batch: ``frames (B, T, C, H, W)`` in [-1, 1] and ``actions (B, T, A)``.
        cfg: the objective settings.
        generator: every random draw comes from it (it may live on another device than the batch).
        teacher: the EMA teacher (mode ``selfflow`` only), run without gradient.
        projector: :class:`Projector` on the student's features (mode ``selfflow`` only).
        heads: :class:`~selfflow_world.heads.Heads` trained jointly when ``cfg.heads_weight > 0``
            (the batch then needs ``rewards`` and ``terminated``, ``(B, T)``, aligned per frame).
        history: number of leading history frames, ``0 <= history < T``; the rest are targets.

    Returns:
        the loss (scalar, with gradient) and detached metrics: ``loss``, ``flow_loss``, ``t_mean``
        (mean level of target tokens), ``s_frac`` (share of target tokens at ``s``), and in mode
        ``selfflow`` ``rep_loss`` and ``teacher_t_mean``; with heads ``heads_loss``.
    """
    core = getattr(model, "module", model)  # DDP keeps the model under .module
    mcfg = core.config
    frames, actions = batch["frames"], batch["actions"]
    b, total = frames.shape[:2]
    if not 0 <= history < total:
        raise UserError(f"history must be in [0, {total - 1}] for clips of {total} frames, got {history}")
    selfflow = cfg.mode == "selfflow"
    if selfflow and (teacher is None or projector is None):
        raise UserError("objective mode 'selfflow' needs a teacher and a projector")
    joint_heads = cfg.heads_weight > 0
    if joint_heads and (heads is None or "rewards" not in batch or "terminated" not in batch):
        raise UserError("objective heads_weight > 0 needs heads and a batch with rewards and terminated")
    if joint_heads and history < 2:
        raise UserError(
            f"objective heads_weight > 0 needs history >= 2 (the heads read a history frame after its own "
            f"history), got history={history}"
        )
    tokens = core.tokens_per_frame
    n_hist, n_target = history * tokens, (total - history) * tokens
    device = frames.device

    eps = _rand(tuple(frames.shape), generator, device, normal=True).to(frames.dtype)
    t = sample_times(b, cfg, generator, device)  # (B,)
    s = sample_times(b, cfg, generator, device)  # (B,)
    use_s = _rand((b, n_target), generator, device) < cfg.mask_ratio  # (B, F * L)
    t_hist = repeat(_rand((b, history), generator, device) * cfg.history_noise, "b h -> b (h l)", l=tokens)
    if cfg.t_one > 0:  # drawn only when asked, so runs without it keep their random stream
        at_one = _rand((b,), generator, device) < cfg.t_one
        t, s = torch.where(at_one, 1.0, t), torch.where(at_one, 1.0, s)
    if cfg.context_action_dropout > 0 and history > 0:  # drawn only when asked, like t_one
        dropped = _rand((b,), generator, device) < cfg.context_action_dropout
        in_context = torch.arange(total, device=device) < history
        actions = actions.masked_fill((dropped[:, None] & in_context[None, :])[..., None], 0.0)

    if cfg.mode == "flow":
        use_s = torch.zeros_like(use_s)
    t_target = torch.where(use_s, s[:, None], t[:, None])  # (B, F * L)
    t_tok = torch.cat([t_hist, t_target], dim=1)  # (B, N)
    x_t = make_noisy(frames, eps, t_tok, mcfg.patch)
    # previous frames: the history as the model sees it, then clean targets (teacher forcing)
    prev = shift_frames(torch.cat([x_t[:, :history], frames[:, history:]], dim=1))

    wanted = []
    if selfflow:
        student_layer, teacher_layer = cfg.resolve_layers(mcfg.depth)
        wanted.append(student_layer)
    if joint_heads:
        heads_layer = default_feature_layer(mcfg.depth)
        wanted.append(heads_layer)
    if wanted:
        pred, hidden = model(x_t, t_tok, actions, prev, return_hidden=tuple(wanted))
    else:
        pred = model(x_t, t_tok, actions, prev)
    t_pix = expand_t(t_tok, frames.shape, mcfg.patch).to(frames)
    err = flow_error(pred, x_t, frames, eps, t_pix, prev, cfg, mcfg.prediction, mcfg.t_min)
    flow_loss = err[:, history:].mean()
    loss = flow_loss
    metrics = {
        "flow_loss": flow_loss.detach(),
        "t_mean": t_target.mean(),
        "s_frac": use_s.float().mean(),
    }

    if selfflow:
        t_teacher = torch.cat([t_hist, torch.minimum(t, s)[:, None].expand(b, n_target)], dim=1)  # (B, N)
        with torch.no_grad():
            x_teacher = make_noisy(frames, eps, t_teacher, mcfg.patch)
            target = teacher(x_teacher, t_teacher, actions, prev, stop_at=teacher_layer)[teacher_layer]
        student = projector(hidden[student_layer][:, n_hist:])  # (B, F * L, D)
        cos = nn.functional.cosine_similarity(student.float(), target[:, n_hist:].float(), dim=-1)
        rep_loss = (1 - cos).mean()
        loss = loss + cfg.gamma * rep_loss
        metrics["rep_loss"] = rep_loss.detach()
        metrics["teacher_t_mean"] = t_teacher[:, n_hist:].mean()
    if joint_heads:
        # history frames 1 .. history-1: each is clean and seen after the frames before it
        feats = rearrange(hidden[heads_layer][:, tokens:n_hist], "b (h l) d -> (b h) l d", l=tokens)
        h_loss = head_loss(
            heads,
            feats,
            batch["rewards"][:, 1:history].reshape(-1),
            batch["terminated"][:, 1:history].reshape(-1),
        )
        loss = loss + cfg.heads_weight * h_loss
        metrics["heads_loss"] = h_loss.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
