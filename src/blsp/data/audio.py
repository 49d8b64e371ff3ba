"""The one home of audio decoding: a path, a segment or encoded bytes to float32 mono at 16 kHz.

An audio reference is a path, or ``path:start_sample:num_samples`` for a segment of a longer
file; the sample positions count frames at the file's own sample rate (what ``soundfile``
reports), and a segment is read by seeking, without decoding the whole file where the format
allows it (WAV, FLAC, Ogg/Opus and Vorbis, MP3 all seek in libsndfile). Other rates are
resampled with soxr and channels are averaged.

Formats libsndfile cannot open at all (``.m4a``, ``.aac``, ``.mp4``, ``.webm``, ``.wma``...) are
decoded by ``ffmpeg`` when it is installed, reading only the input itself
(``-protocol_whitelist``) as the format its name says (``-f``).

Decoding takes :class:`AudioLimits` (duration, decoded samples, encoded bytes), checked from the
header before the samples are decoded and again on what was decoded, and ``strict``, which also
refuses truncated or empty audio (libsndfile would otherwise quietly return the part that is
there): the server's inputs and the data tools share this one code path.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blsp.errors import AudioError

SAMPLE_RATE = 16000

# Formats libsndfile decodes itself, and those handed to ffmpeg when it is installed.
SOUNDFILE_FORMATS = frozenset(
    {"wav", "wave", "mp3", "flac", "ogg", "oga", "opus", "aiff", "aif", "au", "caf", "w64"}
)
FFMPEG_FORMATS = frozenset({"webm", "m4a", "mp4", "aac", "weba", "mka", "3gp", "amr", "wma"})
KNOWN_FORMATS = SOUNDFILE_FORMATS | FFMPEG_FORMATS
#: file extensions that soundfile does not read and ffmpeg does
FFMPEG_EXTENSIONS = frozenset(f".{f}" for f in FFMPEG_FORMATS)
#: ffmpeg demuxer names (``-f``) of formats whose name is not one
FFMPEG_DEMUXERS = {"weba": "webm", "mka": "matroska", "wma": "asf"}
FFMPEG_TIMEOUT_S = 30.0
#: libsndfile reports a length it does not know (a streamed FLAC, say) as a huge frame count
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

    def frame_cap(self, samplerate: int, channels: int) -> int:
        """The most frames worth reading (a little over the bounds, so excess is detected); -1 = all."""
        caps = []
        if self.max_seconds is not None:
            caps.append(int(self.max_seconds * samplerate) + samplerate)
        if self.max_samples is not None:
            caps.append(self.max_samples // max(1, channels) + 1)
        return min(caps) if caps else -1


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


def suffix_format(path: str | os.PathLike[str]) -> str | None:
    """The format a file name's extension names, or None when it names no known one."""
    f = Path(path).suffix.lower().lstrip(".")
    return f if f in KNOWN_FORMATS else None


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
        fmt = suffix_format(path)
        if fmt not in FFMPEG_FORMATS:
            raise AudioError(f"{path}: cannot read audio header ({_short(e)})") from e
        wav = _decode_ffmpeg(path, str(path), SAMPLE_RATE, NO_LIMITS, fmt, strict=False)
        sr, ch, frames = SAMPLE_RATE, 1, len(wav)
    if start is not None:
        _check_segment(path, start, num, frames)
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


def load_audio(
    ref: str | os.PathLike[str],
    sr: int = SAMPLE_RATE,
    *,
    limits: AudioLimits = NO_LIMITS,
    strict: bool = False,
) -> np.ndarray:
    """Read ``ref`` (a path or ``path:start:num``) as float32 mono at ``sr`` Hz.

    Raises :class:`blsp.errors.AudioError` naming the file for a missing, unreadable or
    truncated file (a segment that ends past the end of the file), or one over ``limits``;
    ``strict`` also refuses a whole file that is truncated or holds no samples.
    """
    path, start, num = parse_audio_ref(ref)
    if not path.is_file():
        raise AudioError(f"{path}: not a regular file" if path.exists() else f"{path}: audio file not found")
    fmt = suffix_format(path)
    if start is None:
        limits.check_bytes(path.stat().st_size, str(path))
        if strict:  # read once and decode from memory: the WAV chunk sizes are checked
            try:
                data = path.read_bytes()
            except OSError as e:
                raise AudioError(f"{path}: cannot read ({e.strerror or e})") from e
            return decode_audio_bytes(data, fmt, sr=sr, source=str(path), limits=limits, strict=True)
    return _decode(path, fmt, str(path), sr, limits, strict, start, num)


def decode_audio_bytes(
    data: bytes,
    fmt: str | None = None,
    *,
    sr: int = SAMPLE_RATE,
    source: str = "audio",
    limits: AudioLimits = NO_LIMITS,
    strict: bool = True,
) -> np.ndarray:
    """Decode encoded audio bytes (any format libsndfile reads, else ffmpeg) to float32 mono at ``sr``.

    ``fmt`` is a hint (``"wav"``, ``"mp3"``, a MIME type); an unknown name is refused. The content
    decides the decoder: a file named ``.wav`` that is really FLAC still decodes. ``strict``
    (the default: bytes usually come from a request) refuses truncated or empty audio.
    """
    fmt = normalize_format(fmt, source)
    if not data:
        raise AudioError(f"{source}: empty audio data")
    limits.check_bytes(len(data), source)
    return _decode(bytes(data), fmt, source, sr, limits, strict)


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


# ------------------------------------------------------------------------------------- decoders


