from __future__ import annotations

import json
from collections import Counter

import pytest

from blsp.cli import main as blsp_main
from blsp.data.mix import mix_manifests, parse_source
from blsp.errors import BlspError


def _write(path, prefix, n, audio=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"{prefix}{i}", "text": f"{prefix} {i}", **({"audio": f"a/{prefix}{i}.wav"} if audio else {})}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad line\n")
    return path


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ratio_without_total_uses_no_line_twice(tmp_path, capsys):
    cont = _write(tmp_path / "c" / "cont.jsonl", "c", 900)
    rep = _write(tmp_path / "r" / "rep.jsonl", "r", 500)
    out = tmp_path / "train.jsonl"
    assert blsp_main(["data", "mix", f"{cont}:9", f"{rep}:1", "-o", str(out), "--seed", "3"]) == 0
    rows = _read(out)
    src = Counter(r["id"][0] for r in rows)
    assert src == {"c": 900, "r": 100}
    assert len({r["id"] for r in rows}) == 1000
    assert "1 malformed skipped" in capsys.readouterr().out
    # interleaved, not blocked
    first = [r["id"][0] for r in rows[:100]]
    assert 0 < first.count("r") < 40
    # audio paths rewritten for the output folder
    assert next(r for r in rows if r["id"] == "c5")["audio"] == "c/a/c5.wav"
    # deterministic; another seed differs
    assert (
        blsp_main(
            ["data", "mix", f"{cont}:9", f"{rep}:1", "-o", str(tmp_path / "again.jsonl"), "--seed", "3"]
        )
        == 0
    )
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    mix_manifests([(cont, 9), (rep, 1)], tmp_path / "seed4.jsonl", seed=4)
    assert (tmp_path / "seed4.jsonl").read_text() != out.read_text()


def test_total_and_repeat(tmp_path):
    a = _write(tmp_path / "a.jsonl", "a", 10, audio=False)
    b = _write(tmp_path / "b.jsonl", "b", 3, audio=False)
    res = mix_manifests([(a, 1), (b, 1)], tmp_path / "o.jsonl", total=7)
    assert res.counts == {str(a): 4, str(b): 3} or res.counts == {str(a): 3, str(b): 4}
    with pytest.raises(BlspError, match="only 3 available.*--repeat"):
        mix_manifests([(a, 1), (b, 1)], tmp_path / "o.jsonl", total=12)
    res = mix_manifests([(a, 1), (b, 1)], tmp_path / "o.jsonl", total=12, repeat=True)
    rows = _read(tmp_path / "o.jsonl")
    assert res.counts == {str(a): 6, str(b): 6} and len({r["id"] for r in rows}) == 12
    assert sum(r["id"].endswith("#r1") for r in rows) == 3


def test_id_collisions_and_weights(tmp_path):
    a = _write(tmp_path / "x" / "one.jsonl", "s", 4, audio=False)
    b = _write(tmp_path / "y" / "two.jsonl", "s", 4, audio=False)
    mix_manifests([(a, 1), (b, 1)], tmp_path / "o.jsonl")
    ids = {r["id"] for r in _read(tmp_path / "o.jsonl")}
    assert len(ids) == 8 and "one/s0" in ids and "two/s0" in ids
    assert parse_source("dir/f.jsonl:9") == (tmp_path.__class__("dir/f.jsonl"), 9.0)
    assert parse_source("f.jsonl")[1] == 1.0
    with pytest.raises(BlspError, match="not all be zero"):
        mix_manifests([(a, 0)], tmp_path / "o.jsonl")
