"""``DIR/report.md``: tables, plots, the machine and the paper's findings checked on the run's outputs.

Longer than 500 lines because the report is one document: each section (evaluation, speech use,
representations, findings) is a function here reading the same run folder.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blsp.demo.presets import (
    DEFAULT_ENCODER,
    DEFAULT_LLM,
    RECIPES,
    SYSTEMS,
    TESTSETS,
    USES_SPEECH_NATS,
    WARM,
)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        import torch

        tv, threads = torch.__version__, torch.get_num_threads()
    except Exception:  # noqa: BLE001 - the report still gets written
        tv, threads = "unavailable", None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gb": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": tv,
        "torch_threads": threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def load_json_or_none(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _f(v: Any, d: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{d}f}"
    return str(v)


def _fci(res: dict[str, Any], metric: str, d: int = 2) -> str:
    """A metric and its 95 % interval (when the result has one)."""
    from blsp.evaluation import stats

    return stats.with_ci(_f(res.get(metric), d), res, metric, d)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _count_lines(path: Path) -> int | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def _res(results: dict[str, Any] | None, system: str, task: str) -> dict[str, Any]:
    if not results:
        return {}
    return (results.get("results", {}).get(system) or {}).get(task) or {}


def _task_keys(results: dict[str, Any] | None) -> dict[str, str]:
    """kind-ish name (asr, intent, sentiment, align) -> task key in results.json."""
    out: dict[str, str] = {}
    for t in (results or {}).get("tasks", []):
        key = t.get("key", "")
        out.setdefault(key.split("@")[0].split(":")[0], key)
    return out


def write_report(out: Path) -> Path:
    """Write ``out/report.md`` from ``steps.json`` and the steps' JSON outputs; returns its path."""
    from blsp.utils.io import atomic_write_text

    rec = load_json_or_none(out / "steps.json") or {}
    steps = rec.get("steps", {})
    p = rec.get("params", {})
    m = rec.get("machine") or machine_info()
    results = load_json_or_none(out / "eval" / "results.json")
    reprs = {
        n: load_json_or_none(out / "repr" / f"representations_{n}.json") for n in ("asr_pretrain", "blsp")
    }
    summaries = {n: load_json_or_none(out / "runs" / n / "summary.json") for n in RECIPES}
    L: list[str] = ["# BLSP demo report", ""]
    L.append(
        f"Preset `{rec.get('preset', '?')}`, encoder `{(rec.get('models') or {}).get('encoder', DEFAULT_ENCODER)}`, "
        f"LLM `{(rec.get('models') or {}).get('llm', DEFAULT_LLM)}`, CPU only. Every number below is read from the outputs of this run "
        "(files named in each section); a step that failed is reported as failed."
    )
    L.append("")

    L += ["## Machine", ""]
    L += _table(
        ["CPU", "cores", "memory GB", "OS", "Python", "torch", "torch threads", "load average at start"],
        [
            [
                m.get("cpu"),
                m.get("cores"),
                _f(m.get("memory_gb"), 1),
                m.get("os"),
                m.get("python"),
                m.get("torch"),
                m.get("torch_threads"),
                " / ".join(f"{x:.2f}" for x in m.get("load_average") or []),
            ]
        ],
    )
    L += ["Preset parameters: " + ", ".join(f"{k}={v}" for k, v in p.items()), ""]

    L += ["## Steps", "", "Source: `steps.json`. Rerun one step with `blsp demo --out DIR --force STEP`.", ""]
    rows = []
    for name, s in steps.items():
        rows.append(
            [
                name,
                s.get("status", "?") + (" (done earlier)" if s.get("skipped_on_rerun") else ""),
                _f(s.get("wall_s"), 1),
                s.get("title", ""),
            ]
        )
    L += _table(["step", "status", "wall s", "what"], rows)
    if rec.get("total_wall_s") is not None:
        L += [f"Total wall time of the last invocation: {_f(rec['total_wall_s'], 1)} s.", ""]
    L += ["Exact commands (run from the directory the demo was started in):", ""]
    for name, s in steps.items():
        L += [f"- `{name}`:", "", "  ```", f"  {s.get('command', '')}", "  ```"]
        if s.get("status") == "failed":
            L += [
                "",
                f"  **Failed** (return code {s.get('returncode')}); last lines of `{s.get('log')}`:",
                "",
                "  ```",
                *("  " + ln for ln in (s.get("log_tail") or "").splitlines()),
                "  ```",
            ]
        elif s.get("status") == "blocked":
            L += ["", f"  **Not run**: {s.get('reason')}."]
    L.append("")

    L += ["## Data", ""]
    data = out / "data"
    counts = [
        ("training utterances (data/speech/train.jsonl)", _count_lines(data / "speech" / "train.jsonl")),
        (
            "continuation behaviors (data/behaviors/continuation.jsonl)",
            _count_lines(data / "behaviors" / "continuation.jsonl"),
        ),
        ("rejected continuations", _count_lines(data / "behaviors" / "continuation.rejected.jsonl")),
        ("repetition lines", _count_lines(data / "behaviors" / "repetition.jsonl")),
        ("BLSP+RP mix lines", _count_lines(data / "behaviors" / "mix_rp.jsonl")),
    ] + [(f"test set {t}", _count_lines(out / "testsets" / t / "test.jsonl")) for t in TESTSETS]
    L += _table(["what", "lines"], [[a, _f(b)] for a, b in counts])

    L += ["## Training", "", "Source: `runs/<recipe>/summary.json`.", ""]
    rows = []
    for n, s in summaries.items():
        if not s:
            rows.append([n, "not trained", "–", "–", "–", "–", "–"])
            continue
        rows.append(
            [
                n,
                s.get("objective"),
                _f(s.get("steps")),
                _f(s.get("samples")),
                _f(s.get("first_loss"), 4),
                _f(s.get("final_loss"), 4),
                _f(s.get("train_time_s"), 1),
            ]
        )
    L += _table(["recipe", "objective", "steps", "samples", "first loss", "final loss", "train s"], rows)
    png = _loss_plot(out)
    if png is not None:
        L += [
            "Training loss (`runs/<recipe>/log.jsonl`; the KL run's loss is the KL term, not a "
            "cross-entropy):",
            "",
            f"![training loss]({png.name})",
            "",
        ]

    L += _eval_section(results)
    L += speech_use_section(results, out)
    L += _repr_section(reprs, out)
    L += _findings(results, reprs, summaries, out)
    L += [
        "## Not covered",
        "",
        "- Speech translation (paper Tables 2/3) is beyond SmolLM2-135M-Instruct even on the text path "
        "(it does not translate English into German), so ST is not evaluated here; run "
        "`blsp eval -t st:de` with a larger LLM (blsp/recipes/blsp_7b_gpu.yaml).",
        "- The CTC+LLM baseline (blsp/recipes/ctc.yaml) is not trained by the demo.",
        "- With this few steps and utterances (and 5 synthetic voices) the numbers show the method "
        "working at small scale, not the paper's effect sizes; the paper trains on 8.8 M pairs.",
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L))
    return path


