"""Evaluation wall time: the demo's ``blsp eval`` command as it was (every adapter folder loads its
own encoder and LLM) and as it is (adapters of one config share one loaded encoder and LLM and
swap in), side by side in one run, same systems, tasks and items.

The systems are the demo's: five adapter folders (copies of the shipped ``blsp-base``, or the
adapters of a finished demo with ``--demo DIR``), Text+LLM, Whisper+LLM and the shipped adapter,
on the demo's tasks (ASR, intent, sentiment, behavior alignment, the speech-content check) of its
held-out-voice test sets. Each variant runs in its own ``blsp eval`` process into its own folder,
so nothing is resumed from the other; the answers of the two must be the same, and are compared.

    python bench/eval_throughput.py                  # 16 items a task, as the demo
    python bench/eval_throughput.py --limit 4        # a quicker look
    python bench/eval_throughput.py --demo runs/demo # the adapters a demo trained
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blsp import demo


def systems(adapters: dict[str, Path]) -> list[str]:
    specs = []
    for name, path in adapters.items():
        kind = "asr-pretrain" if name == "asr_pretrain" else "blsp"
        specs += ["-s", f"{name}={kind}:{path}"]
    return specs + [
        "-s",
        "text_llm=text",
        "-s",
        "whisper_llm=whisper:whisper-base",
        "-s",
        "shipped=blsp:blsp-base",
    ]


def run(argv: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "blsp.cli", "eval", *argv, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"blsp eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def answers(out: Path) -> dict[str, str]:
    got = {}
    for f in sorted((out / "outputs").glob("*/*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            got[f"{f.parent.name}/{f.stem}/{r['id']}"] = r.get("response") or r.get("transcript") or ""
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=demo.PRESETS["default"]["eval_items"])
    ap.add_argument("--demo", type=Path, help="a finished demo folder: evaluate its adapters")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        if args.demo:
            adapters = {n: args.demo / "runs" / n / "final" for n in demo.RECIPES if n in demo.SYSTEMS}
        else:
            from blsp.models.hub import resolve_adapter

            adapters = {}
            for n in (n for n in demo.RECIPES if n in demo.SYSTEMS):
                adapters[n] = work / "adapters" / n
                shutil.copytree(resolve_adapter("blsp-base"), adapters[n])
        ts = work / "testsets"
        subprocess.run(
            [sys.executable, "-m", "blsp.cli", "eval", "sets", "build", *demo.TESTSETS, "--testsets", str(ts)]
            + ["--n", str(args.limit)],
            check=True,
            capture_output=True,
        )
        argv = systems(adapters) + [a for t in demo.EVAL_TASKS for a in ("-t", t)]
        argv += ["--testsets", str(ts), "--limit", str(args.limit), "--batch-size", "8", "--device", "cpu"]
        argv += ["--max-new-tokens", str(demo.PRESETS["default"]["eval_max_new_tokens"])]
        old = run([*argv, "--no-shared-models"], work / "old")
        new = run(argv, work / "new")
        same = answers(work / "old") == answers(work / "new")
        n_sys = len(adapters) + 3
        print(
            f"blsp eval, {n_sys} systems x {len(demo.EVAL_TASKS)} tasks x {args.limit} items (the demo's command)"
        )
        print(f"{'variant':<44}{'wall s':>10}")
        print(f"{'old: every adapter loads encoder + LLM':<44}{old:>10.1f}")
        print(f"{'new: one encoder + LLM, adapters swapped in':<44}{new:>10.1f}")
        print(f"ratio old / new: {old / new:.2f}x; same answers: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
