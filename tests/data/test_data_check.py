from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from blsp.cli import main as blsp_main
from blsp.data.check import CheckLimits, Skipped, check_utterance, iter_good, load_checked


@pytest.fixture
def seeded(tmp_path, tone, espeak_audio):
    """A manifest with every kind of problem, and the line numbers of the good lines."""
    d = tmp_path / "set"
    (d / "wav").mkdir(parents=True)
    x, sr = espeak_audio("checking the manifest")
    sf.write(d / "wav" / "good.wav", x, sr)
    sf.write(d / "wav" / "good2.flac", tone(1.5), 16000)
    sf.write(d / "wav" / "stereo8k.wav", tone(2.0, sr=8000, channels=2), 8000)
    (d / "wav" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 20)
    (d / "wav" / "empty.wav").write_bytes(b"")
    sf.write(d / "wav" / "noframes.wav", np.zeros(0, dtype=np.float32), 16000)
    nan = tone(1.0)
    nan[100:200] = np.nan
    sf.write(d / "wav" / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(d / "wav" / "long45.flac", tone(45.0, sr=8000), 8000)
    sf.write(d / "wav" / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(d / "wav" / "short.wav", tone(0.05), 16000)
    sf.write(d / "wav" / "segsrc.wav", tone(3.0), 16000)
    lines = [
        {"id": "good", "audio": "wav/good.wav", "text": "checking the manifest"},  # 1
        {"id": "corrupt", "audio": "wav/corrupt.wav", "text": "x"},  # 2
        "{this is not json",  # 3
        {"id": "empty", "audio": "wav/empty.wav", "text": "x"},  # 4
        {"id": "missing", "audio": "wav/missing.wav", "text": "x"},  # 5
        {"id": "nan", "audio": "wav/nan.wav", "text": "x"},  # 6
        {"id": "stereo8k", "audio": "wav/stereo8k.wav", "text": "two channels"},  # 7
        '{"id": "trunc", "audio": "wav/good.wav", "text": ',  # 8
        {"id": "long45", "audio": "wav/long45.flac", "text": "x"},  # 9
        {"id": "good2", "audio": str(d / "wav" / "good2.flac"), "text": "absolute path"},  # 10
        {"id": "silent", "audio": "wav/silent.wav", "text": "x"},  # 11
        {"id": "short", "audio": "wav/short.wav", "text": "x"},  # 12
        {"id": "noframes", "audio": "wav/noframes.wav", "text": "x"},  # 13
        {"id": "seg", "audio": "wav/segsrc.wav:16000:16000", "text": "a segment"},  # 14
        {"id": "segbad", "audio": "wav/segsrc.wav:40000:16000", "text": "past the end"},  # 15
        {"id": "good", "audio": "wav/good.wav", "text": "duplicate id"},  # 16
    ]
    m = d / "m.jsonl"
    m.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return m, [1, 7, 10, 14]


EXPECTED = {
    2: "unreadable",
    3: "bad_line",
    4: "empty",
    5: "missing",
    6: "nonfinite",
    8: "bad_line",
    9: "too_long",
    11: "silent",
    12: "too_short",
    13: "empty",
    15: "unreadable",
    16: "bad_line",
}


def test_check_cli_reports_each_problem(seeded, tmp_path, capsys):
    m, good = seeded
    clean = m.parent / "clean.jsonl"
    report = tmp_path / "report.json"
    rc = blsp_main(["data", "check", str(m), "--clean", str(clean), "--json", str(report)])
    assert rc == 0
    out = capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert {p["lineno"]: p["code"] for p in rep["problems"]} == EXPECTED
    assert rep["lines"] == 16 and rep["good"] == 4
    assert rep["counts"] == {
        "bad_line": 3,
        "missing": 1,
        "unreadable": 2,
        "empty": 2,
        "nonfinite": 1,
        "silent": 1,
        "too_short": 1,
        "too_long": 1,
    }
    for p in rep["problems"]:
        line = next(x for x in out.splitlines() if x.startswith(f"line {p['lineno']}"))
        assert p["code"] in line
        if p["audio"]:
            assert p["audio"] in line
    assert "45.00 s > 30 s" in out
    # the cleaned manifest keeps every good line verbatim
    src_lines = m.read_text().splitlines()
    assert clean.read_text().splitlines() == [src_lines[i - 1] for i in good]
    assert blsp_main(["data", "check", str(m), "--strict"]) == 1
    capsys.readouterr()


def test_clean_elsewhere_rewrites_paths(seeded, tmp_path):
    m, good = seeded
    clean = tmp_path / "other" / "clean.jsonl"
    assert blsp_main(["data", "check", str(m), "--clean", str(clean), "--max-seconds", "60"]) == 0
    rows = [json.loads(x) for x in clean.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["good", "stereo8k", "long45", "good2", "seg"]
    assert rows[0]["audio"] == str(m.parent / "wav" / "good.wav")
    assert rows[-1]["audio"] == f"{m.parent / 'wav' / 'segsrc.wav'}:16000:16000"


def test_iter_good_downstream(seeded):
    m, _ = seeded
    skipped = Skipped()
    got = list(iter_good(m, skipped=skipped))
    assert [it["id"] for it, _ in got] == ["good", "stereo8k", "good2", "seg"]
    stereo = got[1][1]
    assert stereo.dtype == np.float32 and len(stereo) == 32000  # 2 s at 8 kHz stereo -> 16 kHz mono
    assert skipped.total == 12 and skipped.counts["bad_line"] == 3
    assert "12 skipped" in skipped.summary()

    items = [json.loads(x) for x in m.read_text().splitlines()[:2]]
    sk = Skipped()
    assert [it["id"] for it, _ in iter_good(m, skipped=sk, items=items)] == ["good"]
    assert sk.counts == {"unreadable": 1}


def test_check_utterance_and_limits(seeded):
    m, _ = seeded
    d = m.parent
    assert check_utterance({"id": "a", "audio": "wav/good.wav"}, d) is None
    r = check_utterance({"id": "a", "audio": "wav/long45.flac"}, d)
    assert r is not None and r.code == "too_long" and "45.00 s" in str(r)
    assert check_utterance({"id": "a", "audio": "wav/long45.flac"}, d, CheckLimits(max_seconds=None)) is None
    r = check_utterance({"id": "a", "audio": "wav/good2.flac"}, d, CheckLimits(min_seconds=2.0))
    assert r is not None and r.code == "too_short"
    audio, reason = load_checked({"id": "a", "audio": "wav/missing.wav"}, d)
    assert audio is None and reason.code == "missing" and "missing.wav" in reason.detail
