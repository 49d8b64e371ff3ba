"""``blsp behave merge``: join shard outputs into one file and account for every manifest id.

Rows are streamed shard by shard (first occurrence of an id wins, later ones are counted as
duplicates) into a temporary file that is renamed into place, so a killed merge leaves no
half-written output. The shards' ``.rejected.jsonl`` and ``.failed.jsonl`` sidecars are merged
too. With ``--manifest`` every valid manifest id must be kept, rejected (with its reason) or
failed; the others are reported as missing.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from blsp.behaviors.inputs import read_inputs, sidecar
from blsp.behaviors.job import VOLATILE_SETTINGS
from blsp.data.manifest import relocate_audio
from blsp.errors import BlspError
from blsp.utils.io import JsonlAppender, atomic_write_json, iter_jsonl

log = logging.getLogger(__name__)

_CHUNK = 2000


def _rebase(audio: Any, src_dir: Path, dst_dir: Path) -> Any:
    """A shard line's relative ``audio`` reference, made valid from the merged output's folder."""
    if not isinstance(audio, str) or src_dir.resolve() == dst_dir.resolve():
        return audio
    return relocate_audio(audio, src_dir, dst_dir, mode="keep")


def _settings_key(obj: dict[str, Any]) -> tuple[Any, ...]:
    gen = obj.get("generation") or {}
    return (
        obj.get("behavior"),
        obj.get("instruction"),
        tuple(sorted((k, repr(v)) for k, v in gen.items() if k not in VOLATILE_SETTINGS)),
    )


class _Writer:
    """Stream rows into ``path`` through a temporary file; ``commit()`` renames it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.merging")
        self.tmp.unlink(missing_ok=True)
        self.appender = JsonlAppender(self.tmp)
        self.buffer: list[dict[str, Any]] = []
        self.written = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        self.written += self.appender.append(self.buffer)
        self.buffer = []

    @property
    def ids(self) -> set[str]:
        return self.appender.done | {str(r.get("id")) for r in self.buffer}

    def commit(self, keep_empty: bool = True) -> None:
        self.flush()
        self.appender.close()
        if self.written or keep_empty:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)

    def abort(self) -> None:
        self.appender.close()
        self.tmp.unlink(missing_ok=True)


def _rows(path: Path, bad: list[str]) -> Iterator[dict[str, Any]]:
    for lineno, obj, _ in iter_jsonl(path):
        if obj is None or obj.get("id") is None:
            bad.append(f"{path}:{lineno}")
            continue
        yield obj


def merge_shards(
    shards: Sequence[str | Path],
    out: str | Path,
    manifest: str | Path | None = None,
    text_field: str = "text",
) -> dict[str, Any]:
    """Merge shard outputs into ``out``; returns a report (also written to ``OUT.summary.json``)."""
    out = Path(out)
    paths = [Path(s) for s in shards]
    if not paths:
        raise BlspError("merge needs at least one shard file")
    for p in paths:
        if not p.is_file():
            raise BlspError(f"{p}: shard file not found")
        if out.exists() and p.resolve() == out.resolve():
            raise BlspError(f"{p}: the output file cannot also be a shard")
    if len({p.resolve() for p in paths}) != len(paths):
        raise BlspError("the same shard file is given twice")
    out.parent.mkdir(parents=True, exist_ok=True)

    bad: list[str] = []
    duplicates = 0
    settings: tuple[Any, ...] | None = None
    settings_from = ""
    kept = _Writer(out)
    rejected = _Writer(sidecar(out, "rejected.jsonl"))
    failed = _Writer(sidecar(out, "failed.jsonl"))
    try:
        seen: set[str] = set()
        for p in paths:
            for obj in _rows(p, bad):
                key = _settings_key(obj)
                if settings is None:
                    settings, settings_from = key, str(p)
                elif key != settings:
                    raise BlspError(
                        f"{p}: id {obj['id']!r} was generated with another behavior or other settings than "
                        f"{settings_from}; merge only shards of one run"
                    )
                k = str(obj["id"])
                if k in seen:
                    duplicates += 1
                    continue
                seen.add(k)
                if "audio" in obj:
                    obj["audio"] = _rebase(obj["audio"], p.parent, out.parent)
                kept.add(obj)
        kept_ids = seen
        reasons: Counter = Counter()
        rejected_ids: set[str] = set()
        for p in paths:
            side = sidecar(p, "rejected.jsonl")
            for obj in _rows(side, bad) if side.is_file() else []:
                k = str(obj["id"])
                if k in kept_ids or k in rejected_ids:
                    continue
                rejected_ids.add(k)
                reasons[obj.get("reason", "?")] += 1
                if "audio" in obj:
                    obj["audio"] = _rebase(obj["audio"], p.parent, out.parent)
                rejected.add(obj)
        failed_ids: set[str] = set()
        for p in paths:
            side = sidecar(p, "failed.jsonl")
            for obj in _rows(side, bad) if side.is_file() else []:
                k = str(obj["id"])
                if k in kept_ids or k in rejected_ids or k in failed_ids:
                    continue
                failed_ids.add(k)
                failed.add(obj)
        kept.commit()
        rejected.commit(keep_empty=False)
        failed.commit(keep_empty=False)
    except BaseException:
        for w in (kept, rejected, failed):
            w.abort()
        raise

    report: dict[str, Any] = {
        "output": str(out),
        "shards": [str(p) for p in paths],
        "kept": len(kept_ids),
        "rejected": dict(reasons),
        "failed": len(failed_ids),
        "duplicates": duplicates,
        "bad_lines": len(bad),
    }
    if bad:
        report["bad_line_examples"] = bad[:10]
    if manifest is not None:
        m = read_inputs(manifest, text_field)
        ids = {it.id for it in m.items}
        accounted = kept_ids | rejected_ids | failed_ids
        missing = [it.id for it in m.items if it.id not in accounted]
        report["manifest"] = {
            "path": str(m.path),
            "lines": m.lines,
            "valid": len(m.items),
            "skipped": dict(m.skipped),
        }
        report["missing"] = len(missing)
        report["missing_ids"] = missing[:20]
        report["unknown_ids"] = len(accounted - ids)
    atomic_write_json(sidecar(out, "summary.json"), report)
    return report
