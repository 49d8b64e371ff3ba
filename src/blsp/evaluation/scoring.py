"""Turn per-utterance output rows of one system on one task into the task's metrics.

A row is what :mod:`blsp.evaluation.runner` writes per utterance: ``id``, ``ok`` (the system
answered), ``response``, ``error``, ``reference`` and task-specific fields (``transcript`` for
cascades, ``label``/``how`` for classification, ``text_response``/``kl_sum``/``kl_tokens`` for
behavior alignment, ``verdict`` for QA, ``matched_sum``/``shuffled_sum``/``tokens`` for content). A
failed row is scored as a wrong/empty answer and counted in ``failed``; it never stops scoring.

Each metric carries a 95 % bootstrap interval over items in ``ci`` (:mod:`blsp.evaluation.stats`);
:func:`item_pairs` gives the per-item terms that paired comparisons of two systems resample.

Every generation task also counts its distinct answers (``distinct_answers``): a model that ignores
its input gives the same few answers to every item, whatever the task's own metric says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from blsp.evaluation import metrics, stats
from blsp.evaluation.tasks import GENERATION_KINDS, Task

#: A content gap (shuffled - matched loss, nats per target token) below this: the model does not use the speech.
SPEECH_GAP_NATS = 0.1


def _base(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    failed = [r for r in rows if not r.get("ok")]
    errors = Counter(str(r.get("error") or "unknown").split(":", 1)[0] for r in failed)
    out: dict[str, Any] = {"n": len(rows), "failed": len(failed)}
    if errors:
        out["failure_kinds"] = dict(errors.most_common(5))
    return out


def _hyp(r: dict[str, Any]) -> str:
    return (r.get("response") or "") if r.get("ok") else ""


def item_pairs(task: Task, rows: Sequence[dict[str, Any]], metric: str) -> dict[str, tuple[float, float]]:
    """Per item id, the ``(numerator, denominator)`` whose sums over items give ``metric`` (before its
    percent scale; see :data:`RATIO_METRICS`); items that do not count for the metric are left out."""
    out: dict[str, tuple[float, float]] = {}
    if metric in ("score", "wer", "cer"):
        rows = [r for r in rows if r.get("reference")]
        errs = metrics.item_errors([r["reference"] for r in rows], [_hyp(r) for r in rows], task.target_lang)
        return {str(r["id"]): e for r, e in zip(rows, errs, strict=True) if e is not None}
    for r in rows:
        key = str(r.get("id"))
        if metric == "accuracy" and r.get("reference") is not None:
            out[key] = (
                float(bool(r.get("ok")) and r.get("label") is not None and r.get("label") == r["reference"]),
                1.0,
            )
        elif metric == "out_of_set_rate" and r.get("reference") is not None and r.get("ok"):
            out[key] = (float(r.get("label") is None), 1.0)
        elif metric == "accept_rate" and r.get("judged"):
            out[key] = (float(r.get("verdict") is True), 1.0)
        elif metric == "kl" and r.get("kl_tokens"):
            out[key] = (float(r["kl_sum"]), float(r["kl_tokens"]))
        elif metric in ("gap", "matched", "shuffled") and r.get("ok") and r.get("tokens"):
            num = {
                "gap": float(r["shuffled_sum"]) - float(r["matched_sum"]),
                "matched": float(r["matched_sum"]),
                "shuffled": float(r["shuffled_sum"]),
            }[metric]
            out[key] = (num, float(r["tokens"]))
    return out


#: Metrics that are ratios of per-item sums, and their scale (percent or not).
RATIO_METRICS: dict[str, float] = {
    "score": 100.0,
    "wer": 100.0,
    "cer": 100.0,
    "accuracy": 100.0,
    "out_of_set_rate": 100.0,
    "accept_rate": 100.0,
    "kl": 1.0,
    "gap": 1.0,
    "matched": 1.0,
    "shuffled": 1.0,
}


def _ratio_cis(
    task: Task, rows: Sequence[dict[str, Any]], names: Sequence[str]
) -> dict[str, list[float] | None]:
    return {m: stats.ratio_ci(list(item_pairs(task, rows, m).values()), RATIO_METRICS[m]) for m in names}


def _text_cis(hyps: Sequence[str], refs: Sequence[str], lang: str | None) -> dict[str, list[float] | None]:
    def on(fn: Any) -> Any:
        return lambda idx: fn([hyps[i] for i in idx], [refs[i] for i in idx])

    return {
        "bleu": stats.corpus_ci(len(hyps), on(lambda h, r: metrics.bleu(h, r, lang))),
        "chrf": stats.corpus_ci(len(hyps), on(metrics.chrf)),
    }


def score_asr(task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = _base(rows)
    rows = [r for r in rows if r.get("reference")]
    out["no_reference"] = out["n"] - len(rows)
    er = metrics.error_rate([r["reference"] for r in rows], [_hyp(r) for r in rows], task.target_lang)
    out["metric"] = er["metric"]
    out["score"] = er["score"]
    out[er["metric"]] = er["score"]
    ci = _ratio_cis(task, rows, ["score"])["score"]
    out["ci"] = {"score": ci, er["metric"]: ci}
    out["details"] = {k: v for k, v in er.items() if k not in ("metric", "score")}
    with_tr = [r for r in rows if "transcript" in r]
    if with_tr:  # a cascade's standalone ASR component (the left number of paper Table 2)
        tr = metrics.error_rate(
            [r["reference"] for r in with_tr], [r.get("transcript") or "" for r in with_tr], task.target_lang
        )
        out["asr_component"] = tr["score"]
    return out


def score_st(task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = _base(rows)
    rows = [r for r in rows if r.get("reference")]
    out["no_reference"] = out["n"] - len(rows)
    hyps, refs = [_hyp(r) for r in rows], [r["reference"] for r in rows]
    out["bleu"] = metrics.bleu(hyps, refs, task.target_lang)
    out["chrf"] = metrics.chrf(hyps, refs)
    out["bleu_tokenizer"] = metrics.bleu_tokenizer(task.target_lang)
    out["ci"] = _text_cis(hyps, refs, task.target_lang)
    return out


def score_classify(task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over all rows (failed = wrong); out-of-set rate over the rows that were answered."""
    out = _base(rows)
    rows = [r for r in rows if r.get("reference") is not None]
    out["no_reference"] = out["n"] - len(rows)
    answered = [r for r in rows if r.get("ok")]
    correct = sum(1 for r in answered if r.get("label") is not None and r.get("label") == r["reference"])
    oos = sum(1 for r in answered if r.get("label") is None)
    out["accuracy"] = 100.0 * correct / len(rows) if rows else None
    out["out_of_set_rate"] = 100.0 * oos / len(answered) if answered else None
    out["mapped_by"] = dict(Counter(str(r.get("how")) for r in answered))
    out["ci"] = _ratio_cis(task, rows, ["accuracy", "out_of_set_rate"])
    return out


