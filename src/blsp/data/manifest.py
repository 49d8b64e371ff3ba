"""The one speech manifest format: JSON Lines, one utterance a line.

Each line is a JSON object (an *item*; plain ``dict``, no wrapper class) with

- ``id`` (str, unique in the file),
- ``audio`` (str): a path relative to the manifest's folder, or absolute, optionally a segment
  ``path:start_sample:num_samples`` (samples at the file's own rate, see :mod:`blsp.data.audio`),
- ``text`` (str): the transcript; may be absent for sets without one (e.g. spoken intents),
- ``duration`` (float seconds),
- optional ``speaker``, ``lang`` and any task fields (``intent``, ``label``, ``translation``, ``en``/
  ``de``/``fr``, and for synthetic speech ``engine``, ``voice``, ``split``, ``rate``, ``pitch``...).

``read_manifest`` returns ``(items, errors)``; each error names its line. ``iter_manifest`` yields
``(line_number, item, raw_line, error)`` for jobs that keep line numbers (``blsp data check``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blsp.data.audio import format_audio_ref, parse_audio_ref
from blsp.errors import BlspError
from blsp.utils.io import iter_jsonl, line_defect, write_jsonl

REQUIRED_FIELDS = ("id", "audio")


@dataclass(frozen=True)
class LineError:
    """A manifest line that is not a usable item."""

    lineno: int
    message: str
    raw: str

    def __str__(self) -> str:
        return f"line {self.lineno}: {self.message}"


def validate_item(obj: Any) -> str | None:
    """Why ``obj`` is not a well-formed item, or None. Checks field types only (no file access)."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key in REQUIRED_FIELDS:
        if key not in obj:
            return f"missing field {key!r}"
    if not isinstance(obj["id"], str | int) or isinstance(obj["id"], bool) or str(obj["id"]) == "":
        return "field 'id' must be a non-empty string"
    if not isinstance(obj["audio"], str) or not obj["audio"].strip():
        return "field 'audio' must be a non-empty string"
    if "text" in obj and not isinstance(obj["text"], str):
        return "field 'text' must be a string"
    if "duration" in obj:
        d = obj["duration"]
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d) or d < 0:
            return "field 'duration' must be a non-negative number"
    return None


def iter_manifest(
    path: str | os.PathLike[str],
) -> Iterator[tuple[int, dict[str, Any] | None, str, str | None]]:
    """Yield ``(lineno, item or None, raw_line, error or None)`` for each non-blank line.

    Malformed JSON, a non-object, a missing/ill-typed field, or a duplicate ``id`` give an error
    (the first occurrence of an id wins).
    """
    path = Path(path)
    if not path.is_file():
        raise BlspError(f"{path}: manifest not found")
    seen: dict[str, int] = {}
    for lineno, obj, raw in iter_jsonl(path):
        if obj is None:
            yield lineno, None, raw, line_defect(raw)
            continue
        err = validate_item(obj)
        if err is None:
            key = str(obj["id"])
            if key in seen:
                err = f"duplicate id {key!r} (first on line {seen[key]})"
            else:
                seen[key] = lineno
        yield lineno, (obj if err is None else None), raw, err


def read_manifest(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[LineError]]:
    """Read a manifest: ``(items, errors)``; ``errors`` lists bad lines with their line numbers."""
    items: list[dict[str, Any]] = []
    errors: list[LineError] = []
    for lineno, item, raw, err in iter_manifest(path):
        if err is not None:
            errors.append(LineError(lineno, err, raw.rstrip("\n")))
        else:
            assert item is not None
            items.append(item)
    return items, errors


def load_manifest(path: str | os.PathLike[str], strict: bool = False) -> list[dict[str, Any]]:
    """Items of a manifest; bad lines are logged and skipped, or raise BlspError when ``strict``."""
    import logging

    items, errors = read_manifest(path)
    if errors:
        if strict:
            raise BlspError(
                f"{path}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
            )
        log = logging.getLogger(__name__)
        for e in errors[:10]:
            log.warning("%s: skipping %s", path, e)
        if len(errors) > 10:
            log.warning("%s: skipping %d more bad lines", path, len(errors) - 10)
    return items


def write_manifest(path: str | os.PathLike[str], items: Iterable[dict[str, Any]]) -> int:
    """Atomically write ``items`` as a manifest (temporary file + rename); returns the count."""
    return write_jsonl(path, items)


def resolve_audio_path(audio: str, manifest_dir: str | os.PathLike[str]) -> str:
    """The absolute audio reference of an item's ``audio`` field (a segment suffix is kept)."""
    p, start, num = parse_audio_ref(audio)
    p = Path(os.path.expanduser(str(p)))
    if not p.is_absolute():
        p = Path(manifest_dir) / p
    return format_audio_ref(os.path.abspath(os.path.normpath(p)), start, num)


def relocate_audio(
    audio: str,
    from_dir: str | os.PathLike[str],
    to_dir: str | os.PathLike[str],
    mode: str = "auto",
) -> str:
    """Rewrite an ``audio`` field written for a manifest in ``from_dir`` for one in ``to_dir``.

    ``mode``: ``absolute``; ``relative`` (always ``os.path.relpath``); ``auto`` (relative when the
    file lies under ``to_dir``, else absolute).
    """
    if mode not in ("auto", "absolute", "relative"):
        raise BlspError(f"paths mode must be auto, absolute or relative, not {mode!r}")
    resolved = resolve_audio_path(audio, from_dir)
    p, start, num = parse_audio_ref(resolved)
    to_dir = Path(os.path.abspath(to_dir))
    if mode == "absolute":
        return format_audio_ref(p, start, num)
    if mode == "relative" or _is_under(p, to_dir):
        return format_audio_ref(os.path.relpath(p, to_dir), start, num)
    return format_audio_ref(p, start, num)


def _is_under(p: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(p)).relative_to(folder)
        return True
    except ValueError:
        return False
