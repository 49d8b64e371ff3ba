"""Audio from anything a user hands over: a path, raw bytes, base64, an array, an upload.

Every input ends as float32 mono 16 kHz ``np.ndarray``. Decoding is bounded: a duration limit is
checked from the header before the samples are decoded, truncated files are refused (libsndfile
would otherwise quietly return the part that is there), and the ``ffmpeg`` fallback for formats
libsndfile cannot read (webm, m4a, aac, ...) runs with a time limit. Every failure is an
``AudioError`` that names the source (a path, or a field such as ``messages[0].content[1]``) and
the reason.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blsp.errors import AudioError

SAMPLE_RATE = 16000

# Formats libsndfile decodes itself, and those handed to ffmpeg when it is installed.
SOUNDFILE_FORMATS = frozenset(
    {"wav", "wave", "mp3", "flac", "ogg", "oga", "opus", "aiff", "aif", "au", "caf", "w64"}
)
FFMPEG_FORMATS = frozenset({"webm", "m4a", "mp4", "aac", "weba", "mka", "3gp", "amr", "wma"})
KNOWN_FORMATS = SOUNDFILE_FORMATS | FFMPEG_FORMATS

FFMPEG_TIMEOUT_S = 30.0
# ffmpeg demuxer names of formats whose name is not one (``-f`` takes a demuxer name).
FFMPEG_DEMUXERS = {"weba": "webm", "mka": "matroska", "wma": "asf"}
# libsndfile reports a length it does not know (a streamed FLAC, say) as a huge frame count.
UNKNOWN_FRAMES = 1 << 62


@dataclass(frozen=True)
class AudioLimits:
    """Bounds on one clip (None = no bound): ``max_seconds`` of audio, ``max_bytes`` of encoded data,
    and ``max_samples`` decoded samples at the file's own rate, all channels (``channels x frames``:
    what decoding allocates, however small the encoded file).
    """

    max_seconds: float | None = None
    max_bytes: int | None = None
    max_samples: int | None = None

    def check_seconds(self, seconds: float, source: str) -> None:
        if self.max_seconds is not None and seconds > self.max_seconds + 1e-6:
            raise AudioError(f"{source}: audio is {seconds:.1f} s long; the limit is {self.max_seconds:g} s")

    def check_bytes(self, n: int, source: str) -> None:
        if self.max_bytes is not None and n > self.max_bytes:
            raise AudioError(f"{source}: audio data is {n} bytes; the limit is {self.max_bytes} bytes")

    def check_samples(self, channels: int, frames: int, source: str) -> None:
        if self.max_samples is not None and channels * frames > self.max_samples:
            raise AudioError(
                f"{source}: audio decodes to {channels} channels x {frames} frames = {channels * frames} "
                f"samples; the limit is {self.max_samples} samples"
            )


NO_LIMITS = AudioLimits()


def normalize_format(fmt: str | None, source: str = "audio") -> str | None:
    """Lower-case a format name (``"WAV"``, ``".mp3"``, ``"audio/wav"``) and check it is known."""
    if fmt is None or fmt == "":
        return None
    f = fmt.strip().lower().lstrip(".")
    if "/" in f:  # a MIME type
        f = f.split("/", 1)[1].split(";", 1)[0]
        f = {
            "mpeg": "mp3",
            "x-wav": "wav",
            "wave": "wav",
            "x-flac": "flac",
            "x-m4a": "m4a",
            "vnd.wave": "wav",
        }.get(f, f)
    if f not in KNOWN_FORMATS:
        raise AudioError(
            f"{source}: unknown audio format {fmt!r}; supported: {', '.join(sorted(KNOWN_FORMATS))}"
        )
    return f


def _to_mono_16k(data: np.ndarray, sr: int) -> np.ndarray:
    import soxr

    wav = data.mean(axis=1) if data.ndim == 2 and data.shape[1] > 1 else data.reshape(len(data), -1)[:, 0]
    wav = np.asarray(wav, dtype=np.float32)
    if sr != SAMPLE_RATE and len(wav):
        wav = soxr.resample(wav, sr, SAMPLE_RATE)
    return np.ascontiguousarray(wav, dtype=np.float32)


def _wav_data_shortfall(data: bytes) -> tuple[int, int] | None:
    """For a RIFF/WAVE file, ``(declared, present)`` data bytes when the data chunk is cut short."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if cid == b"data":
            present = len(data) - pos - 8
            if size in (0, 0xFFFFFFFF):  # streamed WAV: size unknown when written
                return None
            return (size, present) if present < size else None
        pos += 8 + size + (size & 1)
    return None


