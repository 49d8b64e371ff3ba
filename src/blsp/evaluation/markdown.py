"""``results.md``: the evaluation results as Markdown (an overview table and one detail table per task)."""

from __future__ import annotations

from typing import Any

from blsp.evaluation import scoring, stats
from blsp.evaluation.tasks import GENERATION_KINDS, PRIMARY


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(key: str, res: dict[str, Any], digits: int) -> str:
    """A detail-table cell; distinct answers read ``distinct / items``, the speech flag in words."""
    if key == "distinct_answers" and res.get(key) is not None:
        return f"{res[key]}/{res.get('n')}"
    if key == "uses_speech":
        return scoring.speech_verdict(res)
    return stats.with_ci(_fmt(res.get(key), digits), res, key, digits)


def primary_cell(kind: str, res: dict[str, Any]) -> str:
    """The overview-table cell of one result (``ASR component / via LLM`` for cascades' WER)."""
    if res.get("status", "").startswith("error"):
        return "error"
    if res.get("status", "").startswith("n/a"):
        return "n/a"
    key = PRIMARY[kind][0]
    digits = 3 if kind == "content" else 1
    cell = stats.with_ci(_fmt(res.get(key), digits), res, key, digits)
    if kind == "content" and res.get("uses_speech") is False:
        cell += " (does not use the speech)"
    if kind == "asr" and "asr_component" in res:
        cell = f"{_fmt(res['asr_component'])} / {cell}"
    if kind == "qa" and res.get("accept_rate") is None and res.get("status"):
        cell = "judge n/a"
    if res.get("failed"):
        cell += f" ({res['failed']} failed)"
    return cell


def results_to_markdown(results: dict[str, Any]) -> str:
    """Markdown: an overview table (systems x tasks, primary metric) and one detail table per task."""
    tasks = results.get("tasks", [])
    systems = [s["name"] for s in results.get("systems", [])]
    res = results.get("results", {})
    lines = ["# Evaluation results", ""]
    meta = results.get("meta", {})
    if meta:
        lines.append(
            f"Created {meta.get('created', '?')}; greedy decoding"
            f"{' with the loop guard' if meta.get('loop_guard') else ''}, max_new_tokens={meta.get('max_new_tokens')}."
        )
        lines.append("")
    head = ["System"] + [
        f"{t['key']} {PRIMARY[t['kind']][1]}{'↑' if PRIMARY[t['kind']][2] else '↓'}" for t in tasks
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in systems:
        cells = [s] + [primary_cell(t["kind"], res.get(s, {}).get(t["key"], {})) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if any(t["kind"] == "asr" for t in tasks):
        lines.append(
            "ASR cells of cascaded systems read `standalone ASR / LLM told to repeat it` (paper Table 2)."
        )
        lines.append("")

    details = {
        "asr": [("score", "WER/CER"), ("asr_component", "ASR alone"), ("failed", "failed"), ("n", "n")],
        "st": [
            ("bleu", "BLEU"),
            ("chrf", "chrF"),
            ("bleu_tokenizer", "tok"),
            ("failed", "failed"),
            ("n", "n"),
        ],
        "classify": [
            ("accuracy", "Acc %"),
            ("out_of_set_rate", "out of set %"),
            ("failed", "failed"),
            ("n", "n"),
        ],
        "qa": [
            ("accept_rate", "accept %"),
            ("judged", "judged"),
            ("unparsed_verdicts", "unparsed"),
            ("failed", "failed"),
            ("n", "n"),
        ],
        "align": [
            ("bleu", "BLEU s/t"),
            ("chrf", "chrF s/t"),
            ("exact_match", "exact %"),
            ("kl", "token KL"),
            ("failed", "failed"),
            ("n", "n"),
        ],
        "content": [
            ("matched", "matched nats/tok"),
            ("shuffled", "shuffled nats/tok"),
            ("gap", "gap"),
            ("uses_speech", "speech"),
            ("tokens", "tokens"),
            ("failed", "failed"),
            ("n", "n"),
        ],
    }
    for kind in GENERATION_KINDS:  # distinct answers sit before the failure counts
        details[kind].insert(-2, ("distinct_answers", "distinct"))
    for t in tasks:
        cols = details[t["kind"]]
        lines.append(f"## {t['key']}")
        lines.append("")
        instr = t.get("instruction", "")
        lines.append(f"Instruction: _{instr}_")
        lines.append("")
        lines += [
            "| System | " + " | ".join(c[1] for c in cols) + " | status |",
            "|" + "---|" * (len(cols) + 2),
        ]
        for s in systems:
            r = res.get(s, {}).get(t["key"], {})
            digits = 3 if t["kind"] in ("align", "content") else 1
            cells = [_cell(k, r, 4 if k == "kl" else digits) for k, _ in cols]
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {r.get('status', 'ok')} |")
        lines.append("")
    notes = []
    for lang, info in meta.get("normalizers", {}).items():
        notes.append(f"- ASR ({lang}): jiwer after {info}; CER for Chinese-like languages.")
    for lang, sig in meta.get("bleu", {}).items():
        notes.append(f"- BLEU into {lang}: sacrebleu `{sig}`; chrF with sacrebleu defaults.")
    if any(t["kind"] == "classify" for t in tasks):
        notes.append(
            "- Classification: free text mapped to the label set (exact, case/CamelCase-insensitive, "
            "contained, fuzzy); accuracy counts failed utterances as wrong; out-of-set % is over answered ones."
        )
    if any(t["kind"] == "align" for t in tasks):
        notes.append(
            "- Alignment: the speech-path response scored against the transcript-path response; token KL is "
            "KL(text || speech) of the LLM's next-token distributions, teacher-forced on the transcript-path response."
        )
    if any(t["kind"] == "content" for t in tasks):
        notes.append(
            "- Content: teacher-forced loss (nats per target token) of each clip's transcript under the "
            "repetition instruction, after the clip's own speech (matched) and after another clip's "
            "(shuffled: each clip gets the next one's); gap = shuffled − matched. A gap under "
            f"{scoring.SPEECH_GAP_NATS:g} nats: the model does not use the speech."
        )
    if any(t["kind"] in GENERATION_KINDS for t in tasks):
        notes.append(
            "- distinct: distinct answers after text normalisation / items; a model that ignores its "
            "input gives the same few answers to every item."
        )
    if meta.get("judge"):
        notes.append(f"- QA judge: {meta['judge']} with the paper's Listing 2 prompt.")
    notes.append(
        "- `(N failed)`: utterances the system could not answer (scored as wrong/empty, never skipped)."
    )
    lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)
