"""State probe: a small conv net that reads the physics state off a single frame.

Trained on REAL simulator frames only (docs/evaluation.md). Its error on held-out real frames is
the floor; the same probe applied to imagined frames gives the world model's state error, which is
reported per horizon relative to that floor. Targets are standardised for training; the mean and
std live in buffers, so the probe's outputs (and checkpoints of it) are in physical units.

    probe, floor = fit_probe(frames, states, val_frames=vf, val_states=vs, generator=gen)
    err = probe_error(probe, imagined, true_states)  # (B, T, S) prediction - truth
    rmse_per_horizon = err.pow(2).mean(dim=(0, 2)).sqrt()  # (T,), compare with floor["rmse_overall"]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selfflow_world.errors import UserError, check_positive

CHANNELS = 3
POOLED = 4
"""Spatial size (POOLED x POOLED) the conv trunk ends at; the head sees where things are."""


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.SiLU(),
    ]


class StateProbe(nn.Module):
    """Frames ``(B, 3, H, W)`` in [-1, 1] -> physics state ``(B, state_dim)`` in physical units.

    Stride-2 3x3 convs halve the frame until it is at most 4x4 (channels ``width``, doubling up to
    ``4 * width``), one more conv, an adaptive pool to 4x4 and an MLP head on the flattened map (no
    global pooling, so positions survive). 16x16 frames take 2 downsamplings, 64x64 take 4.
    """

    def __init__(self, image_size: int | tuple[int, int], state_dim: int, width: int = 32):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for name, value in (("image_size", h), ("image_size", w), ("state_dim", state_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"StateProbe: {name} must be a positive integer, got {value!r}")
        self.image_size, self.state_dim, self.width = (h, w), state_dim, width
        layers, c, size = _block(CHANNELS, width, stride=1 if max(h, w) <= POOLED else 2), width, max(h, w)
        size = (size + 1) // 2 if size > POOLED else size
        while size > POOLED:  # (B, c, s, s) -> (B, c', ceil(s/2), ceil(s/2))
            layers += _block(c, min(2 * c, 4 * width), stride=2)
            c, size = min(2 * c, 4 * width), (size + 1) // 2
        layers += _block(c, c, stride=1)
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(POOLED), nn.Flatten())  # (B, c * 16)
        self.head = nn.Sequential(
            nn.Linear(c * POOLED * POOLED, 4 * width), nn.SiLU(), nn.Linear(4 * width, state_dim)
        )
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))

    def standardised(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> standardised state ``(B, state_dim)`` (what training fits)."""
        if frames.ndim != 4 or frames.shape[1] != CHANNELS or tuple(frames.shape[2:]) != self.image_size:
            raise UserError(
                f"StateProbe: frames must be (B, {CHANNELS}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(frames.shape)}"
            )
        return self.head(self.trunk(frames))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> state ``(B, state_dim)`` in physical units."""
        return self.standardised(frames) * self.state_std + self.state_mean


def _to_float(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 in [0, 255] or float in [-1, 1], ``(B, 3, H, W)`` -> float32 in [-1, 1] on ``device``."""
    frames = frames.to(device)
    if frames.dtype == torch.uint8:
        return frames.float() / 127.5 - 1.0
    return frames.float()


def _check_data(frames: torch.Tensor, states: torch.Tensor, what: str) -> None:
    if frames.ndim < 4 or frames.shape[-3] != CHANNELS:
        raise UserError(f"{what}: frames must be (..., {CHANNELS}, H, W), got {tuple(frames.shape)}")
    if states.ndim != frames.ndim - 2 or states.shape[:-1] != frames.shape[:-3]:
        raise UserError(
            f"{what}: states must be (..., S) with the frames' leading dims, got frames {tuple(frames.shape)} "
            f"and states {tuple(states.shape)}"
        )
    if frames.numel() == 0 or states.shape[-1] == 0:
        raise UserError(
            f"{what}: frames and states are empty (shapes {tuple(frames.shape)}, {tuple(states.shape)})"
        )


