"""``blsp demo``: the whole BLSP pipeline on the embedded default, end to end, and a report.

Steps (each a subprocess of the ``blsp`` CLI, so the report's commands are exactly what ran):
synthesise the training corpus from the package's sentences, build the held-out-voice test sets,
generate continuation behaviors (step 1), build the repetition set and the 1:9 mix (BLSP+RP),
train the alignment warm start (CTC against the LLM's token embeddings, configs/align_ctc.yaml),
train BLSP (CE), BLSP+RP, the ASR-pretraining baseline and BLSP with the KL objective from it and
BLSP once from scratch, evaluate every system on every task the bundled LLM can do (with the
matched/shuffled speech check), analyse representations, and write ``DIR/report.md`` (tables,
plots, machine, wall time and command of each step, the paper's four findings checked with the
numbers of this run).

Resumable: a step whose done-marker (``DIR/.done/<step>.json``) and outputs exist is skipped;
``--force STEP`` reruns it. ``DIR/steps.json`` records status, wall time and command of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Presets as data. ``quick`` takes ~13 min on 2 idle cores, ``default`` ~38 min (measured); ``tiny``
#: makes every step minimal (tests).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sentences": 8,
        "voices": ["espeak:en-us"],
        "voices_per_text": 1,
        "ctc_steps": 2,
        "ctc_batch_size": 2,
        # the tiny random LLM's tokenizer gives more labels than the tiny encoder has frames: its
        # warm start is a CTC over the tokenizer's vocabulary with 3 labels a frame
        "ctc_sets": ["ctc.vocab=tokenizer", "ctc.upsample=3"],
        "train_steps": 2,
        "batch_size": 2,
        "micro_batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 0,
        "eval_items": 3,
        "repr_items": 3,
        "behavior_max_new_tokens": 24,
        # SmolLM2-135M echoes most sentences back; the tiny run keeps those (flagged) so that it
        # always has data, the real presets drop them as the behavior filter does by default.
        "echo": "flag",
        "eval_max_new_tokens": 16,
        "workers": 2,
    },
    "quick": {
        "sentences": 30,
        "voices": ["espeak:en-us", "flite:kal"],
        "voices_per_text": 2,
        "ctc_steps": 40,
        "ctc_batch_size": 16,
        "train_steps": 10,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 2,
        "eval_items": 4,
        "repr_items": 6,
        "behavior_max_new_tokens": 48,
        "echo": "drop",
        "eval_max_new_tokens": 32,
        "workers": 2,
    },
    "default": {
        "sentences": 600,
        "voices": ["piper:joe", "espeak:en-us", "flite:kal", "flite:awb", "espeak:en+m3"],
        "voices_per_text": 2,
        # the warm start the adapters need to use the speech within the hour (docs/RECIPES.md)
        "ctc_steps": 900,
        "ctc_batch_size": 32,
        "train_steps": 150,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 5e-4,
        "warmup_steps": 10,
        "eval_items": 32,  # 95 % intervals of about +-15 points on a rate; the run stays near 40 min
        "repr_items": 16,
        "behavior_max_new_tokens": 64,
        "echo": "drop",
        "eval_max_new_tokens": 48,
        "workers": 2,
    },
}

#: System name in eval outputs -> name in the report.
SYSTEMS: dict[str, str] = {
    "blsp": "BLSP",
    "blsp_rp": "BLSP+RP",
    "asr_pretrain": "ASR pretraining",
    "blsp_kl": "BLSP (KL)",
    "blsp_scratch": "BLSP from scratch (no warm start)",
    "text_llm": "Text+LLM",
    "whisper_llm": "Whisper+LLM",
    "shipped": "blsp-base (shipped, not trained by the demo)",
}
#: Training recipes: run name -> repo config. ``align_ctc`` is the warm start every other recipe but
#: ``blsp_scratch`` starts from.
RECIPES: dict[str, str] = {
    "align_ctc": "align_ctc.yaml",
    "blsp": "blsp.yaml",
    "blsp_rp": "blsp_rp.yaml",
    "asr_pretrain": "asr_pretrain.yaml",
    "blsp_kl": "blsp_kl.yaml",
    "blsp_scratch": "blsp.yaml",
}
#: The recipes that start from the warm start.
WARM = ("blsp", "blsp_rp", "asr_pretrain", "blsp_kl")
#: Preset settings that only the evaluation steps read (changing one reruns those steps only).
EVAL_PARAMS = frozenset({"eval_items", "repr_items", "eval_max_new_tokens"})
EVAL_STEPS = frozenset({"testsets", "eval", "repr"})
#: A gap (nats) above which the demo's adapters count as using the speech (issue 11).
USES_SPEECH_NATS = 0.3
TESTSETS = ("tts-asr-en", "tts-intent", "tts-sentiment")
TASKS = (
    "asr@tts-asr-en",
    "intent@tts-intent",
    "sentiment@tts-sentiment",
    "align@tts-asr-en",
    "content@tts-asr-en",
)


@dataclass
class Step:
    """One pipeline step: a CLI command (or ``None`` for the in-process report) and its outputs."""

    name: str
    title: str
    argv: list[str] | None
    outputs: list[Path]
    needs: list[str] = field(default_factory=list)
    func: Callable[[], None] | None = None


def _configs_dir() -> Path:
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "configs", Path.cwd() / "configs"):
        if (cand / "blsp.yaml").is_file():
            return cand
    from blsp.errors import BlspError

    raise BlspError("blsp demo: the recipes folder configs/ (blsp.yaml ...) was not found; run from the repo")


def _rel(p: Path) -> str:
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(Path(p).resolve()) if rel.startswith("..") else rel


DEFAULT_ENCODER, DEFAULT_LLM = "whisper-base", "smollm2-135m-instruct"


def build_steps(
    out: Path, p: dict[str, Any], encoder: str = DEFAULT_ENCODER, llm: str = DEFAULT_LLM
) -> list[Step]:
    """The pipeline for preset ``p`` writing under ``out`` (models: the recipes' default unless given)."""
    cli = ["blsp"]
    data, runs = out / "data", out / "runs"
    speech = data / "speech" / "train.jsonl"
    cont, rep, mix = (
        data / "behaviors" / f for f in ("continuation.jsonl", "repetition.jsonl", "mix_rp.jsonl")
    )
    ts = out / "testsets"
    cache = out / "cache" / "encoder"
    cfg = _configs_dir()
    r = _rel
    steps = [
        Step(
            "synth",
            "Synthesise the training corpus (TTS of the embedded sentences)",
            cli
            + ["data", "synth", r(data / "sentences.txt"), r(data / "speech"), "--voices", *p["voices"]]
            + ["--voices-per-text", str(p["voices_per_text"]), "--workers", str(p["workers"]), "--seed", "0"],
            [speech],
        ),
        Step(
            "testsets",
            "Build the test sets (held-out voices)",
            cli
            + ["eval", "sets", "build", *TESTSETS, "--testsets", r(ts), "--n", str(p["eval_items"])]
            + ["--workers", str(p["workers"])],
            [ts / t / "test.jsonl" for t in TESTSETS],
        ),
        Step(
            "behave",
            "Step 1: continuation behaviors from the LLM given the transcripts",
            cli
            + ["behave", r(speech), r(cont), "--behavior", "continuation", "--echo", p["echo"]]
            + ([] if llm == DEFAULT_LLM else ["--model", llm])
            + ["--max-new-tokens", str(p["behavior_max_new_tokens"]), "--device", "cpu"],
            [cont],
            ["synth"],
        ),
        Step(
            "repetition",
            "Repetition behavior (response = transcript)",
            cli + ["behave", r(speech), r(rep), "--behavior", "repetition"],
            [rep],
            ["synth"],
        ),
        Step(
            "mix",
            "Mix repetition : continuation = 1 : 9 (BLSP+RP)",
            # absolute paths: `data mix` keeps cwd-relative audio paths of relative inputs as they are
            cli
            + [
                "data",
                "mix",
                "-o",
                str(mix.resolve()),
                f"{cont.resolve()}:9",
                f"{rep.resolve()}:1",
                "--seed",
                "0",
            ],
            [mix],
            ["behave", "repetition"],
        ),
    ]

    def budget(steps: int, batch: int, micro: int) -> list[str]:
        return [
            f"train.max_steps={steps}",
            "train.epochs=1000",
            f"train.global_batch_size={batch}",
            f"train.micro_batch_size={micro}",
            f"run.save_every={steps}",
            f"run.log_every={max(1, steps // 25)}",
        ]

    common = [
        "train.device=cpu",
        f"data.encoder_cache={r(cache)}",
        "run.eval_every=1000000",
        "run.tensorboard=false",
        "run.progress=false",
    ]
    behavior = [
        *budget(p["train_steps"], p["batch_size"], p["micro_batch_size"]),
        f"train.lr={p['lr']}",
        f"train.warmup_steps={p['warmup_steps']}",
    ]
    ctc = budget(p["ctc_steps"], p["ctc_batch_size"], p["ctc_batch_size"])
    ctc += p.get("ctc_sets", [])
    warm = f"model.init_from={r(runs / 'align_ctc' / 'final')}"
    train_data = {
        "align_ctc": [f"data.train.0.path={r(speech)}", *ctc],
        "blsp": [f"data.train.0.path={r(cont)}"],
        "blsp_kl": [f"data.train.0.path={r(cont)}"],
        "blsp_rp": [f"data.train=[{{path: {r(mix)}, task: behavior}}]"],
        "asr_pretrain": [f"data.train.0.path={r(speech)}"],
        "blsp_scratch": [f"data.train.0.path={r(cont)}", "model.init_from=null"],
    }
    for name in WARM:
        train_data[name] += [warm, *behavior]
    train_data["blsp_scratch"] += behavior
    needs = {
        "align_ctc": ["synth"],
        "blsp": ["behave", "train_align_ctc"],
        "blsp_kl": ["behave", "train_align_ctc"],
        "blsp_rp": ["mix", "train_align_ctc"],
        "asr_pretrain": ["train_align_ctc"],
        "blsp_scratch": ["behave"],
    }
    titles = {
        "align_ctc": "Alignment warm start: CTC against the LLM's token embeddings (no LLM forward)",
        "blsp": "Train BLSP (continuation, cross-entropy)",
        "blsp_rp": "Train BLSP+RP (repetition : continuation = 1 : 9)",
        "asr_pretrain": "Train the ASR-pretraining baseline",
        "blsp_kl": "Train BLSP with the KL objective (same steps as CE)",
        "blsp_scratch": "Train BLSP from scratch (no warm start; same steps as BLSP)",
    }
    for name, conf in RECIPES.items():
        sets = [*train_data[name], f"run.output_dir={r(runs / name)}", *common]
        if encoder != DEFAULT_ENCODER:
            sets.append(f"model.encoder={encoder}")
        if llm != DEFAULT_LLM:
            sets.append(f"model.llm={llm}")
        argv = cli + ["train", r(cfg / conf)]
        for s in sets:
            argv += ["--set", s]
        steps.append(
            Step(
                f"train_{name}",
                titles[name],
                argv,
                [runs / name / "final", runs / name / "summary.json"],
                needs[name],
            )
        )
    ev = cli + ["eval"]
    for sname in SYSTEMS:
        if sname == "shipped":
            # the pretrained adapter beside what the demo trains, when the demo runs its models
            if (encoder, llm) == (DEFAULT_ENCODER, DEFAULT_LLM):
                ev += ["-s", "shipped=blsp:blsp-base"]
        elif sname == "text_llm":
            ev += ["-s", "text_llm=text"]
        elif sname == "whisper_llm":
            ev += ["-s", f"whisper_llm=whisper:{encoder}"]
        elif sname not in RECIPES:
            raise AssertionError(f"demo system {sname!r} has no recipe")
        else:
            kind = "asr-pretrain" if sname == "asr_pretrain" else "blsp"
            ev += ["-s", f"{sname}={kind}:{r(runs / sname / 'final')}"]
    ev += ["--base", r(runs / "blsp" / "final")]
    for t in TASKS:
        ev += ["-t", t]
    ev += ["--testsets", r(ts), "--limit", str(p["eval_items"]), "--out", r(out / "eval")]
    ev += ["--max-new-tokens", str(p["eval_max_new_tokens"]), "--batch-size", "8", "--device", "cpu"]
    steps.append(
        Step(
            "eval",
            "Evaluate every system on every task",
            ev,
            [out / "eval" / "results.json"],
            ["testsets", *(f"train_{n}" for n in RECIPES if n in SYSTEMS)],
        )
    )
    rp = cli + ["eval", "repr"]
    for n in ("asr_pretrain", "blsp"):
        rp += ["-m", f"{n}={r(runs / n / 'final')}"]
    rp += ["--testset", "tts-asr-en", "--testsets", r(ts), "--limit", str(p["repr_items"])]
    rp += ["--out", r(out / "repr"), "--device", "cpu", "--highlight", str(min(5, p["repr_items"]))]
    steps.append(
        Step(
            "repr",
            "Representation analysis (ASR pretraining vs BLSP)",
            rp,
            [out / "repr" / "representations_asr_pretrain.json", out / "repr" / "representations_blsp.json"],
            ["testsets", "train_asr_pretrain", "train_blsp"],
        )
    )
    return steps


def write_sentences(path: Path, n: int) -> None:
    """The first ``n`` embedded training sentences, one a line."""
    from importlib import resources

    from blsp.utils.io import atomic_write_text

    text = resources.files("blsp.resources").joinpath("sentences/train.txt").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")][:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


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


# ------------------------------------------------------------------------------------ running
def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_pipeline(
    out: Path,
    preset: str,
    force: Sequence[str] = (),
    encoder: str = DEFAULT_ENCODER,
    llm: str = DEFAULT_LLM,
    stop_after: str | None = None,
) -> int:
    """Run (or resume) every step, then write the report. Returns the number of failed steps."""
    from blsp.errors import BlspError
    from blsp.utils.io import atomic_write_json

    if preset not in PRESETS:
        raise BlspError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    done_dir, logs = out / ".done", out / "logs"
    done_dir.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    write_sentences(out / "data" / "sentences.txt", p["sentences"])
    steps = build_steps(out, p, encoder, llm)
    known = {s.name for s in steps} | {"report"}
    bad = [f for f in force if f not in known and f != "all"]
    if bad:
        raise BlspError(f"--force: unknown step(s) {bad}; steps: {', '.join(sorted(known))}")
    record_path = out / "steps.json"
    record: dict[str, Any] = _load_json(record_path) or {}
    if record.get("preset") not in (None, preset):
        print(
            f"note: {out} was last run with preset {record.get('preset')!r}; now {preset!r}", file=sys.stderr
        )
    record.update(
        {"preset": preset, "params": p, "models": {"encoder": encoder, "llm": llm}, "machine": machine_info()}
    )
    record.setdefault("steps", {})
    status: dict[str, str] = {}
    ran: set[str] = set()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    t_all = time.perf_counter()
    for i, st in enumerate(steps, 1):
        marker = done_dir / f"{st.name}.json"
        # a step is done when it ran with the settings it depends on: changing an evaluation
        # setting reruns the evaluation, not the training
        used = p if st.name in EVAL_STEPS else {k: v for k, v in p.items() if k not in EVAL_PARAMS}
        key = json.dumps({"params": used, "encoder": encoder, "llm": llm}, sort_keys=True)
        cmd = " ".join(shlex.quote(a) for a in st.argv or [])
        # a step reruns when asked, or when a step it depends on ran again (its outputs changed)
        forced = "all" in force or st.name in force or any(d in ran for d in st.needs)
        prev = _load_json(marker) if marker.is_file() else None
        if prev is not None and prev.get("key") != key:  # another command: redo
            forced = True
        if prev is not None and all(o.exists() for o in st.outputs) and not forced:
            status[st.name] = "ok"
            record["steps"][st.name] = {**prev, "skipped_on_rerun": True}
            print(
                f"[{i}/{len(steps)}] {st.name}: done before ({prev.get('wall_s', '?')} s), skipped",
                flush=True,
            )
            continue
        failed_deps = [d for d in st.needs if status.get(d) != "ok"]
        if failed_deps:
            status[st.name] = "blocked"
            record["steps"][st.name] = {
                "title": st.title,
                "command": cmd,
                "status": "blocked",
                "reason": f"needs {', '.join(failed_deps)} which did not succeed",
            }
            print(f"[{i}/{len(steps)}] {st.name}: blocked by {', '.join(failed_deps)}", flush=True)
            continue
        if forced:  # rerun from scratch: the CLIs would otherwise resume from their outputs
            marker.unlink(missing_ok=True)
            _remove_outputs(st)
        ran.add(st.name)
        argv = list(st.argv or [])
        run_dir = st.outputs[0].parent
        if st.name.startswith("train_") and (run_dir / "checkpoints").is_dir():
            argv.append("--resume")  # continue an interrupted run from its last checkpoint
        elif st.name.startswith("train_"):
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed start left nothing worth keeping
        cmd = " ".join(shlex.quote(a) for a in argv)  # what runs, exactly
        print(f"[{i}/{len(steps)}] {st.name}: {st.title}\n  $ {cmd}", flush=True)
        log_path = logs / f"{st.name}.log"
        t0 = time.perf_counter()
        with open(log_path, "ab") as fh:
            fh.write(f"\n$ {cmd}\n".encode())
            fh.flush()
            rc = subprocess.call(
                [sys.executable, "-m", "blsp.cli", *argv[1:]], stdout=fh, stderr=subprocess.STDOUT, env=env
            )
        wall = round(time.perf_counter() - t0, 1)
        missing = [_rel(o) for o in st.outputs if not o.exists()]
        ok = rc == 0 and not missing
        summary = _load_json(st.outputs[-1]) if st.name.startswith("train_") and ok else None
        if summary is not None and not summary.get("samples"):
            ok = False  # a run that skipped every example trained nothing
            missing.append("usable training examples (summary.json: samples=0)")
        entry = {
            "title": st.title,
            "command": cmd,
            "status": "ok" if ok else "failed",
            "returncode": rc,
            "wall_s": wall,
            "log": _rel(log_path),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "key": key,
        }
        if missing:
            entry["missing_outputs"] = missing
        if not ok:
            entry["log_tail"] = _tail(log_path)
        record["steps"][st.name] = entry
        status[st.name] = entry["status"]
        if ok:
            atomic_write_json(marker, entry)
        atomic_write_json(record_path, record)
        print(
            f"  -> {entry['status']} in {wall} s" + ("" if ok else f" (rc {rc}; see {_rel(log_path)})"),
            flush=True,
        )
        if stop_after == st.name:
            break
    record["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(record_path, record)
    t0 = time.perf_counter()
    report = write_report(out)
    print(f"report written in {time.perf_counter() - t0:.1f} s: {report}", flush=True)
    return sum(1 for v in status.values() if v != "ok")


def _remove_outputs(st: Step) -> None:
    """Delete a step's outputs (and the sidecars/run folder its CLI resumes from)."""
    if st.name.startswith("train_") or st.name == "eval":  # whole run / results folder
        shutil.rmtree(st.outputs[0].parent, ignore_errors=True)
        return
    for o in st.outputs:
        if st.name in ("synth", "testsets"):
            continue  # TTS is deterministic and resumable: keep the audio
        if o.is_dir():
            shutil.rmtree(o, ignore_errors=True)
        elif o.suffix == ".jsonl":
            for side in o.parent.glob(o.stem + ".*"):
                side.unlink(missing_ok=True)
        else:
            o.unlink(missing_ok=True)


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ------------------------------------------------------------------------------------ report
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

    rec = _load_json(out / "steps.json") or {}
    steps = rec.get("steps", {})
    p = rec.get("params", {})
    m = rec.get("machine") or machine_info()
    results = _load_json(out / "eval" / "results.json")
    reprs = {n: _load_json(out / "repr" / f"representations_{n}.json") for n in ("asr_pretrain", "blsp")}
    summaries = {n: _load_json(out / "runs" / n / "summary.json") for n in RECIPES}
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
    L += _speech_use_section(results, out)
    L += _repr_section(reprs, out)
    L += _findings(results, reprs, summaries, out)
    L += [
        "## Not covered",
        "",
        "- Speech translation (paper Tables 2/3) is beyond SmolLM2-135M-Instruct even on the text path "
        "(it does not translate English into German), so ST is not evaluated here; run "
        "`blsp eval -t st:de` with a larger LLM (configs/blsp_7b_gpu.yaml).",
        "- The CTC+LLM baseline (configs/ctc.yaml) is not trained by the demo.",
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


def _speech_use_section(results: dict[str, Any] | None, out: Path) -> list[str]:
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
    """Copy the repository's measured learning curve next to the report; its name, or None without it."""
    src = _configs_dir().parent / "docs" / "results" / "blsp-base" / "learning_curve.png"
    if not src.is_file():
        return None
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


# ------------------------------------------------------------------------------------ CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``blsp demo``."""
    p = sub.add_parser(
        "demo",
        help="run the whole BLSP pipeline on the embedded default and write DIR/report.md",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the short preset, ~13 min on 2 cores (default: the full one, ~40 min)",
    )
    p.add_argument("--preset", choices=list(PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--out", "-o", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--force",
        nargs="+",
        default=[],
        metavar="STEP",
        help="rerun these steps (and those that depend on them), or all: synth, testsets, behave, "
        "repetition, mix, train_align_ctc, train_blsp, train_blsp_rp, train_asr_pretrain, "
        "train_blsp_kl, train_blsp_scratch, eval, repr",
    )
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="Whisper reference (default whisper-base)")
    p.add_argument("--llm", default=DEFAULT_LLM, help="LLM reference (default smollm2-135m-instruct)")
    p.add_argument("--report-only", action="store_true", help="only rewrite report.md from existing outputs")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.report_only:
        print(write_report(out))
        return 0
    preset = args.preset or ("quick" if args.quick else "default")
    t0 = time.perf_counter()
    failed = run_pipeline(out, preset, force=args.force, encoder=args.encoder, llm=args.llm)
    print(
        f"\nblsp demo ({preset}) finished in {time.perf_counter() - t0:.0f} s; "
        f"{failed} step(s) not ok. Report: {out / 'report.md'}"
    )
    return 1 if failed else 0
