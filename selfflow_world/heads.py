"""Reward and termination heads on a world model's own features.

The heads read the features :meth:`~selfflow_world.world_model.WorldModel.step` returns for an
imagined frame (block ``feature_layer``'s hidden state of the frame's tokens, at ``t = 0``, given
its history), so imagined rollouts predict the reward received on arriving at each frame and the
probability that the episode terminated there (Gymnasium semantics: a terminal state, not a time
limit). They are trained from the rewards and flags recorded with the frames, in one of two ways:

- jointly with the world model (``sfw train objective.heads_weight=W``): the loss of
  :func:`head_loss` on the student's features of the clean history frames is added to the
  objective, so the features themselves learn what the reward depends on;
- afterwards, on a frozen world model (``sfw heads``, seconds to minutes on a CPU).

Either way they are stored beside the weights::

    <checkpoint>/heads.safetensors   the head weights
    <checkpoint>/heads.json          feature layer, reward scaling, training setup, held-out accuracy

:meth:`WorldModel.load <selfflow_world.world_model.WorldModel.load>` loads them when present.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from selfflow_world.errors import UserError, check_positive

HEADS_FILE, HEADS_META = "heads.safetensors", "heads.json"


class Heads(nn.Module):
    """``(B, L, D)`` frame features -> reward ``(B,)`` (env units) and termination logit ``(B,)``.

    Each token is projected to a few channels and the frame's tokens are kept in place (flattened),
    so where things are in the frame (the finger relative to the target) reaches the MLP.
    """

    def __init__(self, width: int, tokens: int, channels: int = 16, hidden: int = 256):
        super().__init__()
        self.reduce = nn.Linear(width, channels)
        self.mlp = nn.Sequential(  # dropout: a few thousand transitions against ~1000 inputs
            nn.LayerNorm(tokens * channels),
            nn.Dropout(0.2),
            nn.Linear(tokens * channels, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))
        # the range of the recorded rewards: predictions are clamped to it, so frames unlike the
        # training data (a drifted imagined frame) cannot produce rewards the env never gives
        self.register_buffer("reward_low", torch.tensor(-float("inf")))
        self.register_buffer("reward_high", torch.tensor(float("inf")))
        self.shape = {"width": width, "tokens": tokens, "channels": channels, "hidden": hidden}

    def raw(self, features: Tensor) -> Tensor:
        """Standardised reward and termination logit, ``(B, 2)``."""
        features = features.to(self.reduce.weight.dtype)
        return self.mlp(self.reduce(features).flatten(1))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Reward in env units and the termination probability, each ``(B,)`` float32."""
        out = self.raw(features).float()
        reward = (out[:, 0] * self.reward_std + self.reward_mean).clamp(self.reward_low, self.reward_high)
        return reward, torch.sigmoid(out[:, 1])

    def set_reward_scale(self, rewards: Tensor) -> None:
        """Standardise with the mean and spread of the recorded ``rewards`` and clamp predictions to
        their range."""
        rewards = rewards.float()
        std = float(rewards.std()) if len(rewards) > 1 else 1.0
        self.reward_mean.fill_(float(rewards.mean()))
        self.reward_std.fill_(std if std > 1e-6 else 1.0)
        self.reward_low.fill_(float(rewards.min()))
        self.reward_high.fill_(float(rewards.max()))


def head_loss(heads: Heads, features: Tensor, rewards: Tensor, terminated: Tensor) -> Tensor:
    """Squared error of the standardised reward plus the termination cross-entropy (a scalar).

    ``features (N, L, D)``, ``rewards (N,)`` in env units, ``terminated (N,)`` 0/1. What both
    ``sfw heads`` and joint training minimise.
    """
    out = heads.raw(features).float()
    target = (rewards.float() - heads.reward_mean) / heads.reward_std
    return (out[:, 0] - target).pow(2).mean() + nn.functional.binary_cross_entropy_with_logits(
        out[:, 1], terminated.float()
    )


def recorded_rewards(dataset) -> Tensor:
    """Every reward recorded in a :class:`~selfflow_world.clips.ClipDataset`'s episodes, ``(N,)``."""
    from selfflow_world.episodes import load_episode

    found = [
        np.asarray(load_episode(info.path, mmap=True)["rewards"], np.float32) for info in dataset.episodes
    ]
    return torch.from_numpy(np.concatenate(found)) if found else torch.zeros(1)


