"""Uncertainty of the metrics: 95 % bootstrap intervals over items, and paired comparisons.

Every metric of :mod:`blsp.evaluation.scoring` is either a ratio of per-item sums (WER: errors /
reference words; accuracy: correct / items; the content gap: nats / tokens; the token KL) or a
corpus score that is recomputed on each resample (BLEU, chrF). The same item resamples serve both
systems of a paired comparison, so a difference is judged on the items they share.

A verdict comes from an interval, never from the sign of a difference alone: ``holds`` when the
whole interval lies on the claimed side of zero, ``does not hold`` when it lies on the other side,
and ``not resolved at this size`` when it straddles zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: Bootstrap resamples (1,000: the percentile interval's ends move by about 0.1 of its width).
N_BOOT = 1000
LEVEL = 0.95
HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved at this size"


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def _ratios(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    d = den[idx].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, num[idx].sum(axis=1) / d, np.nan)


def ratio_ci(
    pairs: Sequence[tuple[float, float]], scale: float = 1.0, n_boot: int = N_BOOT, seed: int = 0
) -> list[float] | None:
    """Interval of ``scale * sum(num) / sum(den)`` over items resampled with replacement."""
    if not pairs:
        return None
    num, den = (np.asarray(x, dtype=np.float64) for x in zip(*pairs, strict=True))
    return _interval(scale * _ratios(num, den, _resamples(len(pairs), n_boot, seed)))


def corpus_ci(
    n: int, fn: Callable[[np.ndarray], float | None], n_boot: int = 200, seed: int = 0
) -> list[float] | None:
    """Interval of a corpus score ``fn(item indices)`` that does not decompose over items (BLEU, chrF)."""
    if n == 0:
        return None
    vals = [fn(idx) for idx in _resamples(n, n_boot, seed)]
    return _interval(np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64))


def _paired(
    a: Mapping[str, tuple[float, float]],
    b: Mapping[str, tuple[float, float]],
    combine: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_boot: int,
    seed: int,
) -> tuple[float, np.ndarray] | None:
    """``combine(metric(a), metric(b))`` on the items both have (keyed by id) and on paired resamples
    of them; None without shared items or a finite value."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    na, da = (np.asarray(x, dtype=np.float64) for x in zip(*(a[i] for i in ids), strict=True))
    nb, db = (np.asarray(x, dtype=np.float64) for x in zip(*(b[i] for i in ids), strict=True))
    every = np.arange(len(ids))[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = combine(_ratios(na, da, every), _ratios(nb, db, every))[0]
        idx = _resamples(len(ids), n_boot, seed)
        boots = combine(_ratios(na, da, idx), _ratios(nb, db, idx))
    boots = boots[np.isfinite(boots)]
    if not np.isfinite(value) or boots.size == 0:
        return None
    return float(value), boots


def paired_difference(
    a: Mapping[str, tuple[float, float]],
    b: Mapping[str, tuple[float, float]],
    scale: float = 1.0,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """``metric(a) - metric(b)`` on the items both have (keyed by id), with a paired bootstrap
    interval and a two-sided bootstrap p-value (twice the share of resamples on the far side of 0)."""
    out: dict[str, Any] = {"n": len(set(a) & set(b)), "diff": None, "ci": None, "p": None}
    got = _paired(a, b, lambda x, y: scale * (x - y), n_boot, seed)
    if got is None:
        return out
    diff, boots = got
    far = min(float((boots <= 0).mean()), float((boots >= 0).mean()))
    return out | {"diff": diff, "ci": _interval(boots), "p": min(1.0, 2 * far)}


def paired_ratio(
    a: Mapping[str, tuple[float, float]],
    b: Mapping[str, tuple[float, float]],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """``metric(a) / metric(b)`` on the items both have (keyed by id), with a paired bootstrap
    interval: "system a's WER is at most 2x system b's on the same clips" is judged on it."""
    out: dict[str, Any] = {"n": len(set(a) & set(b)), "ratio": None, "ci": None}
    got = _paired(a, b, lambda x, y: x / y, n_boot, seed)
    if got is None:
        return out
    return out | {"ratio": got[0], "ci": _interval(got[1])}


def verdict(ci: Sequence[float] | None, claim: str = "positive") -> str | None:
    """``holds`` / ``does not hold`` / ``not resolved at this size`` for a claimed sign of a
    difference (``positive``: it is above 0; ``negative``: below), or None without an interval."""
    if ci is None:
        return None
    lo, hi = ci
    if claim == "negative":
        lo, hi = -hi, -lo
    if lo > 0:
        return HOLDS
    if hi < 0:
        return FAILS
    return UNRESOLVED


def fmt_ci(ci: Sequence[float] | None, digits: int = 1) -> str:
    """``[lo, hi]`` with ``digits`` decimals, or an empty string without an interval."""
    return "" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def with_ci(text: str, res: Mapping[str, Any], key: str, digits: int = 1) -> str:
    """``text`` (the formatted ``res[key]``) followed by its interval from ``res["ci"]``, if any."""
    ci = (res.get("ci") or {}).get(key)
    return f"{text} {fmt_ci(ci, digits)}" if ci is not None and res.get(key) is not None else text
