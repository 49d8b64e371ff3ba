"""Small torch helpers shared across the package: what the machine can compute fast."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 matmuls run
    about 3x faster than fp32 in oneDNN; elsewhere bf16 is emulated and slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return torch.backends.mkldnn.is_available() and any(f in flags for f in _BF16_FLAGS)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting (``auto``, ``fp32``, ``bf16``); None is fp32.

    ``auto`` is bf16 on CUDA and on CPUs with bf16 instructions, fp32 elsewhere.
    """
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())
        precision = "bf16" if fast else "fp32"
    return torch.bfloat16 if precision == "bf16" else None