@dataclass
class HeadsConfig:
    """Settings of ``sfw heads`` (documented in configs/heads.yaml)."""

    ckpt: str = "???"
    data: str = "???"
    out: str | None = None  # default: beside the checkpoint's weights
    eval_data: str | None = None  # held-out dataset for the accuracy figures (default: the val split)
    examples: int = 8000  # training transitions (features are computed once, then cached)
    steps: int = 1500
    batch_size: int = 256
    lr: float = 0.001
    layer: int | None = None  # feature block (default: the model's feature_layer)
    seed: int = 0
    device: str = "auto"


@torch.no_grad()
def transition_features(wm, data: str, split: str, limit: int, layer: int, seed: int = 0):
    """Features of up to ``limit`` recorded transitions of ``split``, with their rewards and flags.

    A transition into frame ``k + 1`` (``k >= history - 1``) is the clean clip of frames
    ``k + 1 - history .. k + 1`` with its per-frame actions; its features are block ``layer``'s
    hidden state of the last frame's tokens at ``t = 0``, as :meth:`WorldModel.step` computes them
    for an imagined frame. Returns bf16 features ``(N, L, D)``, float32 rewards ``(N,)`` and float32
    terminated flags ``(N,)``.
    """
    from selfflow_world.clips import per_frame
    from selfflow_world.episodes import load_episode
    from selfflow_world.imagine import model_clips
    from selfflow_world.model import shift_frames
    from selfflow_world.video import to_float

    history = wm.history
    dataset = model_clips(wm, data, split, history)
    pairs = [(info, k) for info in dataset.episodes for k in range(history - 1, info.steps)]
    if not pairs:
        raise UserError(f"the {split} split of {data} has no transition after {history} frames")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(pairs))[:limit].tolist())
    feats, rewards, terms = [], [], []
    per = wm.config.tokens_per_frame
    batch_frames, batch_actions = [], []

    def run_batch():
        frames = to_float(torch.from_numpy(np.stack(batch_frames))).to(wm.device)
        actions = wm.normalize_actions(torch.from_numpy(np.stack(batch_actions)).to(wm.device))
        zeros = torch.zeros(frames.shape[0], device=wm.device)
        with wm._precision():
            _, hidden = wm.model(frames, zeros, actions, shift_frames(frames), return_hidden=(layer,))
        feats.append(hidden[layer][:, -per:].to(torch.bfloat16).cpu())
        batch_frames.clear()
        batch_actions.clear()

    episodes: dict[Any, Any] = {}
    for i in chosen:
        info, k = pairs[i]
        if info.index not in episodes:
            episodes.clear()
            episodes[info.index] = load_episode(info.path)
        arr = episodes[info.index]
        first = k + 1 - history
        batch_frames.append(np.asarray(arr["frames"][first : k + 2]))
        batch_actions.append(per_frame(np.asarray(arr["actions"], np.float32), first, history + 1))
        rewards.append(float(arr["rewards"][k]))
        terms.append(float(arr["terminated"][k]))
        if len(batch_frames) == 64:
            run_batch()
    if batch_frames:
        run_batch()
    return torch.cat(feats), torch.tensor(rewards), torch.tensor(terms)


def accuracy(
    heads: Heads, feats: Tensor, rewards: Tensor, terms: Tensor, mean_reward: float
) -> dict[str, float]:
    """Held-out figures: reward MAE and RMSE (and those of always predicting ``mean_reward``, the
    training mean), the correlation of predicted and recorded rewards, termination accuracy."""
    with torch.no_grad():
        pred, prob = [], []
        for lo in range(0, len(feats), 512):
            r, p = heads(feats[lo : lo + 512].float())
            pred.append(r)
            prob.append(p)
        pred, prob = torch.cat(pred), torch.cat(prob)
    err = pred - rewards
    base = mean_reward - rewards
    corr = (
        float(torch.corrcoef(torch.stack([pred, rewards]))[0, 1])
        if rewards.std() > 0 and pred.std() > 0
        else float("nan")
    )
    return {
        "examples": int(len(rewards)),
        "reward_mae": float(err.abs().mean()),
        "reward_rmse": float(err.pow(2).mean().sqrt()),
        "reward_mae_predict_mean": float(base.abs().mean()),
        "reward_rmse_predict_mean": float(base.pow(2).mean().sqrt()),
        "reward_correlation": corr,
        "termination_accuracy": float(((prob > 0.5).float() == terms).float().mean()),
        "terminal_share": float(terms.mean()),
    }