def _decode(
    src: Path | bytes,
    fmt: str | None,
    source: str,
    sr: int,
    limits: AudioLimits,
    strict: bool,
    start: int | None = None,
    num: int | None = None,
) -> np.ndarray:
    """Decode a file or bytes with libsndfile, or with ffmpeg for the formats only it reads."""
    if fmt in FFMPEG_FORMATS and start is None:
        return _decode_ffmpeg(src, source, sr, limits, fmt, strict)
    try:
        return _decode_soundfile(src, source, sr, limits, strict, start, num)
    except AudioError as e:
        if "Format not recognised" not in str(e) or not isinstance(src, bytes):
            raise
        # Content libsndfile does not know and no format named: ffmpeg may know it (from a pipe only).
        if fmt is None and shutil.which("ffmpeg"):
            return _decode_ffmpeg(src, source, sr, limits, fmt, strict)
        if fmt is not None:
            raise AudioError(f"{source}: the data is not valid {fmt} audio (format not recognised)") from e
        raise


def _check_segment(path: Path, start: int, num: int | None, frames: int) -> None:
    if start + (num or 0) > frames:
        raise AudioError(f"{path}: segment {start}+{num} ends past the end of the file ({frames} frames)")


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


def _decode_soundfile(
    src: Path | bytes,
    source: str,
    sr: int,
    limits: AudioLimits,
    strict: bool,
    start: int | None,
    num: int | None,
) -> np.ndarray:
    import soundfile as sf

    if strict and isinstance(src, bytes):
        short = _wav_data_shortfall(src)
        if short is not None:
            raise AudioError(
                f"{source}: truncated WAV file: its data chunk declares {short[0]} bytes "
                f"but only {short[1]} are present"
            )
    try:
        with sf.SoundFile(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as f:
            file_sr, declared, channels = f.samplerate, f.frames, max(1, f.channels)
            if file_sr <= 0:
                raise AudioError(f"{source}: invalid sample rate {file_sr}")
            if start is not None:
                _check_segment(Path(source), start, num, declared)
                f.seek(start)
                declared = int(num or 0)
            if 0 < declared < UNKNOWN_FRAMES:
                limits.check_seconds(declared / file_sr, source)
                limits.check_samples(channels, declared, source)
            # Never read more than the limits allow, whatever the header said (it may say nothing).
            cap = limits.frame_cap(file_sr, channels)
            frames = cap if num is None else (num if cap < 0 else min(num, cap))
            wav = f.read(frames=frames, dtype="float32", always_2d=True)
            limits.check_samples(channels, len(wav), source)
    except AudioError:
        raise
    except Exception as e:  # LibsndfileError / RuntimeError with terse text
        msg = str(e).split(": ", 1)[-1] if "Error opening" in str(e) else str(e)
        verb = "decode" if isinstance(src, bytes) else "read"
        raise AudioError(f"{source}: cannot {verb} audio ({_short(e, msg)})") from e
    if num is not None and len(wav) < frames:
        raise AudioError(f"{source}: segment {start}+{num} is truncated (read {len(wav)} frames)")
    if strict:
        if len(wav) == 0:
            raise AudioError(f"{source}: no audio samples could be decoded (empty or truncated file)")
        expected = declared if cap < 0 else min(declared, cap)
        if 0 < declared < UNKNOWN_FRAMES and expected - len(wav) > max(file_sr // 100, expected // 50):
            raise AudioError(
                f"{source}: truncated audio: the header declares {declared} frames "
                f"but only {len(wav)} could be decoded"
            )
    limits.check_seconds(len(wav) / file_sr, source)
    return to_mono_resampled(wav, file_sr, sr)


def _decode_ffmpeg(
    src: Path | bytes, source: str, sr: int, limits: AudioLimits, fmt: str | None, strict: bool
) -> np.ndarray:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioError(
            f"{source}: cannot decode {fmt or 'this'} audio: it needs ffmpeg, which is not installed"
        )
    # The input only (no playlist or concat demuxer may open other files or URLs), read as the
    # format it is named.
    piped = isinstance(src, bytes)
    cmd = [exe, "-nostdin", "-hide_banner", "-v", "error", "-protocol_whitelist", "pipe" if piped else "file"]
    if fmt is not None:
        cmd += ["-f", FFMPEG_DEMUXERS.get(fmt, fmt)]
    cmd += ["-i", "pipe:0" if piped else str(src)]
    if limits.max_seconds is not None:
        cmd += ["-t", f"{limits.max_seconds + 1:.3f}"]  # bound the output; over-long input is detected below
    cmd += ["-vn", "-f", "f32le", "-ac", "1", "-ar", str(sr), "pipe:1"]
    timeout = FFMPEG_TIMEOUT_S if strict else None
    try:
        proc = subprocess.run(
            cmd, input=src if piped else None, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise AudioError(f"{source}: decoding took longer than {FFMPEG_TIMEOUT_S:g} s; gave up") from e
    if proc.returncode != 0 or (strict and not proc.stdout):
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = (
            err[-1] if err else ("no audio stream" if proc.returncode == 0 else f"exit {proc.returncode}")
        )
        raise AudioError(f"{source}: cannot decode audio ({reason})")
    wav = np.frombuffer(proc.stdout[: len(proc.stdout) // 4 * 4], dtype="<f4").astype(np.float32)
    if limits.max_seconds is not None and len(wav) / sr > limits.max_seconds + 1e-6:
        raise AudioError(f"{source}: audio is longer than the limit of {limits.max_seconds:g} s")
    return np.ascontiguousarray(wav)


def _short(e: BaseException, text: str | None = None) -> str:
    """``text`` (else the error's own) on one line of at most 200 characters, or the error's type."""
    text = (str(e) if text is None else text).strip().replace("\n", " ")
    return text[:200] if text else type(e).__name__
