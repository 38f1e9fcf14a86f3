"""Process-level tuning for CPU training and rollouts.

glibc serves allocations above its mmap threshold (128 KiB at first) with fresh ``mmap`` pages and
returns freed memory to the OS, so a training step that allocates and frees the same multi-MB
activation tensors every iteration pays page faults for all of them again. Raising the mmap and
trim thresholds keeps those pages in the heap for reuse, which makes CPU training steps cheaper
(bench/bench_train.py, BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_DONE = False


def tune_allocator(
    mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, top_pad: int = 64 << 20
) -> bool:
    """Raise glibc's mmap/trim thresholds once per process; returns whether it applied (Linux glibc)."""
    global _DONE
    if _DONE:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = all(
            libc.mallopt(option, value) == 1
            for option, value in (
                (_M_MMAP_THRESHOLD, mmap_threshold),
                (_M_TRIM_THRESHOLD, trim_threshold),
                (_M_TOP_PAD, top_pad),
            )
        )
    except (OSError, AttributeError):
        return False
    _DONE = ok
    return ok


def resolve_device(setting: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    from selfflow_world.errors import UserError

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as err:
        raise UserError(f"device {setting!r} is not valid; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={setting} but CUDA is not available here; use device=cpu or auto")
    return device


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def casts_weights(device: torch.device) -> bool:
    """Whether bf16 inference here casts the weights themselves (CPUs with native bf16: no per-op
    dtype conversions, so faster than autocast there and as close to float32, BENCHMARKS.md) instead
    of autocasting (CUDA)."""
    return device.type == "cpu" and bf16_supported(device)


def freezes_compiled(device: torch.device) -> bool:
    """Whether compiled inference here folds the weights into the graphs (``compile_rollouts(freeze=
    True)``): on CPU, so that oneDNN prepacks the bf16 weights and fuses bias and GELU into the
    linears, which beats graphs with the weights as inputs (BENCHMARKS.md); not measured on CUDA,
    which keeps the shared graphs."""
    return device.type == "cpu"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when asked for and native there; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and bf16_supported(device))
