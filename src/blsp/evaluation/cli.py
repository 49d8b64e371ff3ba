"""``blsp eval [run]``: run systems on tasks; ``blsp eval sets|repr|progress|curve``: test sets, analysis, curves.

``run`` is the default sub-command: ``blsp eval -s SYSTEM -t TASK`` is ``blsp eval run -s SYSTEM -t TASK``.
"""

from __future__ import annotations

import argparse
import os
import sys

TASK_HELP = (
    "task spec NAME[@TESTSET]; NAME: asr, st:<lang>, x2en:<lang>, intent, snips, fsc, sentiment, coffee, qa, "
    "align[:behavior], content (does the answer depend on the speech?); TESTSET: a built set (tts-asr-en ...), a real one (speechocean762, picovoice-coffee, "
    "commonvoice-zh) or a manifest path (repeatable)"
)
SYSTEM_HELP = (
    "system spec [NAME=]KIND[:ARG]: blsp:DIR (adapter folder), asr-pretrain:DIR, text (Text+LLM), "
    "whisper[:REF] (Whisper+LLM), ctc:DIR (CTC+LLM) (repeatable)"
)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--testsets",
        metavar="DIR",
        help="folder of built test sets (default $BLSP_TESTSETS or <cache>/testsets)",
    )
    p.add_argument(
        "--shared-data",
        metavar="DIR",
        help="the shared real data folder (default $BLSP_SHARED_DATA or ../shared/data)",
    )
    p.add_argument("--limit", type=int, help="use the first N utterances of each test set")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--no-loop-guard",
        dest="loop_guard",
        action="store_false",
        help="plain greedy decoding: do not end an answer that falls into a loop (see GenerationParams)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument(
        "--judge", help="QA judge: openai:MODEL@BASE_URL, http(s)://BASE_URL#MODEL, or a local LLM reference"
    )
    p.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key"
    )


