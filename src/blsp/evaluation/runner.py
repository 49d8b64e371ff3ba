"""Run systems on tasks; write per-utterance outputs, ``results.json`` and ``results.md``.

Longer than 500 lines because one system on one task has a path per task kind (generation, cascade
transcripts, alignment with token KL, content loss, judged QA) sharing the row layout and resume
logic here; model calls are in model_calls.py, tables in markdown.py.

Layout of ``out_dir``::

    results.json                      all metrics + what was run (see :func:`run_eval`)
    results.md                        the same as Markdown tables
    outputs/<system>/<task>.jsonl     one row per utterance (resumable: done ids are skipped)
    outputs/<system>/transcripts@<testset>.jsonl   a cascade's ASR transcripts
    outputs/decoding.json             the decoding settings of those outputs (a resume must match)

The ``content`` task generates nothing: it scores the transcript teacher-forced after the clip's
own speech and after another clip's (:func:`content_rows`), to tell whether the model uses the speech.

Nothing an utterance does can stop the run: a clip that cannot be read, a generation that
raises, a judge that is down, even a system that cannot be loaded, are recorded and counted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blsp.evaluation import metrics, scoring, stats
from blsp.evaluation.labels import LabelMapper
from blsp.evaluation.markdown import results_to_markdown
from blsp.evaluation.model_calls import error_text, generate_safe, response_kl, response_nll
from blsp.evaluation.systems import System
from blsp.evaluation.tasks import Task
from blsp.utils.io import JsonlAppender, atomic_write_json, atomic_write_text, iter_jsonl, write_jsonl

log = logging.getLogger(__name__)

RESULTS_VERSION = 1


def safe_name(name: str) -> str:
    """A file-name-safe form of a system or task name."""
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", name).strip("_") or "x"


# ---------------------------------------------------------------------------------------------
# One system on one task


def _load_audios(items: Sequence[dict[str, Any]]) -> list[np.ndarray | Exception]:
    from blsp.data.audio import load_audio

    out: list[np.ndarray | Exception] = []
    for it in items:
        try:
            if "audio_array" in it:
                out.append(np.asarray(it["audio_array"], dtype=np.float32))
            else:
                out.append(load_audio(it["audio"]))
        except Exception as e:
            out.append(e)
    return out


class _TranscriptCache:
    """A cascade's transcripts of one test set, persisted so reruns do not transcribe again."""

    def __init__(self, system: System, path: Path) -> None:
        self.system = system
        self.path = path
        self.cache: dict[str, dict[str, Any]] = {}
        if path.exists():
            for _, obj, _ in iter_jsonl(path):
                if obj and "id" in obj:
                    self.cache[str(obj["id"])] = obj

    def get(self, items: Sequence[dict[str, Any]]) -> list[str | Exception]:
        todo = [i for i, it in enumerate(items) if str(it["id"]) not in self.cache]
        if todo:
            audios = _load_audios([items[i] for i in todo])  # only clips not transcribed before
            res = self.system.transcribe(
                [items[i] for i in todo], [None if isinstance(a, Exception) else a for a in audios]
            )
            assert res is not None
            rows = []
            for i, a, r in zip(todo, audios, res, strict=True):
                if isinstance(a, Exception):
                    r = a
                row = {"id": str(items[i]["id"])}
                row.update(
                    {"transcript": None, "error": error_text(r)}
                    if isinstance(r, Exception)
                    else {"transcript": r}
                )
                rows.append(row)
                self.cache[row["id"]] = row
            with JsonlAppender(self.path) as app:  # only successes persist: a failure is retried next run
                app.append([r for r in rows if r.get("transcript") is not None])
        out: list[str | Exception] = []
        for it in items:
            row = self.cache[str(it["id"])]
            out.append(
                row["transcript"]
                if row.get("transcript") is not None
                else RuntimeError(row.get("error", "ASR failed"))
            )
        return out