def _loss_plot(out: Path) -> Path | None:
    """``training_loss.png``: each recipe's logged loss against the step; ``None`` without logs."""
    from blsp.utils.io import iter_jsonl

    series: dict[str, list[tuple[float, float]]] = {}
    for n in RECIPES:
        if n not in SYSTEMS:  # the CTC warm start's loss is on another scale
            continue
        log_path = out / "runs" / n / "log.jsonl"
        if not log_path.is_file():
            continue
        pts = [
            (float(r["step"]), float(r["loss"]))
            for _, r, _ in iter_jsonl(log_path)
            if r and str(r.get("key", "")).startswith("train") and r.get("loss") is not None
        ]
        if pts:
            series[SYSTEMS.get(n, n)] = pts
    if not series:
        return None
    from blsp.evaluation.plots import plot_lines

    return plot_lines(series, out / "training_loss.png", ylabel="training loss", title="Adapter training")


def _eval_section(results: dict[str, Any] | None) -> list[str]:
    L = ["## Evaluation", ""]
    if not results:
        return L + ["Not available: the eval step did not produce `eval/results.json`.", ""]
    keys = _task_keys(results)
    systems = [s["name"] for s in results.get("systems", [])]
    L += [
        "Source: `eval/results.json` (per-utterance outputs under `eval/outputs/`). Greedy decoding; [lo, hi]: 95 % bootstrap interval over items.",
        "",
    ]
    head = ["system"]
    cols: list[tuple[str, str, int]] = []
    if "asr" in keys:
        cols.append((keys["asr"], "score", 2))
        head.append("ASR WER % ↓")
    for k in ("intent", "sentiment"):
        if k in keys:
            cols += [(keys[k], "accuracy", 1), (keys[k], "out_of_set_rate", 1)]
            head += [f"{k} acc % ↑", f"{k} off-format % ↓"]
    if "align" in keys:
        cols += [(keys["align"], "chrf", 2), (keys["align"], "kl", 4)]
        head += ["behavior chrF s/t ↑", "behavior token KL ↓"]
    rows = []
    for s in systems:
        row = [SYSTEMS.get(s, s)]
        for key, metric, d in cols:
            r = _res(results, s, key)
            if str(r.get("status", "")).startswith("error"):
                row.append("error")
            elif r.get("failed"):  # failed answers count as wrong; say how many
                row.append(f"{_fci(r, metric, d)} ({r['failed']} of {r.get('n')} failed)")
            else:
                row.append(_fci(r, metric, d))
        rows.append(row)
    L += _table(head, rows)
    L += [
        "WER of Whisper+LLM is the LLM told to repeat Whisper's transcript; Whisper alone: "
        + _f(_res(results, "whisper_llm", keys.get("asr", "")).get("asr_component"), 2)
        + ' %. "off-format" = answers that name none of the task\'s labels (task-format non-compliance). '
        "Behavior alignment compares the response to speech with the response to its transcript "
        "(chrF, and the mean token KL(text || speech) teacher-forced on the text-path response).",
        "",
    ]
    failed = [
        (s, k, r.get("status"))
        for s in systems
        for k, r in (results["results"].get(s) or {}).items()
        if str(r.get("status", "")).startswith("error")
    ]
    for s, k, st in failed:
        L.append(f"- {SYSTEMS.get(s, s)} on {k}: {st}")
    if failed:
        L.append("")
    return L


