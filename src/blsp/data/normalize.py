"""Transcript normalisers: ``none``, ``lower``, ``whisper`` (English) and ``whisper-basic``.

``whisper`` is Whisper's own English normaliser from ``transformers``
(``EnglishTextNormalizer``): numbers, contractions, symbols, British -> American spelling. The
spelling mapping it needs is the ``normalizer.json`` that Whisper's tokenizer ships; no model hub
is reached for it. It is looked for, in order, in:

1. ``$BLSP_WHISPER_SPELLING`` (a path to that JSON file),
2. ``normalizer.json`` in a folder given to :func:`english_spelling_mapping` (a Whisper HF folder),
3. the ``whisper_normalizer`` package (PyPI ``whisper-normalizer``, ``normalizers/english.json``),
4. the ``whisper`` package (PyPI ``openai-whisper``, ``normalizers/english.json``).

With none found, the normaliser runs without spelling standardisation and logs a warning once.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from blsp.errors import BlspError

log = logging.getLogger(__name__)

NORMALIZERS = ("none", "lower", "whisper", "whisper-basic")
_SPACES = re.compile(r"\s+")


def find_spelling_file(model_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Whisper's ``english.json`` spelling map: ``$BLSP_WHISPER_SPELLING``, a model folder's
    ``normalizer.json``, then the ``whisper_normalizer`` or ``openai-whisper`` package; None if none."""
    env = os.environ.get("BLSP_WHISPER_SPELLING")
    if env:
        p = Path(env)
        if not p.is_file():
            raise BlspError(f"BLSP_WHISPER_SPELLING={env}: file not found")
        return p
    if model_dir is not None and (Path(model_dir) / "normalizer.json").is_file():
        return Path(model_dir) / "normalizer.json"
    for pkg in ("whisper_normalizer", "whisper"):
        if importlib.util.find_spec(pkg) is None:
            continue
        try:
            p = Path(str(importlib.resources.files(pkg).joinpath("normalizers", "english.json")))
        except Exception:  # a package that fails to import
            continue
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=4)
def english_spelling_mapping(model_dir: str | None = None) -> dict[str, str]:
    """Whisper's British -> American spelling mapping (see the module docstring for where from)."""
    p = find_spelling_file(model_dir)
    if p is None:
        log.warning(
            "Whisper's English spelling mapping was not found (pip install --no-deps whisper-normalizer, "
            "or set BLSP_WHISPER_SPELLING to a Whisper normalizer.json); normalising without it"
        )
        return {}
    try:
        mapping = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BlspError(f"{p}: cannot read Whisper spelling mapping ({e})") from e
    if not isinstance(mapping, dict):
        raise BlspError(f"{p}: Whisper spelling mapping must be a JSON object")
    return mapping


@functools.lru_cache(maxsize=1)
def whisper_english_normalizer() -> Callable[[str], str]:
    """``transformers``' ``EnglishTextNormalizer`` built with the offline spelling mapping."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(english_spelling_mapping())


@functools.lru_cache(maxsize=1)
def whisper_basic_normalizer() -> Callable[[str], str]:
    """``transformers``' ``BasicTextNormalizer`` (any language: lower-case, symbols removed)."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def lower(text: str) -> str:
    """Lower-case and collapse white space."""
    return _SPACES.sub(" ", text.lower()).strip()


def get_normalizer(name: str | None) -> Callable[[str], str]:
    """The normaliser called ``name`` (one of :data:`NORMALIZERS`; None means ``none``)."""
    if name in (None, "none"):
        return lambda s: _SPACES.sub(" ", s).strip()
    if name == "lower":
        return lower
    if name in ("whisper", "whisper-basic"):
        fn = whisper_english_normalizer() if name == "whisper" else whisper_basic_normalizer()
        return lambda s: _SPACES.sub(" ", fn(s)).strip()
    raise BlspError(f"unknown normaliser {name!r}; choose one of {', '.join(NORMALIZERS)}")
