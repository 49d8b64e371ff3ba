"""Fixtures of the data tests: the shared real data folder and small synthetic audio."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """/work/shared/data (``../shared/data`` from the repository); skip when absent."""
    p = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not (p / "speech").is_dir():
        pytest.skip(f"shared data not found at {p}")
    return p


@pytest.fixture(scope="session")
def espeak_audio() -> Callable[[str], tuple[np.ndarray, int]]:
    """Real speech from espeak-ng as ``(float32 mono, 22050)``; skip without espeak-ng."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    import io

    import soundfile as sf

    cache: dict[str, tuple[np.ndarray, int]] = {}

    def make(text: str) -> tuple[np.ndarray, int]:
        if text not in cache:
            wav = subprocess.run(
                ["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True
            ).stdout
            data, sr = sf.read(io.BytesIO(wav), dtype="float32")
            cache[text] = (data, sr)
        return cache[text]

    return make


def _tone(seconds: float, sr: int = 16000, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels == 1:
        return x
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


@pytest.fixture(scope="session")
def tone() -> Callable[..., np.ndarray]:
    """``tone(seconds, sr=16000, freq=220, channels=1)``: a sine ``[frames]`` or ``[frames, channels]``
    (channel c has amplitude 0.3 * (c + 1) / channels)."""
    return _tone
