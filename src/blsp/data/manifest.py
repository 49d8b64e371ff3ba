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
``(line_number, item, raw_line, defect)`` for jobs that keep line numbers (``blsp data check``,
behaviors, generation, training); what is required of a line is an option of it.
``resolve_audio_path`` and ``relocate_audio`` are the one way to turn an ``audio`` field into a
file (the segment suffix is kept).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blsp.data.audio import format_audio_ref, parse_audio_ref
from blsp.errors import BlspError
from blsp.utils.io import iter_jsonl, line_defect, write_jsonl

REQUIRED_FIELDS = ("id", "audio")


class Defect(str):
    """Why a manifest line is not a usable item (the text), with a short ``code`` to count it by:
    ``bad_line``, ``missing_id``, ``missing_audio``, ``missing_text``, ``bad_duration``,
    ``duplicate_id`` (``missing_<field>`` for any other required field)."""

    code = "bad_line"

    def __new__(cls, text: str, code: str = "bad_line") -> Defect:
        defect = super().__new__(cls, text)
        defect.code = code
        return defect


@dataclass(frozen=True)
class LineError:
    """A manifest line that is not a usable item."""

    lineno: int
    message: str
    raw: str

    def __str__(self) -> str:
        return f"line {self.lineno}: {self.message}"


def item_defect(
    obj: Any, required: Sequence[str] = REQUIRED_FIELDS, text_field: str | None = "text"
) -> Defect | None:
    """Why ``obj`` is not a well-formed item, or None. Checks field types only (no file access).

    ``required`` fields must be present; ``id`` must be a non-blank string or an integer, ``audio``
    (when required) a non-empty string, ``text_field`` (when given and present, or required) a
    string, and ``duration`` (when present) a non-negative number.
    """
    if not isinstance(obj, dict):
        return Defect("not a JSON object")
    for key in required:
        if key not in obj:
            return Defect(f"missing field {key!r}", f"missing_{key}")
    if "id" in obj and (
        not isinstance(obj["id"], str | int) or isinstance(obj["id"], bool) or not str(obj["id"]).strip()
    ):
        return Defect("field 'id' must be a non-empty string", "missing_id")
    if "audio" in required and (not isinstance(obj["audio"], str) or not obj["audio"].strip()):
        return Defect("field 'audio' must be a non-empty string", "missing_audio")
    if text_field is not None and text_field in obj and not isinstance(obj[text_field], str):
        return Defect(f"field {text_field!r} must be a string", "missing_text")
    if "duration" in obj:
        d = obj["duration"]
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d) or d < 0:
            return Defect("field 'duration' must be a non-negative number", "bad_duration")
    return None


def validate_item(obj: Any) -> str | None:
    """Why ``obj`` is not a well-formed speech item (``id``, ``audio``, optional ``text``), or None."""
    return item_defect(obj)


def iter_manifest(
    path: str | os.PathLike[str],
    required: Sequence[str] = REQUIRED_FIELDS,
    text_field: str | None = "text",
) -> Iterator[tuple[int, dict[str, Any] | None, str, Defect | None]]:
    """Yield ``(lineno, item or None, raw_line, defect or None)`` for each non-blank line.

    Malformed JSON, a non-object, a missing/ill-typed field (see :func:`item_defect`), or a
    duplicate ``id`` give a :class:`Defect` (the first occurrence of an id wins); callers report
    it as ``file:line: reason``, skip the line and count it.
    """
    path = Path(path)
    if not path.is_file():
        raise BlspError(f"{path}: manifest not found")
    seen: dict[str, int] = {}
    for lineno, obj, raw in iter_jsonl(path):
        if obj is None:
            yield lineno, None, raw, Defect(line_defect(raw))
            continue
        err = item_defect(obj, required, text_field)
        if err is None and "id" in obj:
            key = str(obj["id"])
            if key in seen:
                err = Defect(f"duplicate id {key!r} (first on line {seen[key]})", "duplicate_id")
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
    p = _expand(p)
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
    file lies under ``to_dir``, else absolute); ``keep`` (an absolute reference is kept as it is,
    a relative one is made relative to ``to_dir``). A segment suffix is kept.
    """
    if mode not in ("auto", "absolute", "relative", "keep"):
        raise BlspError(f"paths mode must be auto, absolute, relative or keep, not {mode!r}")
    if mode == "keep" and _expand(parse_audio_ref(audio)[0]).is_absolute():
        return audio
    resolved = resolve_audio_path(audio, from_dir)
    p, start, num = parse_audio_ref(resolved)
    to_dir = Path(os.path.abspath(to_dir))
    if mode == "absolute":
        return format_audio_ref(p, start, num)
    if mode in ("relative", "keep") or _is_under(p, to_dir):
        return format_audio_ref(os.path.relpath(p, to_dir), start, num)
    return format_audio_ref(p, start, num)


def _expand(p: Path) -> Path:
    return Path(os.path.expanduser(str(p)))


def _is_under(p: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(p)).relative_to(folder)
        return True
    except ValueError:
        return False