def _run_batch(
    system: System,
    task: Task,
    items: list[dict[str, Any]],
    transcripts: _TranscriptCache | None,
    mapper: LabelMapper | None,
    max_new_tokens: int,
    loop_guard: bool = True,
) -> list[dict[str, Any]]:
    speech = system.uses_audio and transcripts is None  # the speech itself goes to the model
    audios: list[Any] = _load_audios(items) if speech else [None] * len(items)
    trs: list[Any] = transcripts.get(items) if transcripts else [None] * len(items)
    convs: list[Any] = []
    for it, a, t in zip(items, audios, trs, strict=True):
        try:
            if isinstance(a, Exception):
                raise a
            if isinstance(t, Exception):
                raise t
            convs.append(system.conversation(task.instruction_for(it), it, a, t))
        except Exception as e:
            convs.append(e)
    model = system.model
    responses = generate_safe(model, convs, max_new_tokens, loop_guard)

    rows: list[dict[str, Any]] = []
    for it, r, t in zip(items, responses, trs, strict=True):
        row: dict[str, Any] = {"id": str(it["id"]), "ok": not isinstance(r, Exception)}
        row["response"] = None if isinstance(r, Exception) else r
        if isinstance(r, Exception):
            row["error"] = error_text(r)
        row["reference"] = task.reference(it)
        if transcripts is not None:
            row["transcript"] = None if isinstance(t, Exception) else t
        if task.kind == "qa":
            row["question"] = task.instruction_for(it)
        if mapper is not None and row["ok"]:
            m = mapper.map(row["response"])
            row["label"], row["how"] = m.label, m.how
        rows.append(row)

    if task.kind == "align":
        _align(system, task, items, convs, rows, max_new_tokens, loop_guard)
    return rows


