"""Audio from anything a user hands over: a path, raw bytes, base64, an array, an upload.

Every input ends as float32 mono 16 kHz ``np.ndarray``, decoded by :mod:`blsp.data.audio` with
the request's :class:`AudioLimits` and ``strict`` (truncated and empty files are refused). Every
failure is an ``AudioError`` that names the source (a path, or a field such as
``messages[0].content[1]``) and the reason.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

import numpy as np

from blsp.data.audio import (
    NO_LIMITS,
    SAMPLE_RATE,
    AudioLimits,
    decode_audio_bytes,
    load_audio,
    to_mono_resampled,
)
from blsp.errors import AudioError

__all__ = [
    "NO_LIMITS",
    "AudioLimits",
    "as_waveform",
    "base64_audio_bytes",
    "decode_base64_audio",
    "duration_seconds",
    "read_audio_file",
]


def base64_audio_bytes(
    b64: str, fmt: str | None = None, *, source: str = "audio", limits: AudioLimits = NO_LIMITS
) -> tuple[bytes, str | None]:
    """The encoded bytes of base64 text (optionally a ``data:audio/...;base64,`` URL) and its format hint."""
    if not isinstance(b64, str) or not b64.strip():
        raise AudioError(f"{source}: audio data is empty or not a string")
    text = b64.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise AudioError(f"{source}: a data URL must look like data:audio/wav;base64,<data>")
        fmt = fmt or header[5:].split(";", 1)[0] or None
    if limits.max_bytes is not None and len(text) * 3 // 4 > limits.max_bytes:
        limits.check_bytes(len(text) * 3 // 4, source)
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise AudioError(f"{source}: invalid base64 audio data ({e})") from e
    return raw, fmt


def decode_base64_audio(
    b64: str, fmt: str | None = None, *, source: str = "audio", limits: AudioLimits = NO_LIMITS
) -> np.ndarray:
    """Decode base64 text (optionally a ``data:audio/...;base64,`` URL) to 16 kHz mono float32."""
    raw, fmt = base64_audio_bytes(b64, fmt, source=source, limits=limits)
    return decode_audio_bytes(raw, fmt, source=source, limits=limits)


def read_audio_file(path: str | os.PathLike[str], *, limits: AudioLimits = NO_LIMITS) -> np.ndarray:
    """Read an audio file from disk (``path`` or ``path:start:num`` segment) with the limits, strictly."""
    return load_audio(path, limits=limits, strict=True)


def as_waveform(
    audio: Any,
    sampling_rate: int | None = None,
    *,
    source: str = "audio",
    limits: AudioLimits = NO_LIMITS,
) -> np.ndarray:
    """Turn any supported audio value into 16 kHz mono float32.

    Accepts a path (``str``/``Path``), encoded ``bytes``, a 1-D or 2-D (``[samples, channels]``)
    array or tensor with ``sampling_rate`` (16 kHz when omitted), a ``(sampling_rate, array)``
    tuple (Gradio), or a dict ``{"array", "sampling_rate"}`` / ``{"path"}`` (datasets).
    """
    if isinstance(audio, dict):
        if "array" in audio:
            return as_waveform(audio["array"], audio.get("sampling_rate"), source=source, limits=limits)
        if audio.get("path"):
            return as_waveform(audio["path"], source=source, limits=limits)
        if audio.get("bytes"):
            return decode_audio_bytes(audio["bytes"], source=source, limits=limits)
        raise AudioError(f"{source}: an audio dict needs 'array' (+ 'sampling_rate'), 'path' or 'bytes'")
    if isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[0], int):
        return as_waveform(audio[1], audio[0], source=source, limits=limits)
    if isinstance(audio, str | Path):
        return read_audio_file(audio, limits=limits)
    if isinstance(audio, bytes | bytearray | memoryview):
        return decode_audio_bytes(bytes(audio), source=source, limits=limits)
    if hasattr(audio, "detach") and hasattr(audio, "cpu"):  # a torch tensor
        audio = audio.detach().cpu().float().numpy()
    if isinstance(audio, np.ndarray | list):
        arr = np.asarray(audio)
        sr = int(sampling_rate or SAMPLE_RATE)
        if arr.ndim == 2 and arr.shape[0] <= 8 < arr.shape[1]:
            arr = arr.T  # [channels, samples] -> [samples, channels]
        if arr.ndim not in (1, 2) or arr.size == 0:
            raise AudioError(
                f"{source}: expected a non-empty 1-D (or [samples, channels]) array, got shape {arr.shape}"
            )
        if np.issubdtype(arr.dtype, np.integer):  # PCM integers (Gradio's numpy audio)
            arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise AudioError(f"{source}: audio contains NaN or infinite samples")
        limits.check_seconds(arr.shape[0] / sr, source)
        return to_mono_resampled(arr, sr)
    raise AudioError(
        f"{source}: unsupported audio value of type {type(audio).__name__} "
        "(give a path, bytes, a numpy array with sampling_rate, or a dict)"
    )


def duration_seconds(wav: np.ndarray) -> float:
    return len(wav) / SAMPLE_RATE