def fit_heads(cfg: HeadsConfig, wm=None, progress: bool = True) -> dict[str, Any]:
    """Train heads on a frozen world model; writes them beside its weights (or to ``cfg.out``)."""
    from selfflow_world.checkpoint import resolve_checkpoint
    from selfflow_world.runtime import resolve_device
    from selfflow_world.world_model import WorldModel

    for name in ("examples", "steps", "batch_size"):
        check_positive(name, getattr(cfg, name))
    check_positive("lr", cfg.lr)
    for name in ("ckpt", "data"):
        if getattr(cfg, name) in ("???", "", None):
            raise UserError(f"{name}= is required (e.g. sfw heads ckpt=RUN data=DATA)")
    if wm is None:
        wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device))
    layer = wm.feature_layer if cfg.layer is None else cfg.layer
    if not 1 <= layer <= wm.config.depth:
        raise UserError(f"layer must be in [1, {wm.config.depth}], got {layer}")
    torch.manual_seed(cfg.seed)
    feats, rewards, terms = transition_features(wm, cfg.data, "train", cfg.examples, layer, cfg.seed)
    heads = Heads(wm.config.width, wm.config.tokens_per_frame)
    heads.set_reward_scale(rewards)
    mean = float(heads.reward_mean)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="heads", unit="step")
    for step in steps:
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(feats), (min(cfg.batch_size, len(feats)),), generator=gen)
        loss = head_loss(heads, feats[idx].float(), rewards[idx], terms[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    heads.eval()
    del feats  # the training features can be large; the held-out ones are computed next
    eval_data, split = (cfg.eval_data, "all") if cfg.eval_data else (cfg.data, "val")
    held = transition_features(wm, eval_data, split, min(cfg.examples, 4000), layer, cfg.seed + 1)
    figures = accuracy(heads, *held, mean_reward=mean)
    out = Path(cfg.out) if cfg.out else resolve_checkpoint(cfg.ckpt)
    meta = {
        "layer": layer,
        "shape": heads.shape,
        "reward_range": [float(heads.reward_low), float(heads.reward_high)],
        "config": asdict(cfg),
        "held_out": {"data": eval_data, "split": split, **figures},
        "train": {"examples": int(len(rewards)), "final_loss": loss.item()},
    }
    save_heads(heads, meta, out)
    meta["written_to"] = str(out)
    return meta


def save_heads(heads: Heads, meta: dict[str, Any], out: Path) -> None:
    """Write ``heads.safetensors`` and ``heads.json`` into ``out`` (each file replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (HEADS_FILE + ".tmp")
    save_file({k: v.detach().float().contiguous() for k, v in heads.state_dict().items()}, str(tmp))
    tmp.replace(out / HEADS_FILE)
    tmp = out / (HEADS_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=float))
    tmp.replace(out / HEADS_META)


def load_heads(ckpt: Path, width: int, tokens: int) -> tuple[Heads, dict[str, Any]] | None:
    """The heads stored in ``ckpt`` (None if it has none); refuses heads made for another model."""
    if not (ckpt / HEADS_FILE).is_file():
        return None
    try:
        meta = json.loads((ckpt / HEADS_META).read_text())
        shape = meta["shape"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{ckpt / HEADS_META} is missing or unreadable ({err}); rerun sfw heads") from err
    if shape.get("width") != width or shape.get("tokens") != tokens:
        raise UserError(
            f"the heads in {ckpt} were trained for features of width {shape.get('width')} x {shape.get('tokens')} "
            f"tokens, this model has {width} x {tokens}; rerun sfw heads for it"
        )
    heads = Heads(**shape)
    state = load_file(str(ckpt / HEADS_FILE))
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"reward_low", "reward_high"}:  # heads from before the clamp lack those
        raise UserError(f"{ckpt / HEADS_FILE} does not hold heads of this version; rerun sfw heads")
    return heads.eval(), meta


def missing_heads_message(ckpt: str) -> str:
    return (
        f"the model {ckpt} has no reward/termination heads; train them on it first (about a minute on "
        f"a CPU): sfw heads ckpt={ckpt} data=DATASET (the dataset it was trained on)"
    )
