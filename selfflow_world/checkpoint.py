"""Checkpoints that never unpickle arbitrary objects, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_00001234/`` holding

    weights.safetensors   model, EMA model and projector weights (``model.``, ``ema.``, ``projector.``)
    train_state.pt        optimizer, LR schedule and RNG states (tensors and plain containers only,
                          read back with ``torch.load(weights_only=True)``)
    meta.json             step, resolved config, model config, dataset fingerprint, metrics

It is written as ``.tmp-step_...`` and renamed into place; only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfflow_world.errors import UserError

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as sorted ``(step, directory)``."""
    root = Path(run) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its newest), a checkpoint directory, or the
    name of a model shipped with the package (``reacher-easy``; :mod:`selfflow_world.pretrained`)."""
    from selfflow_world import pretrained

    if isinstance(path, str) and pretrained.looks_like_name(path):
        return pretrained.model_dir(path)
    path = Path(path)
    if (path / "meta.json").is_file() and (path / "weights.safetensors").is_file():
        return path
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is not None:
            return newest
    raise UserError(
        f"no checkpoint at {path}: expected a run directory with checkpoints/step_* or a checkpoint directory"
    )


def save_checkpoint(
    run: Path,
    step: int,
    modules: dict[str, nn.Module],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 3,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write one checkpoint atomically and prune older ones beyond ``keep``; ``extra(directory)``
    writes more files into it before it is renamed into place."""
    root = Path(run) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {}
    for prefix, module in modules.items():
        for key, value in unwrap(module).state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, str(tmp / "weights.safetensors"))
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True, default=str))
    if extra is not None:
        extra(tmp)
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # same step written again (e.g. a resumed run): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {ckpt} has no readable meta.json ({err.__class__.__name__})") from err


def load_weights(ckpt: Path, prefix: str, module: nn.Module) -> None:
    """Load ``prefix.*`` weights into ``module``; a clear error lists mismatched keys and shapes."""
    try:
        tensors = load_file(str(Path(ckpt) / "weights.safetensors"))
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"checkpoint {ckpt}: weights.safetensors is unreadable ({err})") from err
    state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    upgrade = getattr(unwrap(module), "upgrade_state_dict", None)  # weights under former names
    if upgrade is not None:
        state = upgrade(state)
    target = unwrap(module).state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(state) & set(target))
        if state[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
        if missing:
            parts.append(f"missing {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
        raise UserError(
            f"checkpoint {ckpt} was built for another model config ({prefix}): " + "; ".join(parts)
        )
    unwrap(module).load_state_dict(state)


def load_train_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer, schedule and RNG states (``weights_only`` loading: no arbitrary objects).

    A file that holds anything else (tampered, or written by other software) is refused with a
    one-line error naming it; it is never unpickled in full."""
    path = Path(ckpt) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"checkpoint {ckpt} has no train_state.pt, so it cannot be resumed") from err
    except Exception as err:  # pickle.UnpicklingError, RuntimeError from a corrupt zip, ...
        raise UserError(
            f"{path} is not a selfflow-world training state (it holds objects other than tensors and "
            f"plain containers, or is corrupt: {err.__class__.__name__}); refusing to load it. Resume from "
            "another checkpoint, or start a new run"
        ) from err