@torch.no_grad()
def probe_error(
    probe: StateProbe, frames: torch.Tensor, states: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """Prediction minus truth, in physical units, for every frame.

    ``frames`` ``(..., 3, H, W)`` (float in [-1, 1] or uint8 in [0, 255]) and ``states`` ``(..., S)``
    with the same leading dims, e.g. videos ``(B, T, 3, H, W)`` with ``(B, T, S)``. Returns ``(..., S)``
    float32 on the states' device; RMSE per dim is ``err.pow(2).flatten(0, -2).mean(0).sqrt()``, and
    ``err / probe.state_std`` is in units of the training states' std.
    """
    _check_data(frames, states, "probe_error")
    check_positive("batch_size", batch_size)
    if states.shape[-1] != probe.state_dim:
        raise UserError(
            f"probe_error: states have {states.shape[-1]} dims, the probe predicts {probe.state_dim}"
        )
    device = probe.state_mean.device
    flat = frames.reshape(-1, *frames.shape[-3:])  # (N, 3, H, W)
    preds = [probe(_to_float(chunk, device)) for chunk in flat.split(batch_size)]
    pred = torch.cat(preds).to(states.device).view(states.shape)
    return pred - states.float()


def fit_probe(
    frames: torch.Tensor,
    states: torch.Tensor,
    *,
    val_frames: torch.Tensor,
    val_states: torch.Tensor,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> tuple[StateProbe, dict[str, float | list[float]]]:
    """Train a :class:`StateProbe` on real frames; return it and its held-out error (the floor).

    ``frames`` ``(N, 3, H, W)`` (float in [-1, 1] or uint8) with ``states`` ``(N, S)``; the
    validation pair likewise, from held-out episodes. AdamW with a cosine learning-rate decay on the
    MSE of standardised targets. Initialisation and batch order come from ``generator`` (seed 0 if
    none), so a seed fixes the result on a given machine; the global RNG is left as it was.
    ``device``: where to train (default: the frames' device).

    Metrics (floats or per-dim lists, validation set, physical units unless noted): ``rmse`` per
    state dim, ``rmse_overall`` (root of the mean squared error over all dims), ``nrmse`` and
    ``nrmse_overall`` (the same in units of the training states' std: a probe that always predicts
    the mean scores ~1), ``state_std`` (training std per dim), ``train_loss`` (last epoch's mean).
    """
    _check_data(frames, states, "fit_probe")
    _check_data(val_frames, val_states, "fit_probe (validation)")
    if (
        frames.ndim != 4
        or val_frames.shape[1:] != frames.shape[1:]
        or val_states.shape[1:] != states.shape[1:]
    ):
        raise UserError(
            "fit_probe: frames must be (N, 3, H, W) with states (N, S), and the validation set the same per item, "
            f"got {tuple(frames.shape)}, {tuple(states.shape)} and {tuple(val_frames.shape)}, {tuple(val_states.shape)}"
        )
    if frames.shape[0] < 2:
        raise UserError(f"fit_probe: need at least 2 training frames, got {frames.shape[0]}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("width", width)):
        check_positive(name, value)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = torch.device(device) if device is not None else frames.device

    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    with torch.random.fork_rng(devices=[]):  # weights from `gen`, the global RNG untouched
        torch.manual_seed(seed)
        probe = StateProbe(tuple(frames.shape[-2:]), states.shape[-1], width)
    targets = states.detach().double().cpu()
    std = targets.std(0)
    probe.state_mean.copy_(targets.mean(0).float())
    probe.state_std.copy_(torch.where(std > 0, std, torch.ones_like(std)).float())  # constant dims: std 1
    probe.to(device)

    n = frames.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    train_loss = math.nan
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen, device=gen.device).to(frames.device)
        losses = []
        for idx in order.split(batch_size):
            x = _to_float(frames[idx], device)
            y = (states[idx].to(device).float() - probe.state_mean) / probe.state_std
            loss = F.mse_loss(probe.standardised(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        train_loss = float(torch.stack(losses).mean())

    err = probe_error(probe, val_frames, val_states).double().cpu()  # (N_val, S)
    norm = err / probe.state_std.double().cpu()
    metrics: dict[str, float | list[float]] = {
        "rmse": err.pow(2).mean(0).sqrt().tolist(),
        "rmse_overall": float(err.pow(2).mean().sqrt()),
        "nrmse": norm.pow(2).mean(0).sqrt().tolist(),
        "nrmse_overall": float(norm.pow(2).mean().sqrt()),
        "state_std": probe.state_std.cpu().tolist(),
        "train_loss": train_loss,
    }
    return probe, metrics
