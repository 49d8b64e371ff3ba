"""Checks on the bundled text resources (sentence corpus, ASR instructions, evaluation task texts).

Everything is read through ``importlib.resources`` so the tests also prove the files ship as package data.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from functools import cache
from importlib import resources

import pytest

from blsp.instructions import SNIPS_LIGHT_INTENTS, asr_instructions

ROOT = resources.files("blsp.resources")

SENTENCE_ASCII = re.compile(r"[A-Za-z][A-Za-z ,.?!'\-:;]*[.?!]")
DIGIT = re.compile(r"\d")
CJK = re.compile(r"[\u4e00-\u9fff]")

INTENTS = tuple(s.strip() for s in SNIPS_LIGHT_INTENTS.split(","))
SENTIMENTS = ("positive", "negative", "neutral")

TASK_SCHEMAS: dict[str, tuple[str, ...]] = {
    "st.jsonl": ("id", "en", "de", "fr"),
    "x2en.jsonl": ("id", "lang", "text", "en"),
    "intent.jsonl": ("id", "text", "intent"),
    "sentiment.jsonl": ("id", "text", "label"),
    "qa.jsonl": ("id", "text", "question", "answer"),
}
# Fields that get synthesised to speech (English TTS unless noted): numbers must be written in words.
SPOKEN_FIELDS: dict[str, tuple[str, ...]] = {
    "st.jsonl": ("en",),
    "x2en.jsonl": ("text",),  # German, French or Chinese speech
    "intent.jsonl": ("text",),
    "sentiment.jsonl": ("text",),
    "qa.jsonl": ("text", "question"),
}


def _read(rel: str) -> str:
    node = ROOT
    for part in rel.split("/"):
        node = node.joinpath(part)
    assert node.is_file(), f"resource {rel} is missing from blsp.resources"
    return node.read_text(encoding="utf-8")


@cache
def _lines(rel: str) -> tuple[str, ...]:
    text = _read(rel)
    assert text.endswith("\n"), f"{rel}: last line has no newline"
    lines = text.split("\n")[:-1]
    for i, line in enumerate(lines, 1):
        assert line, f"{rel}:{i}: empty line"
        assert line == line.strip(), f"{rel}:{i}: leading/trailing whitespace"
    return tuple(lines)


@cache
def _rows(name: str) -> tuple[dict, ...]:
    rows = []
    for i, line in enumerate(_lines(f"tasks/{name}"), 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:  # pragma: no cover - message for the failing case
            pytest.fail(f"tasks/{name}:{i}: invalid JSON ({e})")
        assert isinstance(obj, dict), f"tasks/{name}:{i}: not a JSON object"
        rows.append(obj)
    return tuple(rows)


def _norm(text: str) -> str:
    """Case/punctuation-insensitive key used for duplicate and overlap checks."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _words(text: str) -> int:
    return len(text.split())


def _dups(items) -> list[str]:
    return [k for k, n in Counter(_norm(t) for t in items).items() if n > 1]


def _spoken_english() -> list[str]:
    out = [r["en"] for r in _rows("st.jsonl")]
    for name in ("intent.jsonl", "sentiment.jsonl", "qa.jsonl"):
        out += [r["text"] for r in _rows(name)]
    return out


# ---------------------------------------------------------------- sentence corpus


@pytest.mark.parametrize(
    ("rel", "lo", "hi"), [("sentences/train.txt", 2000, 4000), ("sentences/heldout.txt", 250, 400)]
)
def test_sentence_files_count_and_form(rel: str, lo: int, hi: int) -> None:
    lines = _lines(rel)
    assert lo <= len(lines) <= hi, f"{rel}: {len(lines)} sentences, expected {lo}..{hi}"
    for i, s in enumerate(lines, 1):
        assert SENTENCE_ASCII.fullmatch(s), f"{rel}:{i}: not plain ASCII sentence text: {s!r}"
        assert not DIGIT.search(s), f"{rel}:{i}: digits (write numbers in words): {s!r}"
        assert s[0].isupper(), f"{rel}:{i}: does not start with a capital: {s!r}"
        assert 5 <= _words(s) <= 25, f"{rel}:{i}: {_words(s)} words, expected 5..25: {s!r}"


@pytest.mark.parametrize("rel", ["sentences/train.txt", "sentences/heldout.txt"])
def test_sentence_length_distribution(rel: str) -> None:
    counts = [_words(s) for s in _lines(rel)]
    mean = statistics.mean(counts)
    assert 10.5 <= mean <= 13.5, f"{rel}: mean length {mean:.2f} words"
    # the range is actually used, not just the middle
    assert sum(c <= 7 for c in counts) >= 0.03 * len(counts), f"{rel}: too few short sentences"
    assert sum(c >= 18 for c in counts) >= 0.05 * len(counts), f"{rel}: too few long sentences"
    assert sum(s.endswith("?") for s in _lines(rel)) >= 0.03 * len(counts), f"{rel}: too few questions"


