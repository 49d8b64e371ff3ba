"""``blsp serve`` (OpenAI-compatible HTTP API) and ``blsp ui`` (Gradio web demo)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument(
        "adapter",
        nargs="?",
        default=None,
        help="BLSP adapter folder (config.json + adapter.safetensors) or shipped name (default: blsp-base)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-audio-seconds", type=float, default=120.0, help="longest clip accepted")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (chat completions with audio, transcriptions)",
        description="OpenAI-compatible server: POST /v1/chat/completions (text + input_audio parts, stream), "
        "/v1/audio/transcriptions, /v1/audio/translations; GET /v1/models, /health.",
    )
    _common(s, 8000)
    s.add_argument(
        "--model-name", default=None, help="model id clients use (default: the adapter folder name)"
    )
    s.add_argument(
        "--max-batch-size", type=int, default=8, help="requests per batched generate (1 = no batching)"
    )
    s.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a request waits for batch company"
    )
    s.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body")
    s.add_argument(
        "--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for"
    )
    s.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 503")
    s.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let requests name server-side audio files (audio_url with file:// or a path); off by default",
    )
    s.add_argument(
        "--local-files-root",
        default="/",
        metavar="DIR",
        help="with --allow-local-files: only files under DIR may be read (default: anywhere)",
    )
    s.add_argument("--allow-urls", action="store_true", help="let requests name http(s) audio URLs to fetch")
    s.add_argument(
        "--translation-language",
        default="German",
        help="target language of /v1/audio/translations (BLSP translates English speech into it)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=_serve)

    u = sub.add_parser(
        "ui",
        help="web demo (Gradio): record or upload audio, type an instruction, watch the answer stream",
    )
    _common(u, 7860)
    u.add_argument("--max-new-tokens", type=int, default=128)
    u.add_argument("--max-context", type=int, default=None, help="positions a conversation may use")
    u.add_argument(
        "--examples-dir",
        default=None,
        help="folder for example clips (default: synthesised with espeak-ng into the cache)",
    )
    u.set_defaults(func=_ui)


def _load(args: argparse.Namespace, **kwargs):
    from blsp.inference.audio_input import AudioLimits
    from blsp.inference.pipeline import SpeechPipeline

    return SpeechPipeline.from_pretrained(
        args.adapter,
        device=args.device,
        dtype=args.dtype,
        limits=AudioLimits(max_seconds=args.max_audio_seconds),
        **kwargs,
    )


def _serve(args: argparse.Namespace) -> int:
    from blsp.errors import BlspError
    from blsp.models.hub import resolve_adapter
    from blsp.serving.openai_api import ServerSettings
    from blsp.serving.server import serve

    if args.max_tokens_limit < 1 or args.max_batch_size < 1 or args.max_body_mb <= 0:
        raise BlspError("--max-tokens-limit, --max-batch-size and --max-body-mb must be positive")
    if args.allow_local_files and not Path(args.local_files_root).is_dir():
        raise BlspError(f"--local-files-root {args.local_files_root}: not a folder")
    settings = ServerSettings(
        model_name=args.model_name or resolve_adapter(args.adapter).resolve().name,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_body_mb=args.max_body_mb,
        max_audio_seconds=args.max_audio_seconds,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        allow_local_files=args.local_files_root if args.allow_local_files else None,
        allow_urls=args.allow_urls,
        translation_language=args.translation_language,
        max_queue=args.max_queue,
    )
    pipe = _load(args)
    # Limits of the pipeline are the server's: audio over the limit is refused while decoding.
    pipe.limits = settings.audio_limits
    serve(pipe, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from blsp.serving.ui import launch

    pipe = _load(args, max_new_tokens=args.max_new_tokens)
    launch(pipe, host=args.host, port=args.port, max_context=args.max_context, examples_dir=args.examples_dir)
    return 0