def _decode_soundfile(data: bytes, source: str, limits: AudioLimits) -> np.ndarray:
    import soundfile as sf

    short = _wav_data_shortfall(data)
    if short is not None:
        raise AudioError(
            f"{source}: truncated WAV file: its data chunk declares {short[0]} bytes but only {short[1]} are present"
        )
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, declared, channels = f.samplerate, f.frames, max(1, f.channels)
            if sr <= 0:
                raise AudioError(f"{source}: invalid sample rate {sr}")
            if 0 < declared < UNKNOWN_FRAMES:
                limits.check_seconds(declared / sr, source)
                limits.check_samples(channels, declared, source)
            # Never read more than the limits allow, whatever the header said (it may say nothing).
            caps = []
            if limits.max_seconds is not None:
                caps.append(int(limits.max_seconds * sr) + sr)
            if limits.max_samples is not None:
                caps.append(limits.max_samples // channels + 1)
            cap = min(caps) if caps else -1
            wav = f.read(frames=cap, dtype="float32", always_2d=True)
            if limits.max_samples is not None:
                limits.check_samples(channels, len(wav), source)
    except AudioError:
        raise
    except Exception as e:  # LibsndfileError / RuntimeError with terse text
        msg = str(e).split(": ", 1)[-1] if "Error opening" in str(e) else str(e)
        raise AudioError(f"{source}: cannot decode audio ({msg.strip() or type(e).__name__})") from e
    if len(wav) == 0:
        raise AudioError(f"{source}: no audio samples could be decoded (empty or truncated file)")
    expected = declared if cap < 0 else min(declared, cap)
    if 0 < declared < UNKNOWN_FRAMES and expected - len(wav) > max(sr // 100, expected // 50):
        raise AudioError(
            f"{source}: truncated audio: the header declares {declared} frames but only {len(wav)} could be decoded"
        )
    limits.check_seconds(len(wav) / sr, source)
    return _to_mono_16k(wav, sr)


def _decode_ffmpeg(data: bytes, source: str, limits: AudioLimits, fmt: str | None) -> np.ndarray:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioError(
            f"{source}: cannot decode {fmt or 'this'} audio: it needs ffmpeg, which is not installed"
        )
    # Read the pipe only (no playlist or concat demuxer may open files or URLs), as the named format.
    cmd = [exe, "-nostdin", "-hide_banner", "-v", "error", "-protocol_whitelist", "pipe"]
    if fmt is not None:
        cmd += ["-f", FFMPEG_DEMUXERS.get(fmt, fmt)]
    cmd += ["-i", "pipe:0"]
    if limits.max_seconds is not None:
        cmd += ["-t", f"{limits.max_seconds + 1:.3f}"]  # bound the output; over-long input is detected below
    cmd += ["-vn", "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"]
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise AudioError(f"{source}: decoding took longer than {FFMPEG_TIMEOUT_S:g} s; gave up") from e
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = err[-1] if err else "no audio stream"
        raise AudioError(f"{source}: cannot decode audio ({reason})")
    wav = np.frombuffer(proc.stdout[: len(proc.stdout) // 4 * 4], dtype="<f4").astype(np.float32)
    if limits.max_seconds is not None and len(wav) / SAMPLE_RATE > limits.max_seconds + 1e-6:
        raise AudioError(f"{source}: audio is longer than the limit of {limits.max_seconds:g} s")
    return np.ascontiguousarray(wav)


def decode_audio_bytes(
    data: bytes, fmt: str | None = None, *, source: str = "audio", limits: AudioLimits = NO_LIMITS
) -> np.ndarray:
    """Decode encoded audio bytes (any format libsndfile reads, else ffmpeg) to 16 kHz mono float32.

    ``fmt`` is a hint (``"wav"``, ``"mp3"``, a MIME type); an unknown name is refused. The content
    decides the decoder: a file named ``.wav`` that is really FLAC still decodes.
    """
    fmt = normalize_format(fmt, source)
    if not data:
        raise AudioError(f"{source}: empty audio data")
    limits.check_bytes(len(data), source)
    if fmt in FFMPEG_FORMATS:
        return _decode_ffmpeg(data, source, limits, fmt)
    try:
        return _decode_soundfile(data, source, limits)
    except AudioError as e:
        # Content libsndfile does not know and no format named: ffmpeg may know it.
        if fmt is None and "Format not recognised" in str(e) and shutil.which("ffmpeg"):
            return _decode_ffmpeg(data, source, limits, fmt)
        if fmt is not None and "Format not recognised" in str(e):
            raise AudioError(f"{source}: the data is not valid {fmt} audio (format not recognised)") from e
        raise


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
    """Read an audio file from disk (``path`` or ``path:start:num`` segment) with the limits."""
    from blsp.data.audio import load_audio, parse_audio_ref

    p, start, _ = parse_audio_ref(path)
    if start is not None:  # a segment of a longer file: the data helper's loader knows the syntax
        wav = load_audio(path, sr=SAMPLE_RATE)
        limits.check_seconds(len(wav) / SAMPLE_RATE, str(p))
        return wav
    if not p.exists():
        raise AudioError(f"{p}: audio file not found")
    if not p.is_file():
        raise AudioError(f"{p}: not a regular file")
    size = p.stat().st_size
    limits.check_bytes(size, str(p))
    try:
        data = p.read_bytes()
    except OSError as e:
        raise AudioError(f"{p}: cannot read ({e.strerror or e})") from e
    hint = p.suffix if p.suffix.lower().lstrip(".") in KNOWN_FORMATS else None
    return decode_audio_bytes(data, hint, source=str(p), limits=limits)


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
        return _to_mono_16k(arr, sr)
    raise AudioError(
        f"{source}: unsupported audio value of type {type(audio).__name__} "
        "(give a path, bytes, a numpy array with sampling_rate, or a dict)"
    )


def duration_seconds(wav: np.ndarray) -> float:
    return len(wav) / SAMPLE_RATE
