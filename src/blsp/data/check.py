"""The one set of per-utterance checks every job uses: skip a bad item, count it, log why, go on.

- :func:`check_utterance` ``(item, manifest_dir) -> SkipReason | None``;
- :func:`load_checked` ``(item, manifest_dir) -> (audio | None, SkipReason | None)``;
- :func:`iter_good` yields ``(item, audio)`` for good items and counts the
  skipped ones in a :class:`Skipped`;
- :func:`check_manifest` is ``blsp data check``: a :class:`CheckReport` and a cleaned manifest.

Reason codes (:data:`REASONS`): ``bad_line`` (malformed JSON, missing/ill-typed field, duplicate
id), ``missing`` (no such file), ``unreadable`` (not decodable, truncated segment), ``empty`` (no
samples), ``nonfinite`` (NaN or inf samples), ``silent`` (peak below ``silence_peak``),
``too_short`` and ``too_long`` (outside ``[min_seconds, max_seconds]``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blsp.data.audio import SAMPLE_RATE, audio_info, load_audio, parse_audio_ref
from blsp.data.manifest import iter_manifest, relocate_audio, resolve_audio_path
from blsp.errors import AudioError
from blsp.utils.io import atomic_write_text

log = logging.getLogger(__name__)

REASONS = ("bad_line", "missing", "unreadable", "empty", "nonfinite", "silent", "too_short", "too_long")


@dataclass(frozen=True)
class CheckLimits:
    """Thresholds of the checks. BLSP-Emo kept 1-30 s utterances; Whisper's window is 30 s."""

    min_seconds: float = 0.1
    max_seconds: float | None = 30.0
    silence_peak: float = 1e-4


DEFAULT_LIMITS = CheckLimits()


@dataclass(frozen=True)
class SkipReason:
    """Why an item is skipped: a code from :data:`REASONS` and a human detail."""

    code: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


@dataclass(frozen=True)
class Problem:
    """One skipped line or item of a manifest."""

    lineno: int | None
    id: str | None
    audio: str | None
    code: str
    detail: str

    def __str__(self) -> str:
        where = f"line {self.lineno}" if self.lineno is not None else "item"
        ident = f" id={self.id}" if self.id is not None else ""
        path = f" ({self.audio})" if self.audio else ""
        return f"{where}{ident}{path}: {self.code}: {self.detail}"


def check_audio(
    audio: np.ndarray, limits: CheckLimits = DEFAULT_LIMITS, sr: int = SAMPLE_RATE
) -> SkipReason | None:
    """Check decoded mono audio: empty, non-finite, silent, too short, too long."""
    n = int(audio.shape[0])
    if n == 0:
        return SkipReason("empty", "no samples")
    finite = np.isfinite(audio)
    if not finite.all():
        return SkipReason("nonfinite", f"{int((~finite).sum())} NaN/inf samples")
    peak = float(np.abs(audio).max())
    if peak < limits.silence_peak:
        return SkipReason("silent", f"peak {peak:.2g} < {limits.silence_peak:g}")
    seconds = n / sr
    if seconds < limits.min_seconds:
        return SkipReason("too_short", f"{seconds:.2f} s < {limits.min_seconds:g} s")
    if limits.max_seconds is not None and seconds > limits.max_seconds:
        return SkipReason("too_long", f"{seconds:.2f} s > {limits.max_seconds:g} s")
    return None


def load_checked(
    item: dict[str, Any],
    manifest_dir: str | os.PathLike[str],
    limits: CheckLimits = DEFAULT_LIMITS,
    sr: int = SAMPLE_RATE,
) -> tuple[np.ndarray | None, SkipReason | None]:
    """Load an item's audio at ``sr`` and check it: ``(audio, None)`` or ``(None, reason)``.

    A file whose header already says it is too long is not decoded.
    """
    ref = resolve_audio_path(str(item["audio"]), manifest_dir)
    try:
        if os.path.getsize(parse_audio_ref(ref)[0]) == 0:
            return None, SkipReason("empty", f"{parse_audio_ref(ref)[0]}: 0-byte file")
    except OSError:
        pass  # missing: reported below
    try:
        info = audio_info(ref)
    except AudioError as e:
        return None, SkipReason("missing" if "not found" in str(e) else "unreadable", str(e))
    if limits.max_seconds is not None and info.duration > limits.max_seconds + 1.0:
        return None, SkipReason("too_long", f"{info.duration:.2f} s > {limits.max_seconds:g} s")
    try:
        audio = load_audio(ref, sr=sr)
    except AudioError as e:
        return None, SkipReason("missing" if "not found" in str(e) else "unreadable", str(e))
    reason = check_audio(audio, limits, sr)
    return (None, reason) if reason else (audio, None)


def check_utterance(
    item: dict[str, Any], manifest_dir: str | os.PathLike[str], limits: CheckLimits = DEFAULT_LIMITS
) -> SkipReason | None:
    """Why ``item`` (a manifest dict) is unusable, or None when it is good."""
    return load_checked(item, manifest_dir, limits)[1]


