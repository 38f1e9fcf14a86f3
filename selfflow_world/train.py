"""Self-Flow world-model training: ``sfw train key=value ...`` or, on several processes,
``torchrun --nproc_per_node=N -m selfflow_world.train key=value ...`` (DDP; gloo on CPU, NCCL on CUDA).

What makes a run trustworthy over a week of GPU time:
- every random draw comes from generators derived from ``seed`` and saved in checkpoints; the data
  order is a pure function of (seed, step), so ``resume=true`` continues the exact loss curve;
- checkpoints are written atomically and the newest ``keep`` kept; a non-finite loss stops the run
  with the step that went bad, and never overwrites the last good checkpoint;
- the EMA weights (the Self-Flow teacher) are what validation and sample videos use.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from selfflow_world import __version__
from selfflow_world.checkpoint import (
    latest_checkpoint,
    load_train_state,
    load_weights,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from selfflow_world.clips import ClipDataset, ClipSpec, per_frame
from selfflow_world.episodes import manifest_fingerprint
from selfflow_world.errors import UserError, check_count
from selfflow_world.heads import Heads, recorded_rewards, save_heads
from selfflow_world.logger import Logger
from selfflow_world.model import (
    DATA_FIELDS,
    ModelConfig,
    WorldDiT,
    count_parameters,
    default_feature_layer,
    model_config,
    shift_frames,
)
from selfflow_world.objective import (
    ObjectiveConfig,
    Projector,
    compute_loss,
    default_sampler_steps,
    ema_decay_at,
    ema_update,
    imagined_history_batch,
    make_teacher,
)
from selfflow_world.runtime import autocast, resolve_device, tune_allocator
from selfflow_world.schedule import StepBatches, lr_factor


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what was kept."""


def _model_choice() -> type:
    """``sfw train``'s ``model`` group: a size preset plus any :class:`ModelConfig` field as an
    optional override (None keeps the preset's or ModelConfig's value). Made from ModelConfig's
    fields, so a new model setting is a command-line override (``model.<field>=...``) with no
    other change; the fields that come from the data are left out."""
    hints = typing.get_type_hints(ModelConfig)
    fields: list[tuple[str, Any, Any]] = [("preset", str, "small")]
    for f in dataclasses.fields(ModelConfig):
        if f.name not in DATA_FIELDS:
            fields.append((f.name, Optional[hints[f.name]], None))  # noqa: UP045 - OmegaConf needs Optional

    def build(self, **from_data: Any) -> ModelConfig:
        overrides = {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}
        return model_config(self.preset, **overrides, **from_data)

    return dataclasses.make_dataclass("ModelChoice", fields, namespace={"build": build})


ModelChoice = _model_choice()


