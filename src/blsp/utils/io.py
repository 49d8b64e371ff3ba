"""Atomic and resumable file writing shared by every job over many items.

``JsonlAppender`` is the one way jobs (behaviors, generation, synthesis, evaluation) write their
output: each finished batch is appended with a single ``write`` and ``fsync``; on reopen a torn
last line (from a SIGKILL mid-write) is cut off and the ids already done are known, so a rerun
skips them and never duplicates a line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from blsp.errors import BlspError

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: JSON has no such numbers (``json`` writes invalid ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically; NaN and infinities are written as null."""
    atomic_write_text(
        path, json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    )


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Atomically write ``rows`` as a whole JSON Lines file; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


class MalformedLine(str):
    """The text of a line that :func:`iter_jsonl` could not use, with ``reason`` saying why."""

    reason = "malformed JSON (not one JSON object)"

    def __new__(cls, text: str, reason: str | None = None) -> MalformedLine:
        line = super().__new__(cls, text)
        if reason is not None:
            line.reason = reason
        return line


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Yield ``(line_number, object or None if malformed, raw_line)`` for each non-blank line.

    A line that is not UTF-8, or whose strings hold a lone surrogate (``"\\ud800"``, which no
    later write can encode), is malformed too. For a malformed line ``raw_line`` is a
    :class:`MalformedLine` (see :func:`line_defect`), and the reason is logged as ``file:line``, so
    every reader skips and counts it instead of crashing on it.
    """
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                log.warning("%s:%d: not UTF-8 (byte %d); skipped", path, lineno, e.start)
                yield lineno, None, MalformedLine(data.decode("utf-8", "replace"), "not UTF-8")
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                yield lineno, None, MalformedLine(raw)
                continue
            if "\\ud" in raw.lower() and not _encodable(obj):
                log.warning("%s:%d: a string holds a lone surrogate; skipped", path, lineno)
                yield (
                    lineno,
                    None,
                    MalformedLine(raw, "a string holds a lone surrogate (not encodable as UTF-8)"),
                )
                continue
            if not isinstance(obj, dict):
                yield lineno, None, MalformedLine(raw)
                continue
            yield lineno, obj, raw


def line_defect(raw: str) -> str:
    """Why :func:`iter_jsonl` yielded None for ``raw``: not UTF-8, a lone surrogate, or not one
    JSON object."""
    return raw.reason if isinstance(raw, MalformedLine) else MalformedLine.reason


def _encodable(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class OutputLocked(BlspError):
    """Another process is writing the same output file."""


def _lock_output(path: Path) -> int:
    """An exclusive, non-blocking lock for writing ``path``; returns the lock file's descriptor."""
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one writer is the user's to ensure
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputLocked(
            f"{path}: another process is writing it (lock {lock_path}); wait for it to finish, "
            "or write to another file"
        ) from None
    return fd


class JsonlAppender:
    """Append-only JSON Lines output that survives SIGKILL and resumes by id.

    One writer at a time: a second process that opens the same file is refused with
    :class:`OutputLocked` (an exclusive ``flock`` on ``.<name>.lock`` beside it, released when
    the writer closes or dies), instead of both appending and losing lines.

    Example::

        with JsonlAppender(out, id_key="id") as out:
            todo = [x for x in items if x["id"] not in out.done]
            for batch in batches(todo):
                out.append(process(batch))
    """

    def __init__(self, path: str | os.PathLike[str], id_key: str = "id") -> None:
        self.path = Path(path)
        self.id_key = id_key
        self.done: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._lock = _lock_output(self.path)
        try:
            self._repair_and_scan()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            os.close(self._lock)
            raise

    def _repair_and_scan(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = len(data)
        if data and not data.endswith(b"\n"):  # a torn last line from a killed writer
            keep = data.rfind(b"\n") + 1
        good = bytearray()
        for line in data[:keep].splitlines(keepends=True):
            try:
                obj = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8: drop the corrupt line; its id is redone
                continue
            key = str(obj.get(self.id_key)) if isinstance(obj, dict) else None
            if key is None or key in self.done:
                continue
            self.done.add(key)
            good += line
        if len(good) != len(data):
            atomic_write_bytes(self.path, bytes(good))

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append rows in one write and fsync; rows whose id is already done are dropped."""
        lines, ids = [], []
        for r in rows:
            key = str(r.get(self.id_key))
            if key in self.done or key in ids:
                continue
            lines.append(json.dumps(r, ensure_ascii=False) + "\n")
            ids.append(key)
        if not lines:
            return 0
        payload = "".join(lines).encode("utf-8")
        view = memoryview(payload)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self.done.update(ids)
        return len(lines)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock >= 0:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = -1

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
