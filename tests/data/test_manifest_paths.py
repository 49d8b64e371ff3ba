"""Audio references stay valid when manifests are given by relative paths (regression)."""

from __future__ import annotations

import os
from pathlib import Path

from blsp.data.manifest import relocate_audio, resolve_audio_path


def test_relative_manifest_dir_resolves_to_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.wav").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_audio_path("x.wav:16:32", "a")
    assert resolved == f"{tmp_path / 'a' / 'x.wav'}:16:32"
    # a manifest written elsewhere from relative folders still points at the same file
    moved = relocate_audio("x.wav", "a", "b", mode="auto")
    monkeypatch.chdir(Path(os.sep))
    assert Path(moved).is_absolute() or (tmp_path / "b" / moved).resolve() == tmp_path / "a" / "x.wav"
    assert Path(resolve_audio_path(moved, tmp_path / "b")).resolve() == tmp_path / "a" / "x.wav"


def test_json_writes_are_valid_json_even_with_nan(tmp_path):
    import json
    import math

    from blsp.utils.io import atomic_write_json

    path = tmp_path / "summary.json"
    atomic_write_json(path, {"final_loss": math.nan, "inf": [math.inf, 1.5], "n": 3})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"final_loss": None, "inf": [None, 1.5], "n": 3}


def test_a_second_writer_of_the_same_output_is_refused_and_the_first_loses_nothing(tmp_path):
    import subprocess
    import sys

    import pytest

    from blsp.utils.io import JsonlAppender, OutputLocked

    out = tmp_path / "responses.jsonl"
    code = (
        "import sys\n"
        "from blsp.utils.io import JsonlAppender\n"
        f"w = JsonlAppender({str(out)!r})\n"
        "w.append([{'id': 'a'}])\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "w.append([{'id': 'b'}])\n"
        "w.close()\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "ready"
        with pytest.raises(OutputLocked, match="another process is writing it"):
            JsonlAppender(out)
        first.communicate("go\n", timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0
    with JsonlAppender(out) as again:  # the first writer is gone: its lock went with it
        assert again.done == {"a", "b"}


def test_lines_that_are_not_utf8_or_hold_a_lone_surrogate_are_skipped_and_named(tmp_path):
    from blsp.behaviors.inputs import read_inputs as behave_manifest
    from blsp.data.manifest import read_manifest

    path = tmp_path / "m.jsonl"
    good = '{"id": "a", "audio": "a.wav", "text": "fine"}\n'
    latin1 = '{"id": "b", "audio": "b.wav", "text": "caf\xe9"}\n'.encode("latin-1")
    surrogate = '{"id": "c", "audio": "c.wav", "text": "x\\ud800y"}\n'
    path.write_bytes(good.encode() + latin1 + surrogate.encode() + good.replace('"a"', '"d"').encode())
    items, errors = read_manifest(path)
    assert [i["id"] for i in items] == ["a", "d"]
    assert [(e.lineno, e.message) for e in errors] == [
        (2, "not UTF-8"),
        (3, "a string holds a lone surrogate (not encodable as UTF-8)"),
    ]
    m = behave_manifest(path)
    assert [it.id for it in m.items] == ["a", "d"] and m.skipped["bad_line"] == 2
    assert any(p.endswith(":2: not UTF-8") for p in m.problems)