def score_qa(task: Task, rows: Sequence[dict[str, Any]], judge_status: str | None = None) -> dict[str, Any]:
    """Accept rate over the rows with a verdict; a failed answer is unacceptable; a judge that is
    down leaves rows unjudged (``status`` says so) instead of scoring them 0."""
    out = _base(rows)
    judged = [r for r in rows if r.get("judged")]
    accepted = sum(1 for r in judged if r.get("verdict") is True)
    out["judged"] = len(judged)
    out["unjudged"] = out["n"] - len(judged)
    out["unparsed_verdicts"] = sum(1 for r in judged if r.get("verdict") is None)
    out["accept_rate"] = 100.0 * accepted / len(judged) if judged else None
    out["ci"] = _ratio_cis(task, rows, ["accept_rate"])
    if judge_status:
        out["status"] = judge_status
    return out


def score_align(task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Speech-path vs text-path responses: BLEU/chrF (text path as reference), exact-match rate and
    the mean token KL(text || speech) teacher-forced on the text-path response."""
    out = _base(rows)
    both = [r for r in rows if r.get("text_response") is not None]
    hyps, refs = [_hyp(r) for r in both], [r["text_response"] for r in both]
    out["bleu"] = metrics.bleu(hyps, refs, "en")
    out["chrf"] = metrics.chrf(hyps, refs)
    out["exact_match"] = (
        100.0 * sum(h.strip() == t.strip() for h, t in zip(hyps, refs, strict=True)) / len(both)
        if both
        else None
    )
    kl_rows = [r for r in rows if r.get("kl_tokens")]
    tokens = sum(int(r["kl_tokens"]) for r in kl_rows)
    out["kl"] = sum(float(r["kl_sum"]) for r in kl_rows) / tokens if tokens else None
    out["kl_tokens"] = tokens
    out["ci"] = _text_cis(hyps, refs, "en") | _ratio_cis(task, rows, ["kl"])
    return out


def score_content(task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Teacher-forced loss of the transcript after the clip's own speech (``matched``) and after
    another clip's (``shuffled``), in nats per target token over the scored rows; ``gap`` =
    shuffled - matched and ``uses_speech`` = gap >= :data:`SPEECH_GAP_NATS`."""
    out = _base(rows)
    ok = [r for r in rows if r.get("ok") and r.get("tokens")]
    tokens = sum(int(r["tokens"]) for r in ok)
    out["tokens"] = tokens
    out["matched"] = sum(float(r["matched_sum"]) for r in ok) / tokens if tokens else None
    out["shuffled"] = sum(float(r["shuffled_sum"]) for r in ok) / tokens if tokens else None
    out["gap"] = out["shuffled"] - out["matched"] if tokens else None
    out["uses_speech"] = None if out["gap"] is None else out["gap"] >= SPEECH_GAP_NATS
    out["ci"] = _ratio_cis(task, rows, ["gap", "matched", "shuffled"])
    return out


def speech_verdict(res: dict[str, Any]) -> str:
    """What a content result says in words: uses the speech, does not, or not measured."""
    flag = res.get("uses_speech")
    if flag is None:
        return "–"
    if flag:
        return f"uses the speech (gap >= {SPEECH_GAP_NATS:g} nats)"
    return f"does not use the speech (gap < {SPEECH_GAP_NATS:g} nats)"


def distinct_answers(task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Distinct normalised answers among the answered rows, and that count over all rows."""
    answers = [r.get("response") or "" for r in rows if r.get("ok")]
    k = metrics.distinct_count(answers, task.target_lang)
    return {"distinct_answers": k, "distinct_ratio": k / len(rows) if rows else None}


def score(task: Task, rows: Sequence[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """Metrics of ``task`` from its per-utterance rows."""
    fn = {
        "asr": score_asr,
        "st": score_st,
        "classify": score_classify,
        "qa": score_qa,
        "align": score_align,
        "content": score_content,
    }[task.kind]
    out = fn(task, rows, **kw)
    if task.kind in GENERATION_KINDS:
        out.update(distinct_answers(task, rows))
    return out