def speech_use_section(results: dict[str, Any] | None, out: Path) -> list[str]:
    """Per trained system: the content gap and its flag, the distinct answers of each generation task,
    whether the demo's own adapters use the speech, and the measured curve that says how long it takes."""
    from blsp.evaluation.scoring import speech_verdict
    from blsp.evaluation.tasks import GENERATION_KINDS

    keys = _task_keys(results)
    if not results or "content" not in keys:
        return []
    gen = [t["key"] for t in results.get("tasks", []) if t.get("kind") in GENERATION_KINDS]
    L = ["## Does the model use the speech?", ""]
    L += [
        f"Source: `eval/results.json`, task `{keys['content']}`: loss (nats per target token) of each "
        "clip's transcript under the repetition instruction after its own speech (matched) and after "
        "another clip's (shuffled); distinct = distinct normalised answers / items of each task.",
        "",
    ]
    rows = []
    for n in (n for n in SYSTEMS if n in RECIPES or n == "shipped"):
        r = _res(results, n, keys["content"])
        if not r:
            continue
        status = str(r.get("status", ""))
        verdict = status if status.startswith(("error", "n/a")) else speech_verdict(r)
        distinct = [
            f"{k.split('@')[0]} {d}/{_res(results, n, k).get('n')}"
            for k in gen
            if (d := _res(results, n, k).get("distinct_answers")) is not None
        ]
        rows.append(
            [
                SYSTEMS.get(n, n),
                _f(r.get("matched"), 3),
                _f(r.get("shuffled"), 3),
                _fci(r, "gap", 3),
                verdict or "–",
                ", ".join(distinct) or "–",
            ]
        )
    L += _table(
        ["system", "matched nats/tok", "shuffled nats/tok", "gap ↑", "speech", "distinct answers"], rows
    )
    from blsp.evaluation import stats

    def above(n: str) -> str | None:  # the gap's interval against the bar
        ci = (_res(results, n, keys["content"]).get("ci") or {}).get("gap")
        return None if ci is None else stats.verdict([ci[0] - USES_SPEECH_NATS, ci[1] - USES_SPEECH_NATS])

    def gap(n: str) -> str:
        return _fci(_res(results, n, keys["content"]), "gap", 2)

    L += [
        f"Do the adapters this run trained from its own warm start use the speech (gap above {USES_SPEECH_NATS} "
        "nats, the whole 95 % interval, on every one)? "
        + _verdict(_all([above(n) for n in WARM]))
        + " ("
        + ", ".join(f"{SYSTEMS[n]} {gap(n)}" for n in WARM)
        + f"; from scratch, the same steps: {gap('blsp_scratch')}).",
        "",
    ]
    curve = _measured_curve(out)
    if curve is not None:
        L += [
            "How many samples content takes to emerge, measured on the shipped adapter's run "
            "(`docs/results/blsp-base/learning_curve.png`, made by `blsp eval curve`; the comparison at "
            "equal CPU time is in `docs/RECIPES.md`): from scratch the gap stays under 0.3 nats after "
            "10,000 samples (0.40 h on these 2 cores); after the CTC warm start it is above 2 nats "
            "within 2,000.",
            "",
            f"![learning curve]({curve})",
            "",
        ]
    return L


