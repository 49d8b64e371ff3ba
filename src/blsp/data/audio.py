"""Audio loading: any format soundfile reads, down-mixed to mono and resampled with soxr.

An audio reference is a path, or ``path:start_sample:num_samples`` for a segment of a longer
file; the sample positions count frames at the file's own sample rate (what ``soundfile``
reports), and a segment is read by seeking, without decoding the whole file where the format
allows it (WAV, FLAC, Ogg/Opus and Vorbis, MP3 all seek in libsndfile).

Formats libsndfile cannot open at all (``.m4a``, ``.aac``, ``.mp4``, ``.webm``, ``.wma``) are
decoded by ``ffmpeg`` when it is installed.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blsp.errors import AudioError

SAMPLE_RATE = 16000

#: extensions that soundfile does not read and ffmpeg does
FFMPEG_EXTENSIONS = frozenset({".m4a", ".aac", ".mp4", ".webm", ".wma"})
#: the ffmpeg demuxer (``-f``) of each
FFMPEG_DEMUXERS = {".m4a": "m4a", ".aac": "aac", ".mp4": "mp4", ".webm": "webm", ".wma": "asf"}


def parse_audio_ref(ref: str | os.PathLike[str]) -> tuple[Path, int | None, int | None]:
    """Split ``path[:start_sample:num_samples]`` into its parts."""
    s = str(ref)
    parts = s.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return Path(parts[0]), int(parts[1]), int(parts[2])
    return Path(s), None, None


def format_audio_ref(path: str | os.PathLike[str], start: int | None = None, num: int | None = None) -> str:
    """The inverse of :func:`parse_audio_ref`."""
    if start is None:
        return str(path)
    return f"{path}:{int(start)}:{int(num if num is not None else 0)}"


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio reference (a segment reports its own length)."""

    path: Path
    samplerate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate if self.samplerate else 0.0


def audio_info(ref: str | os.PathLike[str]) -> AudioInfo:
    """Read only the header of ``ref``; raises AudioError naming the file."""
    import soundfile as sf

    path, start, num = parse_audio_ref(ref)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
        sr, ch, frames = int(info.samplerate), int(info.channels), int(info.frames)
    except Exception as e:
        if path.suffix.lower() in FFMPEG_EXTENSIONS:
            wav = _ffmpeg_decode(path, SAMPLE_RATE)
            sr, ch, frames = SAMPLE_RATE, 1, len(wav)
        else:
            raise AudioError(f"{path}: cannot read audio header ({_short(e)})") from e
    if start is not None:
        if start + (num or 0) > frames:
            raise AudioError(f"{path}: segment {start}+{num} ends past the end of the file ({frames} frames)")
        frames = int(num or 0)
    return AudioInfo(path=path, samplerate=sr, channels=ch, frames=frames)


def audio_bytes_info(data: bytes, name: str = "<bytes>") -> AudioInfo:
    """Read only the header of in-memory audio (nothing is decoded); raises AudioError naming it.

    ``frames`` is what the header declares: a stream that does not know its length (a piped FLAC)
    reports a huge count, so compare it with a bound rather than trusting it as a size.
    """
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:
        raise AudioError(f"{name}: cannot read audio header ({_short(e)})") from e
    return AudioInfo(
        path=Path(name), samplerate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames)
    )


def load_audio(ref: str | os.PathLike[str], sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read ``ref`` (a path or ``path:start:num``) as float32 mono at ``sr`` Hz.

    Stereo and multi-channel audio is averaged to mono; other rates are resampled with soxr.
    Raises :class:`blsp.errors.AudioError` naming the file for a missing, unreadable or
    truncated file (a segment that ends past the end of the file).
    """
    import soundfile as sf

    path, start, num = parse_audio_ref(ref)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        with sf.SoundFile(str(path)) as f:
            file_sr = f.samplerate
            if start is not None:
                if start + (num or 0) > f.frames:
                    raise AudioError(
                        f"{path}: segment {start}+{num} ends past the end of the file ({f.frames} frames)"
                    )
                f.seek(start)
            data = f.read(frames=num if num is not None else -1, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError with terse text
        if path.suffix.lower() in FFMPEG_EXTENSIONS and start is None:
            return _ffmpeg_decode(path, sr)
        raise AudioError(f"{path}: cannot read audio ({_short(e)})") from e
    if num is not None and data.shape[0] < num:
        raise AudioError(f"{path}: segment {start}+{num} is truncated (read {data.shape[0]} frames)")
    return to_mono_resampled(data, file_sr, sr)


def decode_audio_bytes(data: bytes, sr: int = SAMPLE_RATE, name: str = "<bytes>") -> np.ndarray:
    """Decode an in-memory audio file (e.g. a ``datasets`` Audio cell) to float32 mono at ``sr``."""
    import soundfile as sf

    try:
        arr, file_sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{name}: cannot decode audio bytes ({_short(e)})") from e
    return to_mono_resampled(arr, file_sr, sr)


def to_mono_resampled(data: np.ndarray, file_sr: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Average channels (``data`` is ``[frames]`` or ``[frames, channels]``) and resample to ``sr``."""
    import soxr

    data = np.asarray(data, dtype=np.float32)
    wav = data.mean(axis=1) if data.ndim == 2 else data
    if file_sr != sr and len(wav):
        wav = soxr.resample(wav, file_sr, sr)
    return np.ascontiguousarray(wav, dtype=np.float32)


def write_wav(path: str | os.PathLike[str], audio: np.ndarray, sr: int = SAMPLE_RATE) -> Path:
    """Write 16-bit PCM WAV atomically (temporary file in the same folder, then rename)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sf.write(
            str(tmp),
            np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0),
            sr,
            subtype="PCM_16",
            format="WAV",
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _ffmpeg_decode(path: Path, sr: int) -> np.ndarray:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioError(f"{path}: format not supported by soundfile and ffmpeg is not installed")
    # The local file only (no playlist or concat demuxer may open other files or URLs), read as the
    # format its extension names.
    cmd = [exe, "-nostdin", "-v", "error", "-protocol_whitelist", "file"]
    demuxer = FFMPEG_DEMUXERS.get(path.suffix.lower())
    if demuxer:
        cmd += ["-f", demuxer]
    cmd += ["-i", str(path), "-f", "f32le", "-ac", "1", "-ar", str(sr), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioError(
            f"{path}: ffmpeg cannot decode it ({msg[-1] if msg else 'exit ' + str(proc.returncode)})"
        )
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)


def _short(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ")
    return text[:200] if text else type(e).__name__
