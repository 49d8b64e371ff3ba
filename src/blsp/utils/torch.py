"""Small torch helpers shared across the package: dtype names, the device to run on, and what the
machine can compute fast."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from blsp.errors import ConfigError

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

#: the torch dtype of each dtype name a setting may give (``auto`` is decided by the caller)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype a name means (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``);
    None for ``auto``. Raises ConfigError for any other name."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16; not {name!r}")
    return DTYPES[name]


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """What ``auto`` means for inference on ``device``: bfloat16 on a GPU that supports it (float16
    otherwise), float32 on CPU."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` (or None): ``cuda:<local rank>`` when a GPU is visible, else ``cpu``; a bare ``cuda``
    also gets the local rank. The local rank is ``$LOCAL_RANK`` (0) unless given, modulo the GPUs."""
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        count = torch.cuda.device_count()
        resolved = torch.device(f"cuda:{local % count if count else local}")
    return resolved


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
