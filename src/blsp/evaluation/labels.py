"""Map an LLM's free-text answer onto a closed label set.

Steps, first hit wins: exact match of the stripped answer; case/format-insensitive match
(``SwitchLightOn`` = ``switch light on`` = ``switch_light_on``); a label mentioned inside the
answer (whole words; the longest of overlapping mentions, then the earliest; an answer naming more
than ``max_mentions`` different labels only lists the choices and is outside the set); a fuzzy match
(``difflib`` ratio) of the answer or of one of its word windows against a label. Otherwise the
answer is outside the set (``None``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NON_WORD = re.compile(r"[^\w]+|_+", re.UNICODE)
_STRIP = " \t\r\n\"'`.,;:!?()[]{}<>*-"
_AMBIGUOUS = "\x00ambiguous"


def label_words(text: str) -> str:
    """Lower-case words of ``text`` with CamelCase, ``_``/``-`` and punctuation split: ``SwitchLightOn`` -> ``switch light on``."""
    return " ".join(_NON_WORD.sub(" ", _CAMEL.sub(" ", text)).lower().split())


@dataclass(frozen=True)
class LabelMatch:
    """The mapped label (``None``: outside the set) and how it was found."""

    label: str | None
    how: str  # exact | case | contains | fuzzy | ambiguous | none


class LabelMapper:
    """Maps free-text answers to one of ``labels`` (see module docstring)."""

    def __init__(self, labels: Sequence[str], fuzzy_cutoff: float = 0.85, max_mentions: int = 2) -> None:
        if not labels:
            raise ValueError("empty label set")
        self.labels = list(dict.fromkeys(labels))
        self.fuzzy_cutoff = fuzzy_cutoff
        self.max_mentions = max_mentions
        self._words = {lab: label_words(lab) for lab in self.labels}
        self._joined = {lab: w.replace(" ", "") for lab, w in self._words.items()}

    def __call__(self, answer: str | None) -> LabelMatch:
        return self.map(answer)

    def map(self, answer: str | None) -> LabelMatch:
        text = (answer or "").strip()
        if not text:
            return LabelMatch(None, "none")
        bare = text.strip(_STRIP)
        for lab in self.labels:
            if bare == lab:
                return LabelMatch(lab, "exact")
        words = label_words(text)
        joined = words.replace(" ", "")
        for lab in self.labels:
            if words == self._words[lab] or joined == self._joined[lab]:
                return LabelMatch(lab, "case")
        hit = self._contains(text, words)
        if hit == _AMBIGUOUS:
            return LabelMatch(None, "ambiguous")
        if hit is not None:
            return LabelMatch(hit, "contains")
        hit = self._fuzzy(words)
        if hit is not None:
            return LabelMatch(hit, "fuzzy")
        return LabelMatch(None, "none")

    def _contains(self, text: str, words: str) -> str | None:
        # spans of every label mention in the word-normalised answer (spaced form, and the joined
        # CamelCase form written as one token, e.g. "switchlighton")
        padded = f" {words} "
        spans: list[tuple[int, int, str]] = []
        tokens = words.split()
        offsets, pos = [], 1
        for t in tokens:
            offsets.append(pos)
            pos += len(t) + 1
        for lab in self.labels:
            needle = f" {self._words[lab]} "
            start = padded.find(needle)
            while start >= 0:
                spans.append((start, start + len(needle) - 1, lab))
                start = padded.find(needle, start + 1)
            joined = self._joined[lab]
            if " " in self._words[lab]:
                for t, off in zip(tokens, offsets, strict=True):
                    if t == joined:
                        spans.append((off, off + len(t), lab))
        if not spans:
            return None
        # drop mentions inside a longer one ("coffee" inside "iced coffee"), then take the earliest
        kept = [
            s
            for s in spans
            if not any(
                o is not s and o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0]) for o in spans
            )
        ]
        if len({s[2] for s in kept}) > self.max_mentions:
            return _AMBIGUOUS  # the answer lists the choices (e.g. echoes the instruction)
        kept.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        return kept[0][2]

    def _fuzzy(self, words: str) -> str | None:
        if not words:
            return None
        tokens = words.split()
        best: tuple[float, str] | None = None
        for lab in self.labels:
            lw = self._words[lab]
            n = len(lw.split())
            candidates = {words} | {" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))}
            candidates |= {c.replace(" ", "") for c in candidates}
            target = (lw, self._joined[lab])
            score = max(difflib.SequenceMatcher(None, c, t).ratio() for c in candidates for t in target)
            if best is None or score > best[0]:
                best = (score, lab)
        if best is not None and best[0] >= self.fuzzy_cutoff:
            return best[1]
        return None


def map_label(answer: str | None, labels: Sequence[str]) -> LabelMatch:
    """One-off :meth:`LabelMapper.map`."""
    return LabelMapper(labels).map(answer)