@dataclass
class TrainConfig:
    """``sfw train`` settings; values and their documentation live in configs/train.yaml."""

    data: str = "data/reacher"
    out: str = "runs/reacher"
    steps: int = 20000
    stop_at: Optional[int] = None  # noqa: UP045 - OmegaConf needs Optional
    resume: bool = False
    init: Optional[str] = None  # noqa: UP045 - OmegaConf needs Optional
    seed: int = 0
    model: ModelChoice = field(default_factory=ModelChoice)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    history: int = 2
    future: int = 1
    imagined_history: int = 0
    imagined_share: float = 0.5
    stride: int = 1
    val_fraction: float = 0.1
    skip_corrupt: bool = False
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 500
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    num_workers: int = 0
    device: str = "auto"
    bf16: bool = True
    compile: bool = False
    log_every: int = 10
    val_every: int = 500
    val_batches: int = 8
    sample_every: int = 1000
    sample_frames: int = 8
    sample_steps: int = 4
    ckpt_every: int = 500
    keep: int = 3
    tensorboard: bool = True

    def validate(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "history",
            "future",
            "stride",
            "log_every",
            "val_every",
            "val_batches",
            "sample_every",
            "sample_frames",
            "sample_steps",
            "ckpt_every",
            "keep",
        ):
            check_count(name, getattr(self, name))
        check_count("imagined_history", self.imagined_history, minimum=0)
        if self.stop_at is not None:
            check_count("stop_at", self.stop_at)
            if self.stop_at > self.steps:
                raise UserError(f"stop_at must be at most steps={self.steps} (or null), got {self.stop_at}")
        if not 0 <= self.imagined_share <= 1:
            raise UserError(f"imagined_share must be in [0, 1], got {self.imagined_share!r}")
        if self.warmup < 0 or self.num_workers < 0:
            raise UserError(f"warmup and num_workers must be >= 0, got {self.warmup}, {self.num_workers}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or not self.grad_clip > 0:
            raise UserError(
                f"need lr > 0, min_lr_ratio in [0, 1], grad_clip > 0; got {self.lr}, {self.min_lr_ratio}, "
                f"{self.grad_clip}"
            )


# -- pure pieces -------------------------------------------------------------------------------------


def to_model_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """uint8 frames (B, T, 3, H, W) -> float in [-1, 1] on ``device``; actions (and rewards and
    terminated flags, as float, when the batch has them) to ``device``."""
    frames = batch["frames"].to(device, non_blocking=True).float() / 127.5 - 1.0
    out = {"frames": frames, "actions": batch["actions"].to(device, non_blocking=True)}
    for key in ("rewards", "terminated"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True).float()
    return out


# -- setup ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_setting: str) -> tuple[Dist, torch.device]:
    """DDP when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_setting == "auto" else device_setting.startswith("cuda")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        info = Dist(dist.get_rank(), dist.get_world_size(), local)
        device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return info, device
    device = resolve_device(device_setting)
    return Dist(), device


def _check_data_matches(model_cfg: dict[str, Any], image: int, action_dim: int, ckpt: Path) -> None:
    if model_cfg["image_size"] != image or model_cfg["action_dim"] != action_dim:
        raise UserError(
            f"dataset frames {image}x{image} with action dim {action_dim} do not match checkpoint {ckpt} "
            f"(frames {model_cfg['image_size']}, action dim {model_cfg['action_dim']})"
        )


def _resumed_model_config(
    saved: dict[str, Any], asked: ModelConfig, ckpt: Path, flag: str = "resume=true", new_run: bool = False
) -> ModelConfig:
    """The checkpoint's architecture. Settings that it predates keep their former defaults (e.g.
    ``mlp_act``); any saved setting that this run's config changes is an error naming them
    (``flag``, the option that reads the checkpoint, is named in it).

    A ``new_run`` started from another model's weights (``init=``) may train it for another temporal
    context (``max_frames``, from ``history`` and ``future``): no weight depends on it, since frames
    are told apart by rotary position only. A resumed run keeps its own."""
    resumed = ModelConfig.from_saved(saved, ckpt)
    if new_run:
        resumed = dataclasses.replace(resumed, max_frames=asked.max_frames)
    changed = [
        f"{key}: checkpoint {value!r}, this run {getattr(asked, key)!r}"
        for key, value in asdict(resumed).items()
        if key in saved and value != getattr(asked, key)
    ]
    if changed:
        raise UserError(
            f"checkpoint {ckpt} was built for another model config ({'; '.join(changed)}); {flag} "
            "continues the checkpoint's model: drop those settings, or start a new run with another out="
        )
    return resumed


class Trainer:
    """Owns the model, its EMA, the optimizer and the loop. Build with a :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.device)
        if self.device.type == "cpu":
            tune_allocator()  # keep activation pages in the heap between steps (see runtime.py)
        self.out = Path(cfg.out)
        spec = ClipSpec(cfg.history, cfg.future, cfg.stride, cfg.val_fraction, cfg.seed, cfg.skip_corrupt)
        # with imagined_history, training clips carry the frames to imagine before the model's window
        train_spec = dataclasses.replace(spec, future=cfg.future + cfg.imagined_history)
        try:
            self.train_set = ClipDataset(cfg.data, train_spec, "train")
        except UserError as err:
            if not cfg.imagined_history:
                raise
            raise UserError(
                f"{err} (training clips also carry the imagined_history={cfg.imagined_history} frames)"
            ) from err
        self.val_set = ClipDataset(cfg.data, spec, "val") if cfg.val_fraction > 0 else None
        if len(self.train_set) == 0:
            raise UserError(
                f"dataset {cfg.data} has no training clip of {train_spec.length} frames; collect longer "
                "episodes or lower history/future/imagined_history"
            )
        h, w, _ = self.train_set.frame_shape
        if h != w:
            raise UserError(f"frames must be square for the model, dataset {cfg.data} has {h}x{w}")
        self.fingerprint = manifest_fingerprint(Path(cfg.data))

        resume_from = self._resume_checkpoint()
        # init=: a new run starts from another model's weights (fine-tuning); a run that already
        # has checkpoints continues them instead, so rerunning the same command resumes it
        init_from = resolve_checkpoint(cfg.init) if cfg.init and resume_from is None else None
        source = resume_from or init_from
        if source is not None:
            saved = read_meta(source)["model_config"]
            _check_data_matches(saved, h, self.train_set.action_dim, source)
        self.model_cfg = cfg.model.build(
            image_size=h, action_dim=self.train_set.action_dim, max_frames=spec.length
        )
        if source is not None:
            flag = "resume=true" if resume_from is not None else f"init={cfg.init}"
            self.model_cfg = _resumed_model_config(
                saved, self.model_cfg, source, flag, new_run=resume_from is None
            )
        self.layers = (
            cfg.objective.resolve_layers(self.model_cfg.depth) if cfg.objective.mode == "selfflow" else None
        )

        # the global RNG feeds dropout (the heads); seeded here, saved in checkpoints, restored on resume
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.model = WorldDiT(self.model_cfg, generator=gen).to(self.device)
        self.ema = make_teacher(self.model)
        self.projector = (
            Projector(self.model_cfg.width, generator=gen).to(self.device)
            if cfg.objective.mode == "selfflow"
            else None
        )
        # reward/termination heads trained with the model (objective.heads_weight > 0); the EMA copy
        # reads the EMA model's features and is what the checkpoint's heads.safetensors holds
        self.heads: Heads | None = None
        self.ema_heads: Heads | None = None
        if cfg.objective.heads_weight > 0:
            self.heads = Heads(self.model_cfg.width, self.model_cfg.tokens_per_frame).to(self.device)
            self.heads.set_reward_scale(recorded_rewards(self.train_set))
            self.ema_heads = make_teacher(self.heads).eval()
        # parameters outside the DDP-wrapped model: their gradients are averaged by hand (_sync_grads)
        self.extra_params = [p for m in (self.projector, self.heads) if m is not None for p in m.parameters()]
        params = list(self.model.parameters()) + self.extra_params
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        )
        # loss randomness: one generator per rank, on the training device
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1009 + 17 + self.dist.rank)
        self.step = 0
        self.wall_s = 0.0  # seconds spent in fit() over the whole run, resumes included
        if resume_from is not None:
            self._load(resume_from)
        elif init_from is not None:
            # the source's EMA weights (what a shipped model holds) start both student and teacher
            load_weights(init_from, "ema", self.model)
            load_weights(init_from, "ema", self.ema)

        self.train_model: torch.nn.Module = self.model
        if self.dist.world > 1:
            ddp_args = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, **ddp_args)
        # the EMA teacher's forward is a third of a selfflow step's work: compiled as well, or
        # compile=true speeds up flow but not selfflow (measured on an H100, BENCHMARKS.md)
        self.teacher_model: torch.nn.Module = self.ema
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
            self.teacher_model = torch.compile(self.ema)

    # -- checkpoints ------------------------------------------------------------------------------
    def _resume_checkpoint(self) -> Path | None:
        existing = latest_checkpoint(self.out)
        if existing is None:
            return None
        if not self.cfg.resume:
            raise UserError(
                f"{self.out} already holds checkpoints (newest {existing.name}); pass resume=true to continue "
                "that run, or choose another out="
            )
        return existing

    def _load(self, ckpt: Path) -> None:
        meta = read_meta(ckpt)
        load_weights(ckpt, "model", self.model)
        load_weights(ckpt, "ema", self.ema)
        if self.projector is not None:
            load_weights(ckpt, "projector", self.projector)
        saved_weight = float(meta.get("config", {}).get("objective", {}).get("heads_weight", 0.0))
        if (saved_weight > 0) != (self.heads is not None):
            raise UserError(
                f"checkpoint {ckpt} was trained with objective.heads_weight={saved_weight}, this run asks for "
                f"{self.cfg.objective.heads_weight}: resume with heads_weight "
                f"{'> 0' if saved_weight > 0 else '= 0'}, or start a new run with another out= "
                "(heads for a trained model: sfw heads)"
            )
        if self.heads is not None:
            load_weights(ckpt, "heads", self.heads)
            load_weights(ckpt, "ema_heads", self.ema_heads)
        state = load_train_state(ckpt)
        if state.get("objective_mode") != self.cfg.objective.mode:
            raise UserError(
                f"checkpoint {ckpt} was trained with objective={state.get('objective_mode')}, "
                f"this run asks for objective={self.cfg.objective.mode}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        gens = state["generators"]
        self.generator.set_state(gens[self.dist.rank] if self.dist.rank < len(gens) else gens[0])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(meta["step"])
        self.wall_s = float(meta.get("metrics", {}).get("wall_s", 0.0))
        if meta.get("dataset_fingerprint") != self.fingerprint and self.dist.main:
            print(f"note: dataset {self.cfg.data} changed since {ckpt.name} was written", file=sys.stderr)

    def save(self, metrics: dict[str, float] | None = None) -> Path | None:
        gens = [self.generator.get_state()]
        if self.dist.world > 1:
            gathered: list[Any] = [None] * self.dist.world
            dist.all_gather_object(gathered, self.generator.get_state())
            gens = gathered
        if not self.dist.main:
            return None
        modules = {"model": self.model, "ema": self.ema}
        if self.projector is not None:
            modules["projector"] = self.projector
        if self.heads is not None:
            modules["heads"], modules["ema_heads"] = self.heads, self.ema_heads
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generators": gens,
            "torch_rng": torch.get_rng_state(),
            "objective_mode": self.cfg.objective.mode,
        }
        meta = {
            "config": asdict(self.cfg),
            "model_config": asdict(self.model_cfg),
            "dataset": str(Path(self.cfg.data).resolve()),
            "dataset_fingerprint": self.fingerprint,
            "action_low": self.train_set.manifest["action_low"],
            "action_high": self.train_set.manifest["action_high"],
            "env": self.train_set.manifest["env"],
            # how the frames were rendered, so fresh episodes can be collected to match (sfw demo)
            "render": {k: self.train_set.manifest[k] for k in ("size", "camera", "action_repeat")},
            "metrics": metrics or {},
            "library_version": __version__,
        }
        extra = None
        if self.ema_heads is not None:  # so WorldModel.load attaches the heads, as after sfw heads

            def extra(directory: Path) -> None:
                heads_meta = {
                    "layer": default_feature_layer(self.model_cfg.depth),
                    "shape": self.ema_heads.shape,
                    "reward_range": [float(self.ema_heads.reward_low), float(self.ema_heads.reward_high)],
                    "trained": "jointly with the world model (objective.heads_weight)",
                    "heads_weight": self.cfg.objective.heads_weight,
                    "step": self.step,
                    "validation": {k: v for k, v in (metrics or {}).items() if k.startswith("val_reward")},
                }
                save_heads(self.ema_heads, heads_meta, directory)

        return save_checkpoint(self.out, self.step, modules, state, meta, keep=self.cfg.keep, extra=extra)

    # -- the loop -----------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        sampler = StepBatches(
            len(self.train_set),
            self.cfg.batch_size,
            self.cfg.seed,
            self.step,
            self.end,
            self.dist.rank,
            self.dist.world,
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # its own generator for the workers' base seed, which would otherwise be drawn from the
            # global RNG (the heads' dropout) each time the loader starts, e.g. once more on resume
            generator=torch.Generator().manual_seed(self.cfg.seed + self.step),
        )

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        imagined_rows = None
        with autocast(self.device, self.cfg.bf16):
            if self.cfg.imagined_history > 0:
                # the EMA model imagines the history: its errors are those of the model users get
                batch, imagined_rows = imagined_history_batch(
                    self.ema,
                    batch,
                    history=self.cfg.history,
                    imagined=self.cfg.imagined_history,
                    share=self.cfg.imagined_share,
                    generator=self.generator,
                    steps=self.sample_steps,
                )
            loss, metrics = compute_loss(
                self.train_model,
                batch,
                self.cfg.objective,
                self.generator,
                teacher=self.teacher_model,
                projector=self.projector,
                heads=self.heads,
                history=self.cfg.history,
            )
        if not torch.isfinite(loss):
            newest = latest_checkpoint(self.out)
            kept = (
                f"the last good checkpoint {newest} is intact" if newest else "no checkpoint was written yet"
            )
            raise TrainingError(
                f"loss became {loss.item()} at step {self.step + 1}; stopped, {kept}. Try a lower lr= or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_grads()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        decay = ema_decay_at(self.step, self.cfg.objective)
        ema_update(self.ema, self.model, decay)
        if self.heads is not None:
            ema_update(self.ema_heads, self.heads, decay)
        self.step += 1
        out = {k: float(v) for k, v in metrics.items()}
        if imagined_rows is not None:
            out["imagined_share"] = imagined_rows / batch["frames"].shape[0]
        out["grad_norm"] = float(grad_norm)
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _sync_grads(self) -> None:
        """Average the gradients of the projector and heads over processes (DDP averages only the
        model's), so every rank keeps identical copies of them."""
        if self.dist.world == 1:
            return
        for p in self.extra_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.dist.world

    @property
    def end(self) -> int:
        """The step this call of :meth:`fit` stops at: ``stop_at`` when set (the schedule still spans
        ``steps``, so a later ``resume=true`` continues it exactly), else ``steps``."""
        return self.cfg.steps if self.cfg.stop_at is None else self.cfg.stop_at

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        end = self.end
        if self.step >= end:
            if self.dist.main:
                limit = f"steps={cfg.steps}" if cfg.stop_at is None else f"stop_at={cfg.stop_at}"
                print(f"{self.out} is already at step {self.step} >= {limit}; nothing to do")
            return {}
        logger = Logger(
            self.out,
            total=cfg.steps,
            start_step=self.step,
            tensorboard=cfg.tensorboard,
            enabled=self.dist.main,
        )
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            logger.message(
                f"model {cfg.model.preset}: {count_parameters(self.model) / 1e6:.2f}M params, "
                f"{self.model_cfg.tokens_per_frame} tokens/frame; objective {cfg.objective.mode}; "
                f"{len(self.train_set)} train clips; device {self.device}; world {self.dist.world}"
                + (f"; resumed at step {self.step}" if self.step else "")
            )
        last: dict[str, float] = {}
        latest_val: dict[str, float] = {}
        tick, tick_step = time.perf_counter(), self.step
        began, wall_before = time.perf_counter(), self.wall_s
        try:
            for raw in self._loader():
                last = self.train_step(to_model_batch(raw, self.device))
                step, row = self.step, {}
                self.wall_s = wall_before + time.perf_counter() - began
                last["wall_s"] = self.wall_s  # in metrics.csv and in each checkpoint's meta.json
                if step % cfg.log_every == 0 or step == end:
                    now = time.perf_counter()
                    speed = (step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    row.update(last)
                    shown = {"loss": last["loss"], "it/s": speed}
                    if "val_action_sensitivity" in latest_val:  # shown from the first validation on
                        shown["act"] = latest_val["val_action_sensitivity"]
                    logger.progress(step, shown)
                if step % cfg.val_every == 0 or step == end:
                    if self.dist.main and self.val_set is not None and len(self.val_set):
                        # fork_rng: the DataLoader inside draws from the global RNG, which the
                        # training step (the heads' dropout) uses, so validating must not move it
                        with torch.random.fork_rng(devices=[]):
                            val = self.validate()
                        row.update(val)
                        last.update(val)
                        latest_val = val
                        logger.message(
                            f"step {step}: val_flow_loss {val['val_flow_loss']:.4f}, 1-step PSNR "
                            f"{val['val_psnr']:.2f} dB (copy last frame {val['val_psnr_copy_last']:.2f} dB), "
                            f"action sensitivity {val['val_action_sensitivity']:.3f}, action gap "
                            f"{val['val_action_gap']:.3f}"
                        )
                    self._barrier()
                if row:
                    logger.log(step, row)
                if (step % cfg.sample_every == 0 or step == end) and self.dist.main and self.val_set:
                    with torch.random.fork_rng(devices=[]):
                        self.write_samples(step)
                if step % cfg.ckpt_every == 0 or step == end:
                    self.save(last)
                    self._barrier()
        finally:
            logger.close()
        return last

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    # -- evaluation with the EMA weights --------------------------------------------------------
    @property
    def sample_steps(self) -> int:
        """Sampler steps of validation and sample videos: ``sample_steps``, or 1 for a model trained
        only at ``t = 1`` (as :attr:`WorldModel.sampler_steps` imagines with it)."""
        return default_sampler_steps(self.cfg.objective.t_one, self.cfg.sample_steps)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation flow loss (fixed noise), and 1-step PSNR of sampled frames vs copying the last."""
        from selfflow_world import rollout as rollouts
        from selfflow_world.action_following import action_sensitivity
        from selfflow_world.video import psnr

        model = self.ema.eval()
        flow_cfg = ObjectiveConfig(**{**asdict(self.cfg.objective), "mode": "flow", "heads_weight": 0.0})
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed + 99)
        # the same clips every round, drawn from all validation episodes (in order they would be
        # neighbouring steps of the first few episodes)
        order = torch.utils.data.RandomSampler(
            self.val_set, generator=torch.Generator().manual_seed(self.cfg.seed)
        )
        loader = DataLoader(self.val_set, batch_size=self.cfg.batch_size, sampler=order)
        losses, psnrs, copies, changes, truths, gaps, copy_mse, rewards = [], [], [], [], [], [], [], []
        for i, raw in enumerate(loader):
            if i >= self.cfg.val_batches:
                break
            batch = to_model_batch(raw, self.device)
            with autocast(self.device, self.cfg.bf16):
                _, metrics = compute_loss(model, batch, flow_cfg, gen, history=self.cfg.history)
                hist = self.cfg.history
                frames, actions = batch["frames"], batch["actions"]
                state = rollouts.start(model, frames[:, :hist], actions[:, :hist])
                pred = rollouts.advance(
                    model, state, actions[:, hist], steps=self.sample_steps, generator=gen
                )
                noise = torch.randn(frames[:, hist].shape, generator=gen, device=gen.device).to(self.device)
                other = torch.rand(actions[:, hist].shape, generator=gen, device=gen.device) * 2 - 1
                sens = action_sensitivity(model, frames, actions, hist, noise, other.to(self.device))
            if self.ema_heads is not None:
                rewards.append(self._val_reward_error(model, batch))
            losses.append(float(metrics["flow_loss"]))
            psnrs.append(psnr(pred, frames[:, hist]))
            copies.append(psnr(frames[:, hist - 1], frames[:, hist]))
            changes.append(sens["mean_abs_change"])
            truths.append(sens["true_frame_change"])
            gaps.append(sens["mse_alternative"] - sens["mse_recorded"])
            copy_mse.append(sens["mse_copy_last"])
        truth = float(np.mean(truths)) if truths else float("nan")
        heads_figures = {}
        if rewards:  # mean absolute reward error, and that of always predicting the training mean
            heads_figures = {
                "val_reward_mae": float(np.mean([r[0] for r in rewards])),
                "val_reward_mae_predict_mean": float(np.mean([r[1] for r in rewards])),
            }
        return {
            **heads_figures,
            "val_flow_loss": float(np.mean(losses)),
            "val_psnr": float(torch.cat(psnrs).mean()),
            "val_psnr_copy_last": float(torch.cat(copies).mean()),
            # one-step prediction under a uniformly random action vs the recorded one, over the
            # true frame change: ~0 when the model ignores its actions (action_following.py)
            "val_action_sensitivity": float(np.mean(changes)) / truth if truth > 0 else float("nan"),
            # correctness-aware: how much worse the random action's prediction matches the recorded
            # frame, over the copy-last MSE (0 when actions are ignored or followed wrongly)
            "val_action_gap": float(np.mean(gaps)) / float(np.mean(copy_mse))
            if np.mean(copy_mse) > 0
            else float("nan"),
        }

    def _val_reward_error(self, model, batch) -> tuple[float, float]:
        """Reward error of the EMA heads on the clip's last frame, read as an imagined frame is
        (clean, after ``history`` frames), and of predicting the training mean."""
        frames, actions = batch["frames"], batch["actions"]
        layer, tokens = default_feature_layer(self.model_cfg.depth), self.model_cfg.tokens_per_frame
        end = self.cfg.history + 1
        zeros = torch.zeros(frames.shape[0], device=self.device)
        clip = frames[:, :end]
        _, hidden = model(clip, zeros, actions[:, :end], shift_frames(clip), return_hidden=(layer,))
        pred, _ = self.ema_heads(hidden[layer][:, -tokens:])
        truth = batch["rewards"][:, end - 1]
        return float((pred - truth).abs().mean()), float((self.ema_heads.reward_mean - truth).abs().mean())

    @torch.no_grad()
    def write_samples(self, step: int, episodes: int = 2) -> None:
        """real | imagined | error videos of validation episodes, ``sample_frames`` ahead."""
        from selfflow_world.episodes import load_episode
        from selfflow_world.sampler import rollout
        from selfflow_world.video import side_by_side, to_float, to_uint8, write_video

        model, hist = self.ema.eval(), self.cfg.history
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed + 7)
        for info in self.val_set.episodes[:episodes]:
            arr = load_episode(info.path)
            horizon = min(self.cfg.sample_frames, info.steps + 1 - hist)
            if horizon < 1:
                continue
            frames = to_float(np.array(arr["frames"][: hist + horizon])).to(self.device)  # (T, 3, H, W)
            acts = self.val_set.normalize_actions(per_frame(arr["actions"], 0, hist + horizon))
            acts[0] = 0.0  # no action precedes the reset frame
            acts = torch.from_numpy(acts.astype(np.float32)).to(self.device)
            imagined = rollout(
                model,
                frames[None, :hist],
                acts[None, :hist],
                acts[None, hist:],
                steps=self.sample_steps,
                generator=gen,
            )[0]
            video = side_by_side(to_uint8(frames[hist:]), to_uint8(imagined))
            write_video(self.out / "samples" / f"step_{step:08d}_ep{info.index:06d}", video)


def main(overrides: list[str] | None = None) -> int:
    """Entry point of ``sfw train`` and ``python -m selfflow_world.train``."""
    from selfflow_world.config import load_config

    overrides = sys.argv[1:] if overrides is None else overrides
    cfg = load_config("train", overrides, TrainConfig)
    trainer = Trainer(cfg)
    try:
        last = trainer.fit()
        if trainer.dist.main and last:
            print(f"done: step {trainer.step}, loss {last.get('loss', float('nan')):.4f} -> {cfg.out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"sfw train: error: {err}", file=sys.stderr)
        sys.exit(2)
