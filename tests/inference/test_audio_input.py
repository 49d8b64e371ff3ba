"""Audio from paths, bytes, base64 and arrays: formats, limits, and refusals that name the reason."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from blsp.data.audio import AudioLimits, decode_audio_bytes, normalize_format
from blsp.errors import AudioError
from blsp.inference.audio_input import as_waveform, decode_base64_audio, read_audio_file

SR = 16000


def tone(seconds: float = 1.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def encode(x: np.ndarray, fmt: str, subtype: str | None = None, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", None)],
)
def test_formats_decode_to_16k_mono(fmt, subtype):
    x = tone(1.0, sr=24000)
    y = decode_audio_bytes(encode(x, fmt, subtype, sr=24000), fmt.lower())
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - SR) < SR * 0.08  # codecs pad a little
    assert 0.1 < np.abs(y).max() < 0.5


def test_stereo_is_downmixed_and_base64_data_url_works():
    x = np.stack([tone(0.5), tone(0.5) * 0.5], axis=1)
    wav = encode(x, "WAV", "PCM_16")
    b64 = base64.b64encode(wav).decode()
    y = decode_base64_audio(b64, "wav")
    assert y.shape == (SR // 2,)
    np.testing.assert_allclose(y, tone(0.5) * 0.75, atol=1e-3)
    assert decode_base64_audio(f"data:audio/wav;base64,{b64}").shape == (SR // 2,)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("!!!!not base64", "invalid base64"),
        ("file:///etc/passwd", "invalid base64"),
        ("/etc/passwd", "invalid base64"),
        ("", "empty"),
    ],
)
def test_malformed_base64_is_refused(data, reason):
    with pytest.raises(AudioError, match=reason) as e:
        decode_base64_audio(data, "wav", source="messages[0].content[1]")
    assert "messages[0].content[1]" in str(e.value)


def test_truncated_and_garbage_audio_are_refused():
    wav = encode(tone(1.0), "WAV", "PCM_16")
    with pytest.raises(AudioError, match="truncated WAV"):
        decode_audio_bytes(wav[: len(wav) // 2], "wav")
    with pytest.raises(AudioError, match="cannot decode|not valid"):
        decode_audio_bytes(wav[:30], "wav")
    with pytest.raises(AudioError, match="not valid wav"):
        decode_audio_bytes(b"definitely not audio" * 50, "wav")
    mp3 = encode(tone(2.0), "MP3")
    with pytest.raises(AudioError, match="truncated"):
        decode_audio_bytes(mp3[: len(mp3) // 3], "mp3")


def test_unknown_format_and_limits():
    wav = encode(tone(3.0), "WAV", "PCM_16")
    with pytest.raises(AudioError, match="unknown audio format 'xyz'"):
        decode_audio_bytes(wav, "xyz")
    assert normalize_format("audio/mpeg") == "mp3" and normalize_format(".WAV") == "wav"
    with pytest.raises(AudioError, match="3.0 s long; the limit is 2 s"):
        decode_audio_bytes(wav, "wav", limits=AudioLimits(max_seconds=2))
    with pytest.raises(AudioError, match="bytes; the limit is 100 bytes"):
        decode_audio_bytes(wav, "wav", limits=AudioLimits(max_bytes=100))
    with pytest.raises(AudioError, match="limit is 1 s"):
        as_waveform(tone(2.0), SR, limits=AudioLimits(max_seconds=1))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_ffmpeg_formats(tmp_path):
    src = tmp_path / "a.wav"
    sf.write(src, tone(2.0), SR)
    webm = tmp_path / "a.webm"
    subprocess.run(["ffmpeg", "-y", "-v", "error", "-i", str(src), str(webm)], check=True, timeout=60)
    y = read_audio_file(webm)
    assert abs(len(y) - 2 * SR) < SR * 0.1
    with pytest.raises(AudioError, match="longer than the limit of 1 s"):
        read_audio_file(webm, limits=AudioLimits(max_seconds=1))
    with pytest.raises(AudioError, match="cannot decode"):
        decode_audio_bytes(b"garbage" * 100, "webm")


def test_as_waveform_sources(tmp_path):
    x = tone(1.0, sr=8000)
    path = tmp_path / "x.flac"
    sf.write(path, x, 8000)
    from_path = as_waveform(path)
    from_str = as_waveform(str(path))
    from_bytes = as_waveform(path.read_bytes())
    from_array = as_waveform(x, 8000)
    from_int16 = as_waveform((8000, (x * 32767).astype(np.int16)))  # Gradio's numpy audio
    from_dict = as_waveform({"array": x, "sampling_rate": 8000})
    for y in (from_path, from_str, from_bytes, from_array, from_int16, from_dict):
        assert y.shape == (SR,)
        np.testing.assert_allclose(y, from_array, atol=2e-3)
    with pytest.raises(AudioError, match="not found"):
        as_waveform(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="NaN"):
        as_waveform(np.full(100, np.nan, np.float32))
    with pytest.raises(AudioError, match="unsupported audio value"):
        as_waveform(3.5)
