"""Deterministic weighted mixtures of JSON Lines manifests (``blsp data mix A.jsonl:9 B.jsonl:1``).

Weights are ratios of *lines* in the output. Each source's lines are drawn without replacement
in a seeded random order; the output is then shuffled with the same seed.

- Without ``total``: the largest mixture in the given ratio that uses no line twice: the
  scarcest source (relative to its weight) is taken whole and the others are sub-sampled.
  ``A.jsonl:9 B.jsonl:1`` with 900 and 500 lines gives 900 + 100.
- With ``total``: ``total`` lines split by the ratio (largest remainder); a source with too few
  lines is an error unless ``repeat=True``, which reuses it in fresh seeded passes (ids of
  repeated lines get a ``#r<k>`` suffix).

BLSP+RP mixes behavior data 9 continuation : 1 repetition. Lines need an ``id``; an ``audio`` path
is rewritten for the output's folder. Ids repeated across sources are made unique as
``<source stem>/<id>``. Malformed lines are skipped and counted.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blsp.data.manifest import relocate_audio
from blsp.errors import BlspError
from blsp.utils.io import iter_jsonl, write_jsonl


def parse_source(spec: str) -> tuple[Path, float]:
    """``path[:weight]`` -> ``(path, weight)``; weight defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            w = float(tail)
        except ValueError:
            return Path(spec), 1.0
        if w < 0 or not math.isfinite(w):
            raise BlspError(f"{spec}: weight must be a non-negative number")
        return Path(head), w
    return Path(spec), 1.0


@dataclass
class MixResult:
    out: Path
    counts: dict[str, int] = field(default_factory=dict)
    available: dict[str, int] = field(default_factory=dict)
    bad_lines: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _split_total(total: int, weights: list[float]) -> list[int]:
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (exact[i] - counts[i], weights[i]), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_manifests(
    sources: list[tuple[str | os.PathLike[str], float]],
    out: str | os.PathLike[str],
    seed: int = 0,
    total: int | None = None,
    repeat: bool = False,
) -> MixResult:
    """Write the mixture of ``sources`` ((path, weight) pairs) to ``out`` atomically."""
    if not sources:
        raise BlspError("mix needs at least one source")
    out = Path(out).absolute()
    weights = [float(w) for _, w in sources]
    if sum(weights) <= 0:
        raise BlspError("mix weights must not all be zero")
    names = [str(p) for p, _ in sources]
    if len(set(names)) != len(names):
        raise BlspError("a source is given twice; give it once with the summed weight")
    result = MixResult(out=out)
    pools: list[list[dict[str, Any]]] = []
    for (path, _w), name in zip(sources, names, strict=True):
        path = Path(path)
        if not path.is_file():
            raise BlspError(f"{path}: not found")
        rows, bad = [], 0
        for _ln, obj, _raw in iter_jsonl(path):
            if obj is None or "id" not in obj:
                bad += 1
                continue
            if isinstance(obj.get("audio"), str):
                obj["audio"] = relocate_audio(obj["audio"], path.parent, out.parent)
            rows.append(obj)
        pools.append(rows)
        result.available[name] = len(rows)
        result.bad_lines[name] = bad

    active = [i for i, w in enumerate(weights) if w > 0]
    if total is None:
        empty = [names[i] for i in active if not pools[i]]
        if empty:
            raise BlspError(f"{empty[0]}: no usable line to mix")
        unit = min(len(pools[i]) / weights[i] for i in active)
        counts = [math.floor(unit * w + 1e-9) if w > 0 else 0 for w in weights]
    else:
        if total < 0:
            raise BlspError("total must be non-negative")
        counts = _split_total(total, weights)
        for i, c in enumerate(counts):
            if c > len(pools[i]) and not repeat:
                raise BlspError(
                    f"{names[i]}: {c} lines wanted but only {len(pools[i])} available; "
                    "lower --total or pass --repeat"
                )
            if c and not pools[i]:
                raise BlspError(f"{names[i]}: no usable line to mix")

    rng = random.Random(seed)
    chosen: list[dict[str, Any]] = []
    all_ids: dict[str, int] = {}
    for rows in pools:
        for r in rows:
            all_ids[str(r["id"])] = all_ids.get(str(r["id"]), 0) + 1
    for i, (rows, c) in enumerate(zip(pools, counts, strict=True)):
        picked: list[dict[str, Any]] = []
        k = 0
        while len(picked) < c:
            perm = rows[:]
            rng.shuffle(perm)
            for r in perm[: c - len(picked)]:
                r = dict(r)
                if all_ids[str(r["id"])] > 1:
                    r["id"] = f"{Path(names[i]).stem}/{r['id']}"
                if k:
                    r["id"] = f"{r['id']}#r{k}"
                picked.append(r)
            k += 1
        chosen += picked
        result.counts[names[i]] = len(picked)
    rng.shuffle(chosen)
    write_jsonl(out, chosen)
    return result
