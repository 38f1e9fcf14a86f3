"""How much a model's imagined frames follow its actions: cheap figures for training and evaluation.

Both figures compare what the model predicts from the same history under two different actions:

- :func:`action_sensitivity` (every validation round): the one-step prediction from pure noise
  (``t = 1``, which is exactly what one-step imagination outputs) under each clip's own action vs
  an alternative one (training validation: uniform in [-1, 1]), ``mean |x_hat(a) - x_hat(a')|``
  over the mean true frame change ``mean |x_{k+1} - x_k|``. About 0 for a model that ignores its
  actions; ``bench/action_reference.py`` measures what the simulator itself scores on it.
- :func:`following_ratio` (evaluation, against the simulator's own counterfactuals): per horizon, the
  model's frame change under alternative actions over the simulator's change under the same actions.
  1 = the model reacts to a change of actions as much as the simulator does, 0 = not at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfflow_world.metrics import mean_ci
from selfflow_world.model import WorldDiT
from selfflow_world.rollout import start


@torch.no_grad()
def one_step_prediction(
    model: WorldDiT, context: Tensor, context_actions: Tensor, action: Tensor, noise: Tensor
) -> Tensor:
    """The clean-frame prediction ``(B, C, H, W)`` (float32) at ``t = 1`` for the frame after
    ``context (B, H, C, H, W)`` under ``action (B, A)``, from ``noise (B, C, H, W)``."""
    b = context.shape[0]
    ones = torch.ones(b, device=context.device)
    state = start(model, context, context_actions)
    x = noise.to(context.dtype)
    pred = model.step(state.cache, x, ones, action)
    return model.clean(pred[:, None], x[:, None], ones)[:, 0].float()


@torch.no_grad()
def action_sensitivity(
    model: WorldDiT, frames: Tensor, actions: Tensor, history: int, noise: Tensor, other: Tensor
) -> dict[str, float]:
    """One-step action sensitivity of a batch of clips (see the module docstring).

    Args:
        frames: clean clips ``(B, T, C, H, W)`` in [-1, 1], ``T > history``; frame ``history`` is
            the one predicted.
        actions: normalised ``(B, T, A)``; ``actions[:, history]`` produces that frame.
        noise: ``(B, C, H, W)``, the same for both predictions.
        other: the alternative actions ``(B, A)`` (normalised), e.g. uniform in [-1, 1] or another
            episode's.

    Returns ``mean_abs_change``, ``true_frame_change`` and their ``ratio`` (NaN for a still scene),
    and the correctness-aware ``gap``: how much worse the prediction under the alternative action
    matches the recorded frame than the one under the recorded action, MSE difference over the
    copy-last MSE (``mse_alternative - mse_recorded``, ``mse_copy_last``). A model that reacts to
    actions but not the way the simulator does has a high ``ratio`` and a ``gap`` near 0.
    """
    context, context_actions = frames[:, :history], actions[:, :history]
    own = one_step_prediction(model, context, context_actions, actions[:, history], noise)
    alt = one_step_prediction(model, context, context_actions, other.to(actions), noise)
    target, last = frames[:, history].float(), frames[:, history - 1].float()
    change = float((own - alt).abs().mean())
    truth = float((target - last).abs().mean())
    return {
        "mean_abs_change": change,
        "true_frame_change": truth,
        "ratio": change / truth if truth > 0 else float("nan"),
        "mse_recorded": float((own - target).pow(2).mean()),
        "mse_alternative": float((alt - target).pow(2).mean()),
        "mse_copy_last": float((last - target).pow(2).mean()),
    }


def following_ratio(
    model_true: Tensor, model_alt: Tensor, sim_true: Tensor, sim_alt: Tensor, level: float = 0.95
) -> dict[str, list[float] | float]:
    """Model change over simulator change when the actions change, per horizon, with intervals.

    All inputs are frames ``(B, T, ...)`` in one scale: the model's rollouts under the recorded
    and under alternative actions, and the simulator's frames under the same two. Per rollout and
    horizon, ``d_model = mean |model_alt - model_true|`` and ``d_sim = mean |sim_alt - sim_true|``;
    the ratio per horizon is ``mean_b d_model / mean_b d_sim`` (a ratio of means, stable where
    single rollouts barely move), and its interval comes from the paired per-rollout differences
    ``d_model - r * d_sim`` (the delta method for a ratio of means). ``overall`` averages over
    horizons the same way. The ratio compares sizes only; ``effect_error_per_horizon`` says whether
    the change is the right one: ``mean (change_model - change_sim)^2 / mean change_sim^2`` per
    horizon (0 = the simulator's change exactly, 1 = no change, above 1 = a wrong change).
    """

    def per_pixel_change(a: Tensor, b: Tensor) -> Tensor:
        return (a.float() - b.float()).abs().reshape(a.shape[0], a.shape[1], -1).mean(-1).double()

    d_model = per_pixel_change(model_alt, model_true).cpu()  # (B, T)
    d_sim = per_pixel_change(sim_alt, sim_true).cpu()

    def ratio_ci(dm: Tensor, ds: Tensor) -> tuple[float, float, float]:
        denom = float(ds.mean())
        if denom <= 0:
            return float("nan"), float("nan"), float("nan")
        r = float(dm.mean()) / denom
        if dm.numel() < 2:
            return r, float("nan"), float("nan")
        _, low, high = mean_ci(dm - r * ds, level)  # interval of mean(dm) - r mean(ds), around 0
        return r, r + low / denom, r + high / denom

    # how wrong the change is, not only how large: squared error of the model's change against the
    # simulator's, over the simulator's squared change (0 exact, 1 no change, > 1 a wrong change)
    diff = (model_alt.float() - model_true.float()) - (sim_alt.float() - sim_true.float())
    sim_sq = (sim_alt.float() - sim_true.float()).pow(2).reshape(*sim_alt.shape[:2], -1).mean(-1).mean(0)
    diff_sq = diff.pow(2).reshape(*diff.shape[:2], -1).mean(-1).mean(0)
    effect = (diff_sq / sim_sq.clamp(min=1e-12)).tolist()
    per_h = [ratio_ci(d_model[:, h], d_sim[:, h]) for h in range(d_model.shape[1])]
    mean, low, high = ratio_ci(d_model.mean(1), d_sim.mean(1))
    return {
        "per_horizon": {
            "mean": [p[0] for p in per_h],
            "low": [p[1] for p in per_h],
            "high": [p[2] for p in per_h],
        },
        "overall": {"mean": mean, "low": low, "high": high},
        "effect_error_per_horizon": effect,
        "model_change_per_horizon": d_model.mean(0).tolist(),
        "simulator_change_per_horizon": d_sim.mean(0).tolist(),
    }
