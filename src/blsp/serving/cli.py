"""``blsp serve`` (OpenAI-compatible HTTP API) and ``blsp ui`` (Gradio web demo)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from blsp.inference.cli import add_backend_args, add_model_args, backend_kwargs, pipeline_from_args
from blsp.serving.settings import ServerSettings


def _common(p: argparse.ArgumentParser, port: int) -> None:
    add_model_args(p)  # adapter, --device, --dtype, --quantization: as chat and generate
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=ServerSettings.max_audio_seconds,
        help="longest clip accepted",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key (serve: 'Authorization: Bearer KEY' on /v1; ui: the login password); "
        "default: $BLSP_API_KEY, else none",
    )


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (chat completions with audio, transcriptions)",
        description="OpenAI-compatible server: POST /v1/chat/completions (text + input_audio parts, stream), "
        "/v1/audio/transcriptions, /v1/audio/translations; GET /v1/models, /health.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(s, 8000)
    s.add_argument(
        "--model-name", default=None, help="model id clients use (default: the adapter folder name)"
    )
    s.add_argument(
        "--max-batch-size",
        type=int,
        default=ServerSettings.max_batch_size,
        help="requests per batched generate (1 = no batching)",
    )
    s.add_argument(
        "--batch-wait-ms",
        type=float,
        default=ServerSettings.batch_wait_ms,
        help="how long a request waits for batch company",
    )
    s.add_argument(
        "--batching",
        default="continuous",
        choices=["continuous", "static"],
        help="continuous: requests join a running batch at its next step; static: a batch runs to its end",
    )
    s.add_argument(
        "--max-body-mb", type=float, default=ServerSettings.max_body_mb, help="largest request body"
    )
    s.add_argument(
        "--max-tokens-limit",
        type=int,
        default=ServerSettings.max_tokens_limit,
        help="largest max_tokens a request may ask for",
    )
    s.add_argument(
        "--default-max-tokens",
        type=int,
        default=ServerSettings.default_max_tokens,
        help="max_tokens when a request gives none",
    )
    s.add_argument(
        "--max-queue", type=int, default=ServerSettings.max_queue, help="waiting requests beyond this get 503"
    )
    b = s.add_argument_group(
        "per-request budgets (checked before any audio is decoded; see docs/SECURITY.md)"
    )
    b.add_argument(
        "--max-messages", type=int, default=ServerSettings.max_messages, help="messages per chat request"
    )
    b.add_argument(
        "--max-audio-parts", type=int, default=ServerSettings.max_audio_parts, help="audio parts per request"
    )
    b.add_argument(
        "--max-total-audio-seconds",
        type=float,
        default=ServerSettings.max_total_audio_seconds,
        help="audio seconds per request, all clips",
    )
    b.add_argument(
        "--max-text-chars",
        type=int,
        default=ServerSettings.max_text_chars,
        help="text characters per request",
    )
    b.add_argument(
        "--max-audio-samples",
        type=int,
        default=ServerSettings.max_audio_samples,
        help="channels x frames one clip may decode to, read from its header (16M = 64 MB of float32)",
    )
    b.add_argument(
        "--decode-workers",
        type=int,
        default=ServerSettings.decode_workers,
        help="threads that fetch and decode audio",
    )
    b.add_argument(
        "--request-timeout-s",
        type=float,
        default=ServerSettings.request_timeout_s,
        help="deadline of a request, queueing included",
    )
    a = s.add_argument_group("access (see docs/SECURITY.md)")
    a.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="accept this Host header name too (repeatable); bound to loopback, only localhost, "
        "127.0.0.1 and [::1] are accepted otherwise (DNS rebinding)",
    )
    a.add_argument(
        "--cors-allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages from ORIGIN call the API (repeatable; CORS is off by default)",
    )
    a.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let requests name server-side audio files under --local-files-root (off by default)",
    )
    a.add_argument(
        "--local-files-root",
        default=None,
        metavar="DIR",
        help="with --allow-local-files (required): only files under DIR may be read",
    )
    a.add_argument("--allow-urls", action="store_true", help="let requests name http(s) audio URLs to fetch")
    a.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="with --allow-urls: also fetch from loopback, link-local and private addresses",
    )
    a.add_argument(
        "--url-timeout-s",
        type=float,
        default=ServerSettings.url_timeout_s,
        help="total time to fetch one audio URL (DNS to last byte)",
    )
    s.add_argument(
        "--translation-language",
        default=ServerSettings.translation_language,
        help="target language of /v1/audio/translations (English, as OpenAI's; a request may ask for "
        "another with the form field target_language)",
    )
    s.add_argument(
        "--translation-source-language",
        default=None,
        help="source language named in the into-English instruction when a translation request "
        "gives no 'language' field (default: none named)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_backend_args(s)  # --backend vllm: blsp embeds, vLLM decodes (docs/SCALING.md)
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


def _serve(args: argparse.Namespace) -> int:
    from blsp.errors import BlspError
    from blsp.models.hub import resolve_adapter
    from blsp.serving.server import serve

    if args.backend == "vllm":
        from blsp.inference.vllm_engine import import_vllm

        import_vllm()  # a clear error before the model loads
    positive = {
        "--max-tokens-limit": args.max_tokens_limit,
        "--max-batch-size": args.max_batch_size,
        "--max-body-mb": args.max_body_mb,
        "--max-messages": args.max_messages,
        "--max-audio-parts": args.max_audio_parts,
        "--max-total-audio-seconds": args.max_total_audio_seconds,
        "--max-text-chars": args.max_text_chars,
        "--max-audio-samples": args.max_audio_samples,
        "--decode-workers": args.decode_workers,
        "--request-timeout-s": args.request_timeout_s,
        "--url-timeout-s": args.url_timeout_s,
    }
    bad = [name for name, value in positive.items() if not value > 0]
    if bad:
        raise BlspError(f"{', '.join(bad)} must be positive")
    if args.allow_local_files:
        if not args.local_files_root:
            raise BlspError("--allow-local-files needs --local-files-root DIR: the folder requests may read")
        root = Path(args.local_files_root).resolve()
        if not root.is_dir():
            raise BlspError(f"--local-files-root {args.local_files_root}: not a folder")
        if root == Path(root.anchor):
            raise BlspError("--local-files-root must name a folder, not the file system's root")
    from blsp.evaluation.tasks import lang_code

    lang_code(args.translation_language)
    if args.translation_source_language is not None:
        lang_code(args.translation_source_language)
    loopback = ("localhost", "127.0.0.1", "[::1]")
    settings = ServerSettings(
        model_name=args.model_name or resolve_adapter(args.adapter).resolve().name,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_body_mb=args.max_body_mb,
        max_audio_seconds=args.max_audio_seconds,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        allow_local_files=str(Path(args.local_files_root).resolve()) if args.allow_local_files else None,
        allow_urls=args.allow_urls,
        allow_private_urls=args.allow_private_urls,
        url_timeout_s=args.url_timeout_s,
        translation_language=args.translation_language,
        translation_source_language=args.translation_source_language,
        max_queue=args.max_queue,
        max_messages=args.max_messages,
        max_audio_parts=args.max_audio_parts,
        max_total_audio_seconds=args.max_total_audio_seconds,
        max_text_chars=args.max_text_chars,
        max_audio_samples=args.max_audio_samples,
        decode_workers=args.decode_workers,
        request_timeout_s=args.request_timeout_s,
        api_key=args.api_key or os.environ.get("BLSP_API_KEY") or None,
        # None: the server decides (checked when bound to loopback); names given: always checked
        allowed_hosts=(*loopback, *args.allowed_host) if args.allowed_host else None,
        cors_origins=tuple(args.cors_allow_origin),
    )
    pipe = pipeline_from_args(args)
    # Limits of the pipeline are the server's: audio over the limit is refused while decoding.
    pipe.limits = settings.audio_limits
    factory = None
    if args.backend == "vllm":
        from blsp.inference.vllm_engine import vllm_engine_factory

        factory = vllm_engine_factory(backend_kwargs(args, pipe.model))
    serve(
        pipe,
        settings,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        batching=args.batching,
        engine_factory=factory,
    )
    return 0


def _ui(args: argparse.Namespace) -> int:
    from blsp.errors import BlspError
    from blsp.serving.ui import launch

    args.api_key = args.api_key or os.environ.get("BLSP_API_KEY") or None
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise BlspError(
            f"--host {args.host} exposes the demo beyond this machine: set --api-key (or BLSP_API_KEY) "
            "for a login, or bind to 127.0.0.1"
        )
    pipe = pipeline_from_args(args, max_new_tokens=args.max_new_tokens)
    launch(
        pipe,
        host=args.host,
        port=args.port,
        max_context=args.max_context,
        examples_dir=args.examples_dir,
        api_key=args.api_key,
    )
    return 0
