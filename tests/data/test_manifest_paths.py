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
