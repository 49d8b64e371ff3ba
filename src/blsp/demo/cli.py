"""``blsp demo``: the command line of the demo."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from blsp.demo import __doc__ as DEMO_DOC
from blsp.demo.presets import DEFAULT_ENCODER, DEFAULT_LLM, PRESETS
from blsp.demo.report import write_report
from blsp.demo.runner import run_pipeline


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``blsp demo``."""
    p = sub.add_parser(
        "demo",
        help="run the whole BLSP pipeline on the embedded default and write DIR/report.md",
        description=DEMO_DOC.split("\n\n")[1] if DEMO_DOC else None,
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
