"""Corpus metrics of the paper's evaluations, computed with maintained libraries.

- ASR: WER with ``jiwer`` after Whisper's text normaliser from ``transformers``
  (``EnglishTextNormalizer`` for English, ``BasicTextNormalizer`` otherwise); CER for languages
  written without spaces (Chinese, Japanese, Thai).
- ST: BLEU with ``sacrebleu`` (tokenizer ``13a``, ``zh`` for Chinese targets) and chrF.
- Classification: accuracy after mapping free text to the label set (:mod:`blsp.evaluation.labels`)
  and the rate of answers outside the set.
- Any generation: the number of distinct answers after normalisation (input-independent answers).
- Representations: average cosine tables of the paper's Tables 7/8 and 12/13, and the paired
  cosine less the unpaired one (a speech representation that ignores the clip scores about 0).

All scores are percentages (0-100) except cosines and KL; an empty corpus gives ``None``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Languages scored by character error rate / BLEU tokenizers for targets without spaces.
CHAR_LANGS = frozenset({"zh", "ja", "th", "yue", "lo", "my", "km"})
_BLEU_TOKENIZERS = {
    "zh": "zh",
    "yue": "zh",
    "ja": "char",
    "th": "char",
    "lo": "char",
    "my": "char",
    "km": "char",
}


def bleu_tokenizer(lang: str | None) -> str:
    """SacreBLEU tokenizer for a target language code: ``zh`` for Chinese, ``13a`` for de/fr/en/..."""
    return _BLEU_TOKENIZERS.get((lang or "en").split("-")[0].lower(), "13a")


# ---------------------------------------------------------------------------------------------
# Text normalisation (Whisper's, from transformers; never rewritten here)


@cache
def english_spelling_map() -> tuple[dict[str, str], str]:
    """Whisper's British->American spelling map and where it came from ("none" if not found).

    The one lookup of :mod:`blsp.data.normalize` (``$BLSP_WHISPER_SPELLING``, then the
    ``whisper_normalizer`` package that ``make install`` installs, then ``openai-whisper``), so
    data import and evaluation normalise alike.
    """
    from blsp.data.normalize import english_spelling_mapping, find_spelling_file

    path = find_spelling_file()
    return english_spelling_mapping(), str(path) if path else "none"


def text_normalizer(lang: str | None = "en") -> Any:
    """Whisper's normaliser for ``lang``: ``EnglishTextNormalizer`` for English, else ``BasicTextNormalizer``."""
    from blsp.data.normalize import whisper_basic_normalizer, whisper_english_normalizer

    code = (lang or "en").split("-")[0].lower()
    return whisper_english_normalizer() if code == "en" else whisper_basic_normalizer()


def normalize(text: str, lang: str | None = "en") -> str:
    """Normalise ``text`` as Whisper's evaluation does, with whitespace collapsed."""
    return " ".join(text_normalizer(lang)(text or "").split())


def normalizer_info(lang: str | None = "en") -> str:
    """A short description of the normaliser used for ``lang`` (for result metadata)."""
    code = (lang or "en").split("-")[0].lower()
    if code == "en":
        m, src = english_spelling_map()
        return f"transformers EnglishTextNormalizer (spelling map: {len(m)} entries from {src})"
    return "transformers BasicTextNormalizer"


def distinct_count(texts: Sequence[str], lang: str | None = "en") -> int:
    """Number of distinct ``texts`` after :func:`normalize` (an empty answer counts as one)."""
    return len({normalize(t or "", lang) for t in texts})


# ---------------------------------------------------------------------------------------------
# ASR


def _scoring_pair(ref: str, hyp: str | None, code: str) -> tuple[str, str]:
    """Normalised reference and hypothesis; characters become the units of Chinese-like languages."""
    rn, hn = normalize(ref, code), normalize(hyp or "", code)
    if code in CHAR_LANGS:
        rn, hn = " ".join(rn.replace(" ", "")), " ".join(hn.replace(" ", ""))
    return rn, hn


def error_rate(refs: Sequence[str], hyps: Sequence[str], lang: str | None = "en") -> dict[str, Any]:
    """WER (or CER for Chinese-like languages) in percent after Whisper normalisation.

    Returns ``{"metric": "wer"|"cer", "score", "substitutions", "deletions", "insertions", "hits",
    "ref_units", "n", "skipped_empty_refs"}``. References that normalise to nothing are skipped
    and counted; an empty hypothesis counts as all deletions.
    """
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    code = (lang or "en").split("-")[0].lower()
    char = code in CHAR_LANGS
    r_norm, h_norm, skipped = [], [], 0
    for r, h in zip(refs, hyps, strict=True):
        rn, hn = _scoring_pair(r, h, code)
        if not rn:
            skipped += 1
            continue
        r_norm.append(rn)
        h_norm.append(hn)
    out: dict[str, Any] = {
        "metric": "cer" if char else "wer",
        "n": len(r_norm),
        "skipped_empty_refs": skipped,
    }
    if not r_norm:
        return out | {"score": None}
    o = jiwer.process_words(r_norm, h_norm)
    ref_units = o.hits + o.substitutions + o.deletions
    return out | {
        "score": 100.0 * (o.substitutions + o.deletions + o.insertions) / ref_units,
        "substitutions": o.substitutions,
        "deletions": o.deletions,
        "insertions": o.insertions,
        "hits": o.hits,
        "ref_units": ref_units,
    }