def _measured_curve(out: Path) -> str | None:
    """Copy the repository's measured learning curve next to the report; its name, or None without it.

    The figure is in the checkout (docs/), not the package: an installed blsp run outside it has none.
    """
    rel = Path("docs") / "results" / "blsp-base" / "learning_curve.png"
    found = [p / rel for p in (Path(__file__).resolve().parents[3], Path.cwd()) if (p / rel).is_file()]
    if not found:
        return None
    src = found[0]
    shutil.copyfile(src, out / "learning_curve.png")
    return "learning_curve.png"


def _repr_section(reprs: dict[str, Any], out: Path) -> list[str]:
    L = ["## Representation analysis (paper Tables 7/8 vs 12/13, Figures 1/3)", ""]
    for n, r in reprs.items():
        label = SYSTEMS.get(n, n)
        if not r:
            L += [f"### {label}", "", "Not available: the repr step did not produce its output.", ""]
            continue
        t = r["tables"]
        L += [
            f"### {label}",
            "",
            f"Source: `repr/representations_{n}.json`; {t.get('n')} utterances, "
            "final-layer state of the last prompt token, average cosine similarity.",
            "",
        ]
        tab = t["speech_cross_instruction"]
        keys = list(tab)
        L += ["Same speech under different instructions:", ""]
        L += _table(
            [""] + [k + "-S" for k in keys], [[a + "-S"] + [_f(tab[a][b], 3) for b in keys] for a in keys]
        )
        paired = t["paired_speech_text"]
        corrected = t.get("paired_speech_text_corrected") or {}
        L += [
            "Paired speech / transcript under the same instruction (paired − unpaired: less the mean over "
            "other clips' transcripts; about 0 when the speech vector ignores the clip):",
            "",
        ]
        rows = [["paired"] + [_f(v, 3) for v in paired.values()]]
        if corrected:
            rows.append(["paired − unpaired"] + [_f(corrected.get(k), 3) for k in paired])
        L += _table([""] + list(paired), rows)
        png = r.get("png")
        if png:
            rel = f"repr/{Path(png).name}"
            L += [f"![t-SNE {label}]({rel})", ""]
    return L


def _verdict(v: str | None) -> str:
    """A verdict of :mod:`blsp.evaluation.stats` in bold, or *not checked* without numbers."""
    return "**not checked** (missing numbers)" if v is None else f"**{v}**"


def _all(verdicts: Sequence[str | None]) -> str | None:
    """One verdict for several: holds only if each holds, does not hold if any does not."""
    from blsp.evaluation import stats

    if not verdicts or any(v is None for v in verdicts):
        return None
    if all(v == stats.HOLDS for v in verdicts):
        return stats.HOLDS
    return stats.FAILS if stats.FAILS in verdicts else stats.UNRESOLVED


def _diff(d: dict[str, Any], digits: int = 1) -> str:
    """``diff [lo, hi], p`` of a paired comparison."""
    from blsp.evaluation import stats

    if d.get("diff") is None:
        return "–"
    return f"{d['diff']:+.{digits}f} {stats.fmt_ci(d['ci'], digits)}, p = {d['p']:.3f}"


