"""Run (or resume) the demo's steps as ``blsp`` subprocesses, record them in ``steps.json``."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blsp.demo.presets import DEFAULT_ENCODER, DEFAULT_LLM, EVAL_PARAMS, EVAL_STEPS, PRESETS
from blsp.demo.report import load_json_or_none, machine_info, write_report
from blsp.demo.steps import Step, build_steps, display_path, write_sentences


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
    record: dict[str, Any] = load_json_or_none(record_path) or {}
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
        prev = load_json_or_none(marker) if marker.is_file() else None
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
        missing = [display_path(o) for o in st.outputs if not o.exists()]
        ok = rc == 0 and not missing
        summary = load_json_or_none(st.outputs[-1]) if st.name.startswith("train_") and ok else None
        if summary is not None and not summary.get("samples"):
            ok = False  # a run that skipped every example trained nothing
            missing.append("usable training examples (summary.json: samples=0)")
        entry = {
            "title": st.title,
            "command": cmd,
            "status": "ok" if ok else "failed",
            "returncode": rc,
            "wall_s": wall,
            "log": display_path(log_path),
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
            f"  -> {entry['status']} in {wall} s"
            + ("" if ok else f" (rc {rc}; see {display_path(log_path)})"),
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