def item_errors(
    refs: Sequence[str], hyps: Sequence[str], lang: str | None = "en"
) -> list[tuple[int, int] | None]:
    """Per item ``(errors, reference units)`` after the normalisation of :func:`error_rate` (None for
    a reference that normalises to nothing); their sums give :func:`error_rate`'s corpus score."""
    import jiwer

    code = (lang or "en").split("-")[0].lower()
    out: list[tuple[int, int] | None] = []
    for r, h in zip(refs, hyps, strict=True):
        rn, hn = _scoring_pair(r, h, code)
        if not rn:
            out.append(None)
            continue
        o = jiwer.process_words(rn, hn)
        out.append((o.substitutions + o.deletions + o.insertions, o.hits + o.substitutions + o.deletions))
    return out


def wer(refs: Sequence[str], hyps: Sequence[str], lang: str | None = "en") -> float | None:
    """Corpus WER/CER in percent (see :func:`error_rate`)."""
    return error_rate(refs, hyps, lang)["score"]


# ---------------------------------------------------------------------------------------------
# Translation / text similarity


def bleu(hyps: Sequence[str], refs: Sequence[str], target_lang: str | None = "en") -> float | None:
    """Corpus SacreBLEU with the tokenizer fitting ``target_lang`` (13a, or zh for Chinese)."""
    from sacrebleu.metrics import BLEU

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not hyps:
        return None
    return float(BLEU(tokenize=bleu_tokenizer(target_lang)).corpus_score(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float | None:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2)."""
    from sacrebleu.metrics import CHRF

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not hyps:
        return None
    return float(CHRF().corpus_score(list(hyps), [list(refs)]).score)


def bleu_signature(target_lang: str | None = "en") -> str:
    """SacreBLEU's signature string for the BLEU configuration used for ``target_lang``."""
    from sacrebleu.metrics import BLEU

    b = BLEU(tokenize=bleu_tokenizer(target_lang))
    b.corpus_score(["x"], [["x"]])  # the signature needs the reference count, known after a call
    return str(b.get_signature())


# ---------------------------------------------------------------------------------------------
# Classification


def accuracy(predicted: Sequence[str | None], gold: Sequence[str]) -> dict[str, Any]:
    """Accuracy and out-of-set rate (percent); ``predicted[i] is None`` means outside the label set."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions but {len(gold)} gold labels")
    n = len(gold)
    if not n:
        return {"accuracy": None, "out_of_set_rate": None, "n": 0}
    correct = sum(p is not None and p == g for p, g in zip(predicted, gold, strict=True))
    oos = sum(p is None for p in predicted)
    return {"accuracy": 100.0 * correct / n, "out_of_set_rate": 100.0 * oos / n, "n": n}


# ---------------------------------------------------------------------------------------------
# Representation similarity (paper Tables 7/8, 12/13)


def unit_vectors(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` (last axis) scaled to length 1, in float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a[i], b[i]) for two ``[N, D]`` arrays."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    return float(np.mean(np.sum(unit_vectors(a) * unit_vectors(b), axis=-1)))


def cross_instruction_table(reps: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Tables 7/12: average cosine between the same inputs' representations under two instructions.

    ``reps[key]`` is ``[N, D]`` with row ``i`` the same input under every key.
    """
    keys = list(reps)
    return {a: {b: paired_cosine(reps[a], reps[b]) for b in keys} for a in keys}


def paired_modality_table(
    speech: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Tables 8/13: per instruction, the average cosine between paired speech and text inputs."""
    return {k: paired_cosine(speech[k], text[k]) for k in speech if k in text}


def unpaired_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean of cos(a[i], b[j]) over all ``i != j`` of two ``[N, D]`` arrays (None below two rows)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n < 2:
        return None
    sims = unit_vectors(a) @ unit_vectors(b).T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def unpaired_modality_table(
    speech: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray]
) -> dict[str, float | None]:
    """Per instruction, the average cosine between speech ``i`` and the transcript of another ``j``."""
    return {k: unpaired_cosine(speech[k], text[k]) for k in speech if k in text}


def corrected_modality_table(
    speech: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray]
) -> dict[str, float | None]:
    """Paired cosine minus unpaired cosine per instruction: how much closer a clip is to its own
    transcript than to the others' (about 0 for a speech vector that is the same for every clip)."""
    paired, unpaired = paired_modality_table(speech, text), unpaired_modality_table(speech, text)
    return {k: None if unpaired[k] is None else paired[k] - unpaired[k] for k in paired}