def content_partners(items: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``content`` task's derangement: each transcribed item gets the next one's speech (rotation)."""
    usable = [it for it in items if isinstance(it.get("text"), str) and it["text"].strip()]
    if len(usable) < 2:
        return {}
    return {str(it["id"]): usable[(k + 1) % len(usable)] for k, it in enumerate(usable)}


def content_rows(
    system: System, task: Task, items: list[dict[str, Any]], partners: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Loss of each item's transcript (``task.instruction``: repetition) after its own speech
    (``matched_sum``) and after its partner's (``shuffled_sum``), both over ``tokens`` target tokens."""
    from blsp.models.prompt import make_conversation

    need = {str(it["id"]): it for it in items}
    need |= {str(p["id"]): p for p in (partners.get(i) for i in list(need)) if p is not None}
    audio = dict(zip(need, _load_audios(list(need.values())), strict=True))  # each clip read once
    rows: list[dict[str, Any]] = []
    pairs: list[tuple[int, list[dict[str, Any]]]] = []  # (row index, [matched, shuffled] examples)
    for it in items:
        iid = str(it["id"])
        row: dict[str, Any] = {"id": iid, "ok": False, "response": None, "reference": task.reference(it)}
        other = partners.get(iid)
        if other is None:
            row["error"] = "ValueError: no transcript"
        else:
            row["partner"] = str(other["id"])
            own, theirs = audio[iid], audio[row["partner"]]
            if isinstance(own, Exception):
                row["error"] = error_text(own)
            elif isinstance(theirs, Exception):
                row["error"] = "partner clip: " + error_text(theirs)
            else:
                target = it["text"]
                pairs.append(
                    (
                        len(rows),
                        [
                            {"conversation": make_conversation(task.instruction, audio=a), "response": target}
                            for a in (own, theirs)
                        ],
                    )
                )
        rows.append(row)
    if not pairs:
        return rows
    model = system.model
    per: list[Any]
    try:
        scores = response_nll(model, [ex for _, exs in pairs for ex in exs])
        per = [scores[2 * k : 2 * k + 2] for k in range(len(pairs))]
    except Exception as e:
        if len(pairs) == 1:
            per = [e]
        else:
            log.warning(
                "%s: content loss on a batch failed (%s); retrying one by one", system.name, error_text(e)
            )
            per = []
            for _, exs in pairs:
                try:
                    per.append(response_nll(model, exs))
                except Exception as e1:
                    per.append(e1)
    for (k, _), res in zip(pairs, per, strict=True):
        if isinstance(res, Exception):
            rows[k]["error"] = error_text(res)
            continue
        (m, n), (sh, n2) = res
        if n != n2:  # same target text: a tokenisation that depends on the speech is a bug
            rows[k]["error"] = f"RuntimeError: target token counts differ ({n} vs {n2})"
            continue
        rows[k].update(ok=True, matched_sum=m, shuffled_sum=sh, tokens=n)
    return rows


def _align(
    system: System, task: Task, items, convs, rows, max_new_tokens: int, loop_guard: bool = True
) -> None:
    """Behavior alignment: the text-path response to the same instruction, and the token KL."""
    from blsp.models.prompt import make_conversation

    model = system.model
    text_convs: list[Any] = []
    for it in items:
        text = it.get("text")
        text_convs.append(
            make_conversation(task.instruction_for(it), transcript=text)
            if isinstance(text, str) and text.strip()
            else ValueError("no transcript")
        )
    text_resp = generate_safe(model, text_convs, max_new_tokens, loop_guard)
    pairs = []
    for k, (row, tr) in enumerate(zip(rows, text_resp, strict=True)):
        row["text_response"] = None if isinstance(tr, Exception) else tr
        if row["ok"] and not isinstance(tr, Exception):
            pairs.append(k)
    if not getattr(model, "supports_logits", True):  # a served model: chrF only
        return
    for s in range(0, len(pairs), 4):  # logits are [2B, L, V]: keep B small
        chunk = pairs[s : s + 4]
        try:
            kls = response_kl(
                model,
                [convs[k] for k in chunk],
                [text_convs[k] for k in chunk],
                [text_resp[k] for k in chunk],
            )
        except Exception as e:
            log.warning("%s: KL on a batch failed (%s); retrying one by one", system.name, error_text(e))
            kls = []
            for k in chunk:
                try:
                    kls.append(response_kl(model, [convs[k]], [text_convs[k]], [text_resp[k]])[0])
                except Exception as e1:
                    rows[k]["kl_error"] = error_text(e1)
                    kls.append(None)
        for k, kv in zip(chunk, kls, strict=True):
            if kv is not None:
                rows[k]["kl_sum"], rows[k]["kl_tokens"] = kv


def _judge_rows(
    judge: Any, path: Path, rows: list[dict[str, Any]], items_by_id: dict[str, dict]
) -> str | None:
    """Judge QA rows into ``path`` (resumable). Returns a status line if the judge was unavailable."""
    from blsp.evaluation.judge import JudgeUnavailable

    status = getattr(judge, "unavailable", None)
    if status:  # found down earlier in this run: do not wait on it again for every system
        return status
    with JsonlAppender(path) as app:
        for row in rows:
            if row["id"] in app.done:
                continue
            if not row.get("ok"):
                app.append(
                    [{"id": row["id"], "judged": True, "verdict": False, "raw": "(no answer: system failed)"}]
                )
                continue
            it = items_by_id.get(row["id"], {})
            try:
                verdict, raw = judge.judge(
                    row.get("question") or "", it.get("text") or "", row.get("response") or ""
                )
            except JudgeUnavailable as e:
                status = f"judge unavailable: {e}"
                log.error("%s", status)
                with contextlib.suppress(AttributeError):
                    judge.unavailable = status
                break
            except Exception as e:  # one bad call: leave this row unjudged, keep going
                log.warning("judge failed on %s: %s", row["id"], error_text(e))
                continue
            app.append([{"id": row["id"], "judged": True, "verdict": verdict, "raw": raw}])
    return status


def _read_rows(path: Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    if path.exists():
        for _, obj, _ in iter_jsonl(path):
            if obj and "id" in obj:
                by_id[str(obj["id"])] = obj
    return [by_id[i] for i in ids if i in by_id]


def evaluate_system_task(
    system: System,
    task: Task,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    loop_guard: bool = True,
    judge: Any = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Run ``system`` on ``task`` (resuming ``outputs/<system>/<task>.jsonl``) and score it.

    Utterances already in the output file are not run again, failed ones included, unless
    ``retry_failed``.
    """
    out_dir = Path(out_dir)
    sys_dir = out_dir / "outputs" / safe_name(system.name)
    path = sys_dir / f"{safe_name(task.key)}.jsonl"
    mapper = LabelMapper(task.labels) if task.kind == "classify" and task.labels else None
    transcripts = (
        _TranscriptCache(system, sys_dir / f"transcripts@{safe_name(task.testset or 'items')}.jsonl")
        if system.kind == "cascade"
        else None
    )
    ids = [str(it["id"]) for it in task.items]
    t0 = time.perf_counter()
    if (system.kind == "text" or task.kind in ("align", "content")) and not any(
        it.get("text") for it in task.items
    ):
        # Text+LLM (and any speech/text comparison) needs transcripts this test set does not have
        return {"n": len(ids), "failed": 0, "status": "n/a: the test set has no transcripts"}
    partners: dict[str, dict[str, Any]] = {}
    if task.kind == "content":
        if system.kind != "blsp":  # the loss is on the speech path: only a speech adapter has one
            return {
                "n": len(ids),
                "failed": 0,
                "status": "n/a: only a speech adapter (blsp system) is scored",
            }
        partners = content_partners(task.items)
        if not partners:
            return {"n": len(ids), "failed": 0, "status": "n/a: needs at least two transcribed clips"}
        if path.exists():  # a row scored against another partner (a different --limit) is redone
            want = {i: str(p["id"]) for i, p in partners.items()}
            rows0 = [obj for _, obj, _ in iter_jsonl(path) if obj]
            kept = [o for o in rows0 if o.get("partner") == want.get(str(o.get("id")))]
            if len(kept) != len(rows0):
                write_jsonl(path, kept)
    if retry_failed and path.exists():  # drop failed rows so that they are run again
        kept = [obj for _, obj, _ in iter_jsonl(path) if obj and obj.get("ok")]
        write_jsonl(path, kept)
    with JsonlAppender(path) as app:
        todo = [it for it in task.items if str(it["id"]) not in app.done]
        for s in range(0, len(todo), batch_size):
            batch = todo[s : s + batch_size]
            try:
                if task.kind == "content":
                    rows = content_rows(system, task, batch, partners)
                else:
                    rows = _run_batch(system, task, batch, transcripts, mapper, max_new_tokens, loop_guard)
            except Exception as e:  # a bug or a model that cannot load: record every item as failed
                log.error("%s on %s: batch failed: %s", system.name, task.key, error_text(e))
                rows = [
                    {
                        "id": str(it["id"]),
                        "ok": False,
                        "response": None,
                        "error": error_text(e),
                        "reference": task.reference(it),
                    }
                    for it in batch
                ]
            app.append(rows)
    rows = _read_rows(path, ids)
    judge_status = None
    if task.kind == "qa":
        jpath = sys_dir / f"{safe_name(task.key)}.judge.jsonl"
        if judge is None:
            judge_status = "not judged: no judge given (--judge)"
        else:
            judge_status = _judge_rows(judge, jpath, rows, {str(it["id"]): it for it in task.items})
        verdicts = {r["id"]: r for r in _read_rows(jpath, ids)}
        for r in rows:
            if r["id"] in verdicts:
                r["judged"], r["verdict"] = True, verdicts[r["id"]].get("verdict")
        res = scoring.score(task, rows, judge_status=judge_status)
    else:
        res = scoring.score(task, rows)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["outputs"] = str(path.relative_to(out_dir))
    return res


# ---------------------------------------------------------------------------------------------
# Many systems on many tasks


DECODING_FILE = "decoding.json"


def check_decoding(outputs_dir: str | Path, decoding: dict[str, Any]) -> None:
    """Refuse to resume outputs made with other decoding settings; record the settings of new ones.

    A folder of outputs from before the record existed is resumed as it is, with a warning.
    """
    from blsp.errors import BlspError

    outputs_dir = Path(outputs_dir)
    path = outputs_dir / DECODING_FILE
    if path.is_file():
        import json

        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"{k}={old[k]!r} there, {v!r} here" for k, v in decoding.items() if k in old and old[k] != v]
        if diff:
            raise BlspError(
                f"{path}: these outputs were generated with other settings ({'; '.join(diff)}); "
                "resume them with the same settings, or write to another --out"
            )
        return
    if any(outputs_dir.glob("*/*.jsonl")):
        log.warning("%s: outputs of unrecorded decoding settings; resuming them as they are", outputs_dir)
        return
    outputs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, decoding)


def run_eval(
    systems: Sequence[System],
    tasks: Sequence[Task],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    loop_guard: bool = True,
    judge: Any = None,
    write: bool = True,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Evaluate every system on every task; write ``results.json`` and ``results.md`` in ``out_dir``.

    Returns ``{"version", "meta", "systems": [...], "tasks": [...], "results": {system: {task_key:
    metrics}}}``. Systems run one after another; a model is released once no later system needs it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        from blsp.errors import BlspError

        raise BlspError(f"duplicate task keys: {keys}")
    check_decoding(out_dir / "outputs", {"max_new_tokens": max_new_tokens, "loop_guard": loop_guard})
    langs = sorted({t.target_lang for t in tasks})
    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "meta": {
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "max_new_tokens": max_new_tokens,
            "loop_guard": loop_guard,
            "batch_size": batch_size,
            "judge": getattr(judge, "name", None),
            "normalizers": {
                lang: metrics.normalizer_info(lang)
                for lang in langs
                if any(t.kind == "asr" and t.target_lang == lang for t in tasks)
            },
            "bleu": {
                lang: metrics.bleu_signature(lang)
                for lang in langs
                if any(t.kind == "st" and t.target_lang == lang for t in tasks)
            },
        },
        "systems": [s.describe() for s in systems],
        "tasks": [t.describe() for t in tasks],
        "results": {},
    }
    for si, system in enumerate(systems):
        per: dict[str, Any] = {}
        results["results"][system.name] = per
        for task in tasks:
            log.info("evaluating %s on %s (%d items)", system.name, task.key, len(task.items))
            try:
                per[task.key] = evaluate_system_task(
                    system,
                    task,
                    out_dir,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    loop_guard=loop_guard,
                    judge=judge,
                    retry_failed=retry_failed,
                )
            except Exception as e:  # never lose the other systems' results
                log.exception("%s on %s failed", system.name, task.key)
                per[task.key] = {
                    "n": len(task.items),
                    "failed": len(task.items),
                    "status": f"error: {error_text(e)}",
                }
            if write:
                _write(results, out_dir)
        later = {id(s.model_handle) for s in systems[si + 1 :]}
        system.release()
        if id(system.model_handle) not in later:
            system.model_handle.release()
    if write:
        _write(results, out_dir)
    return results


def output_pairs(
    out_dir: str | Path, results: dict[str, Any], task_key: str, system: str, metric: str
) -> dict[str, tuple[float, float]]:
    """Per item id, the ``(numerator, denominator)`` of ``metric`` for ``system`` on ``task_key``,
    read from the per-utterance outputs of a ``blsp eval`` run (empty when it has none)."""
    task = next((t for t in results.get("tasks", []) if t.get("key") == task_key), None)
    res = results.get("results", {}).get(system, {}).get(task_key, {})
    if task is None or "outputs" not in res or metric not in scoring.RATIO_METRICS:
        return {}
    scored = Task(task["name"], task["kind"], None, target_lang=task.get("target_lang", "en"))
    rows = [obj for _, obj, _ in iter_jsonl(Path(out_dir) / res["outputs"]) if obj]
    return scoring.item_pairs(scored, rows, metric)


def paired_comparison(
    out_dir: str | Path,
    results: dict[str, Any],
    task_key: str,
    a: str,
    b: str,
    metric: str,
    kind: str = "difference",
) -> dict[str, Any]:
    """``metric`` of system ``a`` minus (``kind="ratio"``: over) system ``b`` on ``task_key``, on the
    items both answered, from the per-utterance outputs of a ``blsp eval`` run, with its paired 95 %
    bootstrap interval (:func:`blsp.evaluation.stats.paired_difference` and ``paired_ratio``)."""
    pa, pb = (output_pairs(out_dir, results, task_key, s, metric) for s in (a, b))
    if kind == "ratio":
        return stats.paired_ratio(pa, pb)
    return stats.paired_difference(pa, pb, scoring.RATIO_METRICS[metric])


def _write(results: dict[str, Any], out_dir: Path) -> None:
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", results_to_markdown(results))
