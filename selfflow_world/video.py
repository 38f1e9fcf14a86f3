"""Side-by-side videos (real | imagined | absolute error; one start under several action sequences)
as GIF and MP4."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(T, C, H, W)`` float in [-1, 1] or uint8 ``(T, H, W, C)`` -> uint8 ``(T, H, W, C)``."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if frames.dtype == np.uint8:
        return frames
    frames = np.clip((frames + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return frames.transpose(0, 2, 3, 1)


def to_float(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., H, W, C)`` -> float ``(..., C, H, W)`` in [-1, 1] (the inverse of :func:`to_uint8`)."""
    x = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    return x.movedim(-1, -3).float() / 127.5 - 1.0


def side_by_side(real: np.ndarray, imagined: np.ndarray, scale: int = 2) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` pair -> ``(T, H*s, 3*W*s + 2*s, 3)``: real | imagined | |error|."""
    error = np.abs(real.astype(np.int16) - imagined.astype(np.int16)).astype(np.uint8)
    gap = np.full((*real.shape[:2], 1, 3), 255, np.uint8)
    frames = np.concatenate([real, gap, imagined, gap, error], axis=2)
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def label(frames: np.ndarray, text: str, height: int = 12) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` with a white strip of ``height`` pixels on top carrying ``text``."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (frames.shape[2], height), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 0), text, fill=(0, 0, 0))
    top = np.broadcast_to(np.asarray(strip, np.uint8), (frames.shape[0], height, frames.shape[2], 3))
    return np.concatenate([top, frames], axis=1)


def action_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], scale: int = 2) -> np.ndarray:
    """One start under several action sequences: per row ``(name, simulator, model)`` uint8
    ``(T, H, W, 3)`` frames, drawn as ``simulator | model`` side by side, rows stacked, each row
    and column labelled. Returns uint8 ``(T, H', W', 3)``."""
    gap = np.full((*rows[0][1].shape[:2], 1, 3), 255, np.uint8)
    panels = []
    for name, sim, model in rows:
        pair = np.concatenate([sim, gap, model], axis=2).repeat(scale, axis=1).repeat(scale, axis=2)
        panels.append(label(pair, f"{name}: simulator | model"))
    return np.concatenate(panels, axis=1)


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> list[Path]:
    """Write ``frames`` (uint8 ``(T, H, W, 3)``) as ``path.gif`` and ``path.mp4``; returns the files."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    gif = path.with_suffix(".gif")
    iio.imwrite(gif, frames, duration=1000 / fps, loop=0)
    written.append(gif)
    try:
        mp4 = path.with_suffix(".mp4")
        h, w = frames.shape[1:3]
        padded = np.pad(frames, ((0, 0), (0, (-h) % 16), (0, (-w) % 16), (0, 0)))  # codec block size
        iio.imwrite(mp4, padded, fps=fps, codec="libx264")
        written.append(mp4)
    except Exception as err:  # noqa: BLE001 - ffmpeg missing or failing: the GIF is still there
        warnings.warn(f"could not write {path.with_suffix('.mp4')} ({err}); the GIF is written", stacklevel=2)
    return written


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per leading index between frames in [-1, 1] (see :func:`selfflow_world.metrics.psnr`)."""
    from selfflow_world.metrics import psnr as _psnr

    return _psnr(a, b)