@dataclass
class Skipped:
    """Counts of skipped items by reason code, and each problem (for reports)."""

    counts: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    log_first: int = 20

    def add(self, problem: Problem) -> None:
        self.counts[problem.code] += 1
        self.problems.append(problem)
        level = logging.WARNING if len(self.problems) <= self.log_first else logging.DEBUG
        log.log(level, "skipping %s", problem)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "none skipped"
        return f"{self.total} skipped (" + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) + ")"


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _iter_checked(
    rows: Iterable[tuple[int | None, dict[str, Any] | None, str | None]],
    manifest_dir: Path,
    limits: CheckLimits,
    skipped: Skipped,
    sr: int,
    workers: int,
) -> Iterator[tuple[int | None, dict[str, Any], np.ndarray]]:
    """Load and check rows ``(lineno, item or None, line error)`` in a small thread pool, in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk in _chunks(rows, 16 * max(1, workers)):
            todo = [(ln, it) for ln, it, err in chunk if err is None and it is not None]
            loaded = pool.map(lambda r: load_checked(r[1], manifest_dir, limits, sr), todo)
            results = dict(zip([id(it) for _, it in todo], loaded, strict=True))
            for lineno, item, err in chunk:
                if err is not None or item is None:
                    skipped.add(Problem(lineno, None, None, "bad_line", err or "bad line"))
                    continue
                audio, reason = results[id(item)]
                if reason is not None:
                    skipped.add(
                        Problem(
                            lineno, str(item.get("id")), str(item.get("audio")), reason.code, reason.detail
                        )
                    )
                    continue
                assert audio is not None
                yield lineno, item, audio


def iter_good(
    manifest: str | os.PathLike[str],
    limits: CheckLimits = DEFAULT_LIMITS,
    skipped: Skipped | None = None,
    sr: int = SAMPLE_RATE,
    workers: int = 2,
    *,
    items: Iterable[dict[str, Any]] | None = None,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yield ``(item, audio)`` for each good line of a manifest; bad ones go to ``skipped``.

    With ``items`` (already read), those are checked instead of the file's lines; their audio
    paths are still relative to the manifest's folder.
    """
    skipped = skipped if skipped is not None else Skipped()
    if items is None:
        rows = ((ln, it, err) for ln, it, _raw, err in iter_manifest(manifest))
    else:
        rows = ((None, it, None) for it in items)
    for _ln, item, audio in _iter_checked(rows, Path(manifest).parent, limits, skipped, sr, workers):
        yield item, audio


@dataclass
class CheckReport:
    manifest: str
    lines: int = 0
    good: int = 0
    good_hours: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    limits: CheckLimits = DEFAULT_LIMITS
    clean: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = [asdict(p) for p in self.problems]
        return d


def check_manifest(
    manifest: str | os.PathLike[str],
    limits: CheckLimits = DEFAULT_LIMITS,
    clean: str | os.PathLike[str] | None = None,
    workers: int = 2,
    progress: bool = False,
) -> CheckReport:
    """Read every line and its audio; report problems by line; write the good lines to ``clean``.

    Good lines are copied verbatim when ``clean`` is in the same folder, else with their audio
    path rewritten for the new folder.
    """
    manifest = Path(manifest)
    skipped = Skipped(log_first=0)
    raws: dict[int, str] = {}
    good_lines: list[str] = []
    report = CheckReport(manifest=str(manifest), limits=limits, clean=str(clean) if clean else None)

    def rows() -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        for ln, it, raw, err in iter_manifest(manifest):
            report.lines += 1
            raws[ln] = raw
            yield ln, it, err

    it = _iter_checked(rows(), manifest.parent, limits, skipped, SAMPLE_RATE, workers)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="check", unit="utt")
    same_dir = clean is None or Path(clean).absolute().parent == manifest.absolute().parent
    for lineno, item, audio in it:
        assert lineno is not None
        report.good += 1
        report.good_hours += len(audio) / SAMPLE_RATE / 3600
        raw = raws.pop(lineno)
        if not same_dir:
            item = dict(item, audio=relocate_audio(item["audio"], manifest.parent, Path(clean).parent))  # type: ignore[arg-type]
            raw = json.dumps(item, ensure_ascii=False)
        good_lines.append(raw.rstrip("\n") + "\n")
        for k in [k for k in raws if k < lineno]:
            raws.pop(k)
    report.counts = {code: skipped.counts.get(code, 0) for code in REASONS}
    report.problems = sorted(skipped.problems, key=lambda p: p.lineno or 0)
    if clean is not None:
        atomic_write_text(clean, "".join(good_lines))
    return report


def format_report(report: CheckReport, max_rows: int = 50) -> str:
    """A plain-text report (the CLI prints a rich table when rich is available)."""
    lines = [
        f"{report.manifest}: {report.lines} lines, {report.good} good ({report.good_hours:.3f} h), "
        f"{report.lines - report.good} skipped",
    ]
    lines += [f"  {code:<11} {n}" for code, n in report.counts.items()]
    for p in report.problems[:max_rows]:
        lines.append(f"  {p}")
    if len(report.problems) > max_rows:
        lines.append(f"  ... {len(report.problems) - max_rows} more")
    if report.clean:
        lines.append(f"cleaned manifest: {report.clean} ({report.good} lines)")
    return "\n".join(lines)