def test_sentences_unique_and_disjoint() -> None:
    train, held = _lines("sentences/train.txt"), _lines("sentences/heldout.txt")
    assert not _dups(train), f"duplicates in train.txt: {_dups(train)[:5]}"
    assert not _dups(held), f"duplicates in heldout.txt: {_dups(held)[:5]}"
    overlap = {_norm(s) for s in train} & {_norm(s) for s in held}
    assert not overlap, f"train/heldout overlap: {sorted(overlap)[:5]}"


# ---------------------------------------------------------------- ASR instructions


def test_asr_instructions() -> None:
    lines = _lines("asr_instructions.txt")
    assert 90 <= len(lines) <= 110, f"asr_instructions.txt: {len(lines)} lines"
    assert not _dups(lines), f"duplicate instructions: {_dups(lines)[:5]}"
    for i, s in enumerate(lines, 1):
        assert not s.startswith("#"), f"asr_instructions.txt:{i}: starts with '#' (read as a comment)"
        assert s.isascii() and not DIGIT.search(s), f"asr_instructions.txt:{i}: {s!r}"
        assert 4 <= _words(s) <= 25, f"asr_instructions.txt:{i}: {s!r}"
    # the loader in blsp.instructions sees exactly these lines
    assert asr_instructions() == lines


# ---------------------------------------------------------------- evaluation tasks


@pytest.mark.parametrize("name", sorted(TASK_SCHEMAS))
def test_task_schema(name: str) -> None:
    keys = TASK_SCHEMAS[name]
    rows = _rows(name)
    for i, row in enumerate(rows, 1):
        assert set(row) == set(keys), f"tasks/{name}:{i}: keys {list(row)}, expected {list(keys)}"
        for k in keys:
            v = row[k]
            assert isinstance(v, str) and v.strip() == v and v, f"tasks/{name}:{i}: field {k!r} = {v!r}"
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids), f"tasks/{name}: duplicate ids"


@pytest.mark.parametrize("name", sorted(SPOKEN_FIELDS))
def test_task_spoken_fields_have_no_digits_or_duplicates(name: str) -> None:
    for field in SPOKEN_FIELDS[name]:
        values = [r[field] for r in _rows(name)]
        for i, v in enumerate(values, 1):
            assert not DIGIT.search(v), f"tasks/{name}:{i}: digits in {field!r}: {v!r}"
        if field != "question":  # the same question may be asked about different passages
            assert not _dups(values), f"tasks/{name}: duplicate {field!r}: {_dups(values)[:5]}"


def test_st() -> None:
    rows = _rows("st.jsonl")
    assert len(rows) == 120
    for r in rows:
        assert 5 <= _words(r["en"]) <= 20, r
        assert r["en"].isascii(), r
        assert not DIGIT.search(r["de"] + r["fr"]), r
    assert not _dups(r["de"] for r in rows) and not _dups(r["fr"] for r in rows)


def test_x2en() -> None:
    rows = _rows("x2en.jsonl")
    assert Counter(r["lang"] for r in rows) == {"de": 60, "fr": 60, "zh": 60}
    for r in rows:
        assert r["en"].isascii() and not DIGIT.search(r["en"]), r
        if r["lang"] == "zh":
            assert CJK.search(r["text"]) and not re.search(r"[A-Za-z]", r["text"]), r
        else:
            assert not CJK.search(r["text"]) and _words(r["text"]) >= 2, r


def test_intent_labels() -> None:
    rows = _rows("intent.jsonl")
    assert len(INTENTS) == 6
    assert Counter(r["intent"] for r in rows) == dict.fromkeys(INTENTS, 20)
    for r in rows:
        assert r["text"].isascii() and 3 <= _words(r["text"]) <= 20, r


def test_sentiment_labels() -> None:
    rows = _rows("sentiment.jsonl")
    assert Counter(r["label"] for r in rows) == dict.fromkeys(SENTIMENTS, 50)
    for r in rows:
        assert r["text"].isascii() and 4 <= _words(r["text"]) <= 25, r


def test_qa() -> None:
    rows = _rows("qa.jsonl")
    assert len(rows) == 60
    for r in rows:
        assert 25 <= _words(r["text"]) <= 45, f"{r['id']}: passage has {_words(r['text'])} words"
        assert r["question"].endswith("?"), r
        assert _words(r["answer"]) <= 12, r
        assert r["text"].isascii() and r["question"].isascii() and r["answer"].isascii(), r


def test_task_texts_disjoint_from_sentence_corpus() -> None:
    corpus = {_norm(s) for s in _lines("sentences/train.txt") + _lines("sentences/heldout.txt")}
    spoken = _spoken_english()
    leaked = [t for t in spoken if _norm(t) in corpus]
    assert not leaked, f"task sentences also in the sentence corpus: {leaked[:5]}"
    refs = [r["en"] for r in _rows("x2en.jsonl")]
    leaked = [t for t in refs if _norm(t) in corpus]
    assert not leaked, f"x2en references also in the sentence corpus: {leaked[:5]}"


def test_norm_catches_case_and_punctuation_variants() -> None:
    """The duplicate/overlap checks above rely on this normalisation."""
    assert _norm("Hello, World!") == _norm("hello world")
    assert _dups(["A cat sat.", "a cat sat"]) == ["a cat sat"]
    assert _norm("It's here.") != _norm("Its here.")