def register(sub: argparse._SubParsersAction) -> None:
    from blsp.cli import set_default_subcommand

    description = (
        "Run systems (BLSP adapters, Text+LLM, Whisper+LLM, CTC+LLM) on tasks and write "
        "results.json, results.md and per-utterance outputs (resumable)."
    )
    group = sub.add_parser(
        "eval",
        help="evaluate systems on tasks (WER, BLEU, accuracy, QA, behavior alignment)",
        usage="blsp eval [run] -s SYSTEM -t TASK [options]\n       blsp eval {sets,repr,progress,curve} ...",
        description=description + " `blsp eval -s .. -t ..` runs them (the default sub-command: run); the "
        "other sub-commands build test sets, analyse representations and plot training progress.",
    )
    esub = group.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", prog="blsp eval")
    set_default_subcommand(group, "run")
    p = esub.add_parser(
        "run",
        help="(the default) run systems on tasks: blsp eval -s SYSTEM -t TASK [options]",
        usage="blsp eval [run] -s SYSTEM -t TASK [options]",
        description=description,
    )
    p.add_argument("--system", "-s", action="append", default=[], help=SYSTEM_HELP)
    p.add_argument("--task", "-t", action="append", default=[], help=TASK_HELP)
    p.add_argument("--out", "-o", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument(
        "--base",
        metavar="DIR",
        help="adapter folder whose LLM serves the text path of text/whisper/ctc systems",
    )
    p.add_argument(
        "--encoder", help="Whisper reference for a base model built from scratch (no --base, no blsp system)"
    )
    p.add_argument("--llm", help="LLM reference for a base model built from scratch")
    p.add_argument(
        "--retry-failed", action="store_true", help="run again the utterances that failed in an earlier run"
    )
    p.add_argument(
        "--no-shared-models",
        dest="share_models",
        action="store_false",
        help="load the encoder and LLM again for every adapter folder (as before; for benchmarks)",
    )
    _data_args(p)
    _gen_args(p)
    p.set_defaults(func=_run)

    ps = esub.add_parser("sets", help="list or build test sets (TTS with held-out voices)")
    ps.add_argument("action", choices=("list", "build"))
    ps.add_argument("names", nargs="*", help="test sets to build (default: all)")
    ps.add_argument(
        "--testsets", metavar="DIR", help="where to build (default $BLSP_TESTSETS or <cache>/testsets)"
    )
    ps.add_argument("--n", type=int, default=50, help="sentences per test set (default 50; 0 = all)")
    ps.add_argument(
        "--source",
        choices=("resources", "shared"),
        default="resources",
        help="text source: the package's task texts or the shared text data",
    )
    ps.add_argument("--shared-data", metavar="DIR")
    ps.add_argument("--voices", action="append", help="voice specs (default: the held-out evaluation voices)")
    ps.add_argument("--workers", type=int, default=1)
    ps.add_argument("--seed", type=int, default=0)
    ps.set_defaults(func=_sets)

    pr = esub.add_parser(
        "repr", help="representation analysis: cosine tables and t-SNE (paper Tables 7/8, 12/13)"
    )
    pr.add_argument(
        "--model",
        "-m",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="adapter folder (repeatable)",
    )
    pr.add_argument(
        "--testset", default="tts-asr-en", help="test set with audio and transcripts (default tts-asr-en)"
    )
    pr.add_argument("--out", "-o", default="runs/repr")
    pr.add_argument(
        "--highlight", type=int, default=5, help="paired inputs joined by dashed lines (Figure 3)"
    )
    pr.add_argument("--device")
    pr.add_argument("--batch-size", type=int, default=8)
    _data_args(pr)
    pr.set_defaults(func=_repr, limit=25)

    pp = esub.add_parser("progress", help="evaluate checkpoints and plot metric vs training step (Figure 4)")
    pp.add_argument(
        "checkpoints", nargs="+", help="run folder, checkpoints/ folder, step-N folder or adapter folder"
    )
    pp.add_argument("--task", "-t", action="append", default=[], help=TASK_HELP + " (default: asr and st:de)")
    pp.add_argument("--out", "-o", default="runs/progress")
    _data_args(pp)
    _gen_args(pp)
    pp.set_defaults(func=_progress)

    pc = esub.add_parser(
        "curve", help="plot the held-out matched/shuffled gap vs samples and hours from training logs"
    )
    pc.add_argument("runs", nargs="+", help="run folders in training order (a warm start first)")
    pc.add_argument("--out", "-o", default="runs/curve")
    pc.set_defaults(func=_curve)


def _judge(args: argparse.Namespace):
    from blsp.evaluation.judge import make_judge

    return make_judge(getattr(args, "judge", None), api_key=os.environ.get(args.judge_key_env or "", None))


def _run(args: argparse.Namespace) -> int:
    from blsp.errors import BlspError
    from blsp.evaluation.api import evaluate
    from blsp.evaluation.markdown import results_to_markdown

    if not args.system or not args.task:
        raise BlspError("give at least one --system and one --task (see blsp eval --help)")
    results = evaluate(
        args.system,
        args.task,
        args.out,
        testsets=args.testsets,
        shared_data=args.shared_data,
        limit=args.limit,
        base=args.base,
        encoder=args.encoder,
        llm=args.llm,
        device=args.device,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        loop_guard=args.loop_guard,
        judge=_judge(args),
        retry_failed=args.retry_failed,
        share_models=args.share_models,
    )
    md = results_to_markdown(results)
    print(md.split("\n## ", 1)[0].rstrip())
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and results.md", file=sys.stderr)
    return 0


def _sets(args: argparse.Namespace) -> int:
    from pathlib import Path

    from blsp.evaluation.testsets import (
        BUILD_SPECS,
        REAL_SETS,
        build_testset,
        default_root,
        default_shared_data,
    )

    root = Path(args.testsets) if args.testsets else default_root()
    if args.action == "list":
        for name, spec in BUILD_SPECS.items():
            m = root / name / "test.jsonl"
            n = sum(1 for line in m.open(encoding="utf-8") if line.strip()) if m.is_file() else 0
            state = f"{n} utterances" if m.is_file() else "not built"
            print(f"{name:16} tasks: {', '.join(spec.tasks):32} {state}")
        shared = Path(args.shared_data) if args.shared_data else default_shared_data()
        for name, rel in REAL_SETS.items():
            ok = shared is not None and (shared / rel).is_file()
            print(
                f"{name:16} real speech: {'available at ' + str(shared / rel) if ok else 'shared data not found'}"
            )
        return 0
    names = args.names or list(BUILD_SPECS)
    failed = 0
    for name in names:
        try:
            m = build_testset(
                name,
                root,
                n=args.n or None,
                voices=args.voices,
                source=args.source,
                shared=args.shared_data,
                seed=args.seed,
                workers=args.workers,
            )
            print(f"{name}: {m}")
        except Exception as e:  # one set failing (a missing resource) must not stop the others
            failed += 1
            print(f"{name}: FAILED: {e}", file=sys.stderr)
    return 1 if failed else 0


def _repr(args: argparse.Namespace) -> int:
    from pathlib import Path

    from blsp.evaluation.analysis import representation_analysis
    from blsp.evaluation.testsets import load_testset
    from blsp.models.modeling_blsp import BlspModel

    _, items = load_testset(args.testset, root=args.testsets, shared=args.shared_data, limit=args.limit)
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        model = BlspModel.from_pretrained(path, device=args.device)
        res = representation_analysis(
            model, items, args.out, name=name, highlight=args.highlight, batch_size=args.batch_size
        )
        print(res["markdown"])
        del model
    return 0


def _progress(args: argparse.Namespace) -> int:
    from blsp.evaluation.progress import progress_curve
    from blsp.evaluation.testsets import make_tasks

    tasks = make_tasks(
        args.task or ["asr", "st:de"], root=args.testsets, shared=args.shared_data, limit=args.limit
    )
    res = progress_curve(
        args.checkpoints,
        tasks,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        judge=_judge(args),
        loop_guard=args.loop_guard,
    )
    for name, pts in res["series"].items():
        print(name + ": " + ", ".join(f"{s}={'–' if v is None else f'{v:.2f}'}" for s, v in pts))
    print(f"wrote {res['png']}", file=sys.stderr)
    return 0


def _curve(args: argparse.Namespace) -> int:
    from blsp.evaluation.progress import learning_curve

    res = learning_curve(args.runs, args.out)
    for p in res["points"]:
        print(
            f"{p['run']} step {p['step']}: {p['samples']} samples, {p['cpu_hours']:.2f} h, gap {p['gap']:.3f}"
        )
    print(f"wrote {res['png']}", file=sys.stderr)
    return 0
