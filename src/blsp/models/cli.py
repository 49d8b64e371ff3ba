"""``blsp models`` (the model aliases and where their weights are) and ``blsp transcribe`` (Whisper ASR)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blsp.models.hub import DEFAULT_WHISPER


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model aliases, their packages and whether they resolve")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("transcribe", help="transcribe audio files with Whisper (greedy, batched)")
    p.add_argument(
        "audio", nargs="+", help="audio files (any format soundfile reads; path:start:num for a segment)"
    )
    p.add_argument("--model", default=DEFAULT_WHISPER, help="alias, HF folder, CTranslate2 folder or hub id")
    p.add_argument(
        "--language", default=None, help="language code (default: detect; English-only models: en)"
    )
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help='one JSON line per file: {"audio": ..., "text": ...}')
    p.set_defaults(func=cmd_transcribe)


def cmd_models(args: argparse.Namespace) -> int:
    from blsp.models.hub import DEFAULT_ADAPTER, alias_status, cache_dir, pretrained_status

    rows = alias_status()
    adapters = pretrained_status()
    if args.json:
        print(json.dumps({"aliases": rows, "adapters": adapters}, indent=2))
        return 0
    print(f"{'alias':<24}{'kind':<9}{'status':<11}packages")
    for r in rows:
        status = "missing" if not r["installed"] else "converted" if r["cached"] else "installed"
        print(f"{r['name']:<24}{r['kind']:<9}{status:<11}{' or '.join(r['packages'])}")
        indent = " " * 44
        if r["installed"]:
            print(f"{indent}source: {Path(r['files'][0]).parent}")
        else:
            print(f"{indent}install: {r['install']}")
        if r["cached"]:
            print(f"{indent}local:  {r['cached']}")
    print(f"cache: {cache_dir()}  (converted once on first use)")
    print(f"\n{'shipped adapter':<24}{'status':<11}what")
    for a in adapters:
        default = " (default)" if a["name"] == DEFAULT_ADAPTER else ""
        print(
            f"{a['name'] + default:<24}{'installed' if a['installed'] else 'missing':<11}{a['description']}"
        )
        print(f"{'':<35}{a['folder']}")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from blsp.data.audio import load_audio
    from blsp.models.asr import WhisperTranscriber

    audios = [load_audio(a) for a in args.audio]
    transcriber = WhisperTranscriber(args.model, device=args.device)
    texts = transcriber.transcribe(audios, language=args.language, task=args.task, batch_size=args.batch_size)
    for path, text in zip(args.audio, texts, strict=True):
        if args.json:
            print(json.dumps({"audio": path, "text": text}, ensure_ascii=False))
        elif len(args.audio) == 1:
            print(text)
        else:
            print(f"{path}\t{text}")
    sys.stdout.flush()
    return 0