def _findings(
    results: dict[str, Any] | None, reprs: dict[str, Any], summaries: dict[str, Any], out: Path
) -> list[str]:
    from blsp.evaluation import stats
    from blsp.evaluation.runner import paired_comparison

    L = ["## The paper's findings, checked on this run", ""]
    L += [
        "Each verdict rests on a paired difference over the test items that both systems answered, "
        f"with its 95 % bootstrap interval ({stats.N_BOOT} resamples) and a two-sided bootstrap p-value: "
        f"**{stats.HOLDS}** when the whole interval is on the claimed side of zero, **{stats.FAILS}** "
        f"when it is on the other side, **{stats.UNRESOLVED}** when it straddles zero.",
        "",
    ]
    keys = _task_keys(results)
    ev = out / "eval"

    def compare(task: str, a: str, b: str, metric: str) -> dict[str, Any]:
        if not results or task not in keys:
            return {"diff": None, "ci": None}
        return paired_comparison(ev, results, keys[task], a, b, metric)

    # (a) compliance
    L += [
        "**(a) After ASR pretraining the model follows non-ASR instructions far less than BLSP.** "
        "Off-format answers (% of answers naming no label of the task), ASR pretraining − BLSP:",
        "",
    ]
    va = []
    for k in ("intent", "sentiment"):
        if k not in keys:
            continue
        d = compare(k, "asr_pretrain", "blsp", "out_of_set_rate")
        va.append(stats.verdict(d["ci"], "positive"))
        a = _res(results, "asr_pretrain", keys[k]).get("out_of_set_rate")
        b = _res(results, "blsp", keys[k]).get("out_of_set_rate")
        L.append(f"- {k}: {_f(a, 1)} % vs {_f(b, 1)} %, difference {_diff(d)}: {_verdict(va[-1])}.")
    L += ["", "Verdict: " + _verdict(_all(va)), ""]
    # (b) representations
    L += [
        "**(b) Paired speech/transcript representations are closer after BLSP than after ASR pretraining, "
        "and the same speech under different instructions is more distinct.**",
        "",
    ]
    npz = {n: Path((r or {}).get("npz") or "") for n, r in reprs.items()}
    if all(p.is_file() for p in npz.values()) and len(npz) == 2:
        from blsp.evaluation.analysis import item_cosines

        ca, cb = item_cosines(npz["asr_pretrain"]), item_cosines(npz["blsp"])

        def blsp_minus_asr(table: str) -> dict[str, Any]:  # per-item values: means, so denominators 1
            def means(c: dict[str, float]) -> dict[str, tuple[float, float]]:
                return {i: (v, 1.0) for i, v in c.items()}

            return stats.paired_difference(means(cb[table]), means(ca[table]))

        dp, dx = blsp_minus_asr("paired"), blsp_minus_asr("cross")
        vb1, vb2 = stats.verdict(dp["ci"], "positive"), stats.verdict(dx["ci"], "negative")
        L.append(
            "- paired speech/transcript cosine (mean over the instructions), BLSP − ASR pretraining: "
            f"{_diff(dp, 3)}: {_verdict(vb1)}."
        )
        L.append(
            "- same speech across instructions, mean cosine over instruction pairs (lower = more distinct), "
            f"BLSP − ASR pretraining: {_diff(dx, 3)}: {_verdict(vb2)}."
        )
        L += [
            "",
            f"Verdict: closer pairs {_verdict(vb1)}; more distinct across instructions {_verdict(vb2)}.",
            "",
        ]
    else:
        L += ["Not checked: the representation step did not produce both models' vectors.", ""]
    # (c) RP WER
    L += ["**(c) BLSP+RP has a lower WER than BLSP.**", ""]
    wa = _res(results, "blsp_rp", keys.get("asr", "")).get("score")
    wb = _res(results, "blsp", keys.get("asr", "")).get("score")
    dc = compare("asr", "blsp_rp", "blsp", "score")
    vc = stats.verdict(dc["ci"], "negative")
    L += [
        f"- ASR WER: BLSP+RP {_f(wa, 2)} % vs BLSP {_f(wb, 2)} %, difference {_diff(dc)}.",
        "",
        "Verdict: " + _verdict(vc),
        "",
    ]
    # (d) KL vs CE
    L += ["**(d) KL vs CE objective at the same number of steps.**", ""]
    sc, sk = summaries.get("blsp") or {}, summaries.get("blsp_kl") or {}
    ak = keys.get("align", "")
    ce_a, kl_a = _res(results, "blsp", ak), _res(results, "blsp_kl", ak)
    dd = compare("align", "blsp_kl", "blsp", "kl")
    L.append(f"- steps: CE {_f(sc.get('steps'))}, KL {_f(sk.get('steps'))}.")
    L.append(
        f"- behavior alignment chrF s/t: CE {_f(ce_a.get('chrf'), 2)} vs KL {_f(kl_a.get('chrf'), 2)}; "
        f"token KL(text || speech): CE {_f(ce_a.get('kl'), 4)} vs KL {_f(kl_a.get('kl'), 4)}, "
        f"KL − CE {_diff(dd, 4)}."
    )
    L.append(
        f"- ASR WER: CE {_f(wb, 2)} % vs KL {_f(_res(results, 'blsp_kl', keys.get('asr', '')).get('score'), 2)} %."
    )
    for k in ("intent", "sentiment"):
        if k in keys:
            L.append(
                f"- {k} accuracy: CE {_f(_res(results, 'blsp', keys[k]).get('accuracy'), 1)} % vs KL "
                f"{_f(_res(results, 'blsp_kl', keys[k]).get('accuracy'), 1)} %."
            )
    L += [
        "",
        "Verdict (the KL objective gives a lower behavior-alignment token KL at equal steps): "
        + _verdict(stats.verdict(dd["ci"], "negative")),
        "",
    ]
    return L
