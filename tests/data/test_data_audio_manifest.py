from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp.data.audio import (
    SAMPLE_RATE,
    audio_info,
    decode_audio_bytes,
    format_audio_ref,
    load_audio,
    parse_audio_ref,
    write_wav,
)
from blsp.data.manifest import read_manifest, relocate_audio, resolve_audio_path, write_manifest
from blsp.errors import AudioError, BlspError


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext"),
    [
        ("WAV", "PCM_16", "wav"),
        ("FLAC", None, "flac"),
        ("OGG", "OPUS", "opus"),
        ("OGG", "VORBIS", "ogg"),
        ("MP3", "MPEG_LAYER_III", "mp3"),
    ],
)
def test_load_formats_resampled_mono(tmp_path, tone, fmt, subtype, ext):
    x = tone(1.0, sr=48000, channels=2)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, 48000, format=fmt, subtype=subtype)
    y = load_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - SAMPLE_RATE) < 1200  # mp3/opus codec padding
    # mono = mean of the channels (0.3*0.5 and 0.3*1.0 -> 0.225 peak)
    assert 0.18 < np.abs(y[2000:-2000]).max() < 0.27


def test_stereo_8k_downmix_and_resample(tmp_path, tone):
    p = tmp_path / "s.wav"
    sf.write(p, tone(0.5, sr=8000, channels=2), 8000, subtype="FLOAT")
    y = load_audio(p)
    assert len(y) == 8000
    ref = tone(0.5, sr=16000)  # the mean of the two channels is 0.75 of channel... c1=0.5x, c2=1.0x -> 0.75x
    corr = np.corrcoef(y[500:-500], ref[500:-500])[0, 1]
    assert corr > 0.99
    assert np.abs(y).max() == pytest.approx(0.225, rel=0.03)


def test_segment_reads_only_the_segment(tmp_path):
    sr = 8000
    x = np.zeros(sr * 3, dtype=np.float32)
    x[sr : 2 * sr] = 0.5  # the middle second is loud
    p = tmp_path / "long.flac"
    sf.write(p, x, sr)
    ref = format_audio_ref(p, sr, sr)
    assert parse_audio_ref(ref) == (p, sr, sr)
    y = load_audio(ref, sr=sr)
    assert len(y) == sr and np.allclose(y, 0.5, atol=1e-3)
    assert audio_info(ref).duration == pytest.approx(1.0)
    with pytest.raises(AudioError, match="long.flac.*past the end"):
        load_audio(format_audio_ref(p, 2 * sr, 2 * sr))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav.*not found"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"not audio at all" * 10)
    with pytest.raises(AudioError, match="bad.flac.*cannot read"):
        load_audio(bad)
    with pytest.raises(AudioError, match="<x>"):
        decode_audio_bytes(b"junk", source="<x>")


def test_write_wav_atomic_and_decode_bytes(tmp_path, tone):
    p = write_wav(tmp_path / "sub" / "o.wav", tone(0.25))
    assert sf.info(p).samplerate == 16000 and sf.info(p).subtype == "PCM_16"
    assert not list(p.parent.glob(".*tmp"))
    y = decode_audio_bytes(p.read_bytes())
    assert len(y) == 4000


def test_read_manifest_reports_lines(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(
        '{"id": "a", "audio": "a.wav", "text": "x", "duration": 1.0}\n'
        "\n"
        "{broken\n"
        '{"id": "b"}\n'
        '{"id": "a", "audio": "c.wav"}\n'
        '{"id": "d", "audio": "d.wav", "duration": -1}\n'
        "[1, 2]\n"
        '{"id": 7, "audio": "e.wav:16000:8000"}\n'
    )
    items, errors = read_manifest(m)
    assert [i["id"] for i in items] == ["a", 7]
    assert [(e.lineno, e.message.split(" (")[0]) for e in errors] == [
        (3, "malformed JSON"),
        (4, "missing field 'audio'"),
        (5, "duplicate id 'a'"),
        (6, "field 'duration' must be a non-negative number"),
        (7, "malformed JSON"),
    ]
    assert "line 5" in str(errors[2]) and "first on line 1" in errors[2].message
    with pytest.raises(BlspError, match="missing.jsonl"):
        read_manifest(tmp_path / "missing.jsonl")


def test_paths_resolve_and_relocate(tmp_path):
    assert resolve_audio_path("x/a.wav:10:20", tmp_path) == f"{tmp_path}/x/a.wav:10:20"
    assert resolve_audio_path("/abs/a.wav", tmp_path) == "/abs/a.wav"
    sub = tmp_path / "sub"
    assert relocate_audio("sub/a.wav", tmp_path, sub) == "a.wav"
    assert relocate_audio("a.wav", tmp_path, sub) == str(tmp_path / "a.wav")  # auto: outside -> absolute
    assert relocate_audio("a.wav", tmp_path, sub, "relative") == "../a.wav"
    assert relocate_audio("sub/a.wav:1:2", tmp_path, sub, "absolute") == f"{sub}/a.wav:1:2"


def test_write_manifest_atomic(tmp_path):
    p = tmp_path / "o.jsonl"
    assert write_manifest(p, [{"id": "a", "audio": "a.wav", "text": "é"}]) == 1
    assert json.loads(p.read_text(encoding="utf-8")) == {"id": "a", "audio": "a.wav", "text": "é"}
    assert [x.name for x in Path(tmp_path).iterdir()] == ["o.jsonl"]


def test_load_manifest_strict_and_lenient(tmp_path, caplog):
    from blsp.data.manifest import load_manifest

    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "audio": "a.wav"}\nnot json\n')
    assert [i["id"] for i in load_manifest(m)] == ["a"]
    assert "line 2" in caplog.text
    with pytest.raises(BlspError, match="m.jsonl: line 2: malformed JSON"):
        load_manifest(m, strict=True)


def test_voices_command(capsys):
    from blsp.cli import main

    assert main(["data", "voices", "--lang", "de"]) == 0
    out = capsys.readouterr().out
    assert "engines:" in out and "de: espeak:de" in out
