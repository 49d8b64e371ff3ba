"""Quality filters for generated behavior responses (BLSP step 1).

Every generated response gets a verdict: rejected (dropped from the output, kept in the
``.rejected.jsonl`` sidecar with its reason) or kept, possibly with flags.

- ``empty``: nothing left after stripping whitespace and punctuation; rejected.
- ``refusal``: "I'm sorry, but ...", "as an AI language model", ... (the patterns BLSP-Emo drops);
  rejected.
- ``echo``: the response only repeats the transcript (small LLMs often do that instead of
  continuing). Rejected by default for continuation: kept, it would turn continuation data into
  repetition data and silently change the repetition:continuation ratio that BLSP+RP sets on
  purpose (1:9). ``echo="flag"`` keeps it with an ``echo`` flag instead.
- ``echo_prefix``: the response starts by repeating the transcript, then adds new text; kept, flagged.
- ``truncated``: generation hit ``max_new_tokens`` before the end-of-turn token; kept, flagged (the
  response is cut at the limit, as in the paper's 64-token generation).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from difflib import SequenceMatcher

# Reasons a generated response is rejected / flags a kept response can carry.
EMPTY, REFUSAL, ECHO, ECHO_PREFIX, TRUNCATED = "empty", "refusal", "echo", "echo_prefix", "truncated"
# Reasons an input line is skipped before generation.
EMPTY_TRANSCRIPT, TOO_LONG = "empty_transcript", "too_long"

_REFUSAL_PATTERNS = [
    r"^\s*(i'?m|i am) sorry\b",
    r"\b(i'?m|i am) sorry,? but\b",
    r"\bi apologi[sz]e,? but\b",
    r"\bas an ai\b",
    r"\bas a (large )?language model\b",
    r"\b(i|we) (cannot|can'?t|am unable to|'?m unable to|am not able to|'?m not able to) "
    r"(help|assist|fulfill|comply|provide|continue|complete|generate|do that)\b",
    r"\bi'?m not sure what you\b",
    # assistant chatter instead of a continuation ("I'm ready to assist. What's your request?")
    r"\b(i'?m|i am) (ready|here|happy|glad) to (help|assist)\b",
    r"\bhow (can|may) i (help|assist)( you)?\b",
    r"\bwhat'?s your (request|question)\b",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in _REFUSAL_PATTERNS), re.IGNORECASE)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalize_words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (Unicode letters and digits kept)."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    text = "".join(ch if (ch.isalnum() or ch == "'") else " " for ch in text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def is_refusal(response: str) -> bool:
    """True for a refusal or an assistant disclaimer instead of an answer."""
    return bool(_REFUSAL.search(response.translate(_APOSTROPHES)))


@dataclass(frozen=True)
class EchoMatch:
    """How much of a response copies its transcript (word level, after normalisation)."""

    response_words: int
    transcript_words: int
    copied: int  # response words inside blocks matched to the transcript
    novel: int  # response words not matched
    prefix_copied: int  # transcript words that the response starts by repeating in order

    @property
    def is_echo(self) -> bool:
        """Only an echo: at most 20% new words and at least half of the transcript repeated."""
        if not self.response_words or not self.transcript_words:
            return False
        return self.novel <= 0.2 * self.response_words and self.copied >= 0.5 * self.transcript_words

    @property
    def is_echo_prefix(self) -> bool:
        """Starts by repeating (>= 80% of) the transcript, then goes on with new text."""
        if self.is_echo or not self.transcript_words:
            return False
        return self.prefix_copied >= 0.8 * self.transcript_words


def echo_match(response: str, transcript: str) -> EchoMatch:
    """Compare ``response`` with ``transcript`` word by word."""
    r, t = normalize_words(response), normalize_words(transcript)
    sm = SequenceMatcher(None, r, t, autojunk=False)
    blocks = [b for b in sm.get_matching_blocks() if b.size]
    copied = sum(b.size for b in blocks)
    # Leading repetition: matched blocks that start near the beginning of both sequences, in order.
    prefix = 0
    r_pos = t_pos = 0
    for b in blocks:
        if b.a - r_pos > 2 or b.b - t_pos > 2:  # allow a couple of inserted/dropped words
            break
        prefix += b.size
        r_pos, t_pos = b.a + b.size, b.b + b.size
    return EchoMatch(len(r), len(t), copied, len(r) - copied, prefix)


@dataclass
class Verdict:
    """Outcome of the filters for one response: ``reject`` is a reason or None; ``flags`` are kept."""

    reject: str | None = None
    flags: list[str] = field(default_factory=list)


def judge(response: str, transcript: str, *, truncated: bool = False, echo: str = "drop") -> Verdict:
    """Apply the quality filters to a generated response.

    Args:
        response: the generated text (already stripped).
        transcript: the input transcript the LLM was asked about.
        truncated: generation stopped at ``max_new_tokens`` instead of the end-of-turn token.
        echo: ``drop`` (reject echoes) or ``flag`` (keep them, flagged).
    """
    if echo not in ("drop", "flag"):
        raise ValueError(f"echo must be 'drop' or 'flag', not {echo!r}")
    if not normalize_words(response):
        return Verdict(EMPTY)
    if is_refusal(response):
        return Verdict(REFUSAL)
    flags: list[str] = []
    m = echo_match(response, transcript)
    if m.is_echo:
        if echo == "drop":
            return Verdict(ECHO)
        flags.append(ECHO)
    elif m.is_echo_prefix:
        flags.append(ECHO_PREFIX)
    if truncated:
        flags.append(TRUNCATED)
    return Verdict(None, flags)
