"""``blsp serve``: an OpenAI-compatible HTTP server for a BLSP model (FastAPI + uvicorn).

Endpoints:

- ``POST /v1/chat/completions``: messages with ``text`` and ``input_audio`` parts, any number of
  turns, ``stream`` (server-sent events in the OpenAI chunk format, ending ``data: [DONE]``),
  ``max_tokens``/``max_completion_tokens``, ``temperature`` (default 0 = greedy, as in the
  paper), ``top_p``, ``stop``, ``stream_options.include_usage``. Parameters it does not implement
  (``tools``, ``response_format`` other than text, ``logprobs``, ``n`` > 1, ...) are 400s naming them.
- ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: multipart upload, answered by
  the model with the paper's ASR instruction and ST instruction (Table 11); ``response_format``
  json, text, verbose_json, srt or vtt (one segment covering the clip). Translations go into
  English as OpenAI's do (``--translation-language``; the form field ``target_language`` asks
  for another; ``language`` names the source, default ``--translation-source-language``, else none named).
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.

Batching (``--batching``, default ``continuous``): one model worker decodes up to
``--max-batch-size`` requests together, streamed and non-streamed alike; each keeps its own
``max_tokens``, ``stop`` and sampling settings. Continuous: a request joins the running batch at
its next decode step (its prompt is prefilled, its first token streamed at once, its KV cache
joined to the batch's) and leaves it when it ends. Static: requests that arrive within
``--batch-wait-ms`` of each other run as one batched ``generate`` until its longest row ends
(different ``temperature``/``top_p`` in separate batches); later ones wait. An idle server waits
``--batch-wait-ms`` for company either way. ``--max-batch-size 1`` turns batching off.

Hardening (docs/SECURITY.md lists every limit, its flag and default): every failure answers in
the OpenAI error shape with a 4xx/5xx status, a catch-all handler included. Request bodies are
bounded (413); JSON is validated by strict pydantic models (types, finite numbers, unknown
fields). Per-request budgets (messages, audio parts, text characters, seconds per clip and in
all, ``channels x frames`` per clip from its header, the prompt against the context window from
sample counts) are checked before any audio is decoded; decoding runs on a bounded thread pool
(``--decode-workers``), neither on the event loop nor on the model worker. Each request has a
deadline (``--request-timeout-s``, 504); a client that disconnects while queued or streaming
frees its slot; a dead model worker makes requests fail at once (503). ``--api-key`` (or
``BLSP_API_KEY``) requires Bearer auth on ``/v1``; bound to loopback, only loopback Host headers
are answered (DNS rebinding; ``--allowed-host`` adds names); CORS is off unless
``--cors-allow-origin``. No request can make the server read a local file or fetch a URL unless
the operator starts it with ``--allow-local-files --local-files-root DIR`` / ``--allow-urls``
(public addresses only unless ``--allow-private-urls``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from blsp.errors import BlspError
from blsp.serving.openai_api import (
    ApiError,
    AudioForm,
    AudioRef,
    ServerSettings,
    as_api_error,
    check_model,
    chunk,
    completion,
    error_body,
    finish_reason,
    generation_params,
    load_audio,
    model_card,
    new_id,
    parse_chat_request,
    parse_json_body,
    parse_messages,
    validation_error,
)

logger = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 (declared or streamed), in the OpenAI shape.

    A body declared too large is read and discarded (up to a bound) before answering, so that the
    client, still uploading, reads the 413 instead of a reset connection.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: int | None) -> bytes:
        what = f"{size} bytes" if size is not None else "larger than the limit"
        msg = f"request body is {what}; this server accepts at most {self.max_bytes} bytes (--max-body-mb)"
        return json.dumps(error_body(msg, code="request_too_large")).encode()

    async def _send_413(self, send: Any, size: int | None) -> None:
        body = self._message(size)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_bytes:
            drained, cap = 0, max(16 * self.max_bytes, 64 << 20)
            while drained < min(declared, cap):
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                drained += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            return await self._send_413(send, declared)

        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return msg

        async def tracking_send(msg: Any) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._send_413(send, None)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


async def _send_error(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _header(scope: Any, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class HostCheckMiddleware:
    """Answer only requests whose ``Host`` header names an allowed host (any port): DNS rebinding.

    A web page on an attacker's domain that re-points its name to 127.0.0.1 still sends its own
    name as ``Host``; a server bound to loopback therefore accepts only ``localhost``,
    ``127.0.0.1`` and ``[::1]`` (plus ``--allowed-host`` names).
    """

    def __init__(self, app: Any, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {h.lower().strip() for h in allowed}

    @staticmethod
    def hostname(host: str) -> str:
        host = host.strip().lower()
        if host.startswith("["):
            return host[: host.find("]") + 1] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = _header(scope, b"host") or ""
            if self.hostname(host) not in self.allowed:
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                msg = (
                    f"Host header {host[:100]!r} is not allowed on this server; allowed: "
                    f"{', '.join(sorted(self.allowed))} (the operator can add names with --allowed-host)"
                )
                return await _send_error(send, 400, error_body(msg, code="invalid_host"))
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Bearer authentication (``Authorization: Bearer KEY``) on every ``/v1`` route: 401 otherwise."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope.get("path", "").startswith("/v1")
            and scope.get("method") != "OPTIONS"
        ):
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                msg = "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
            elif not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                msg = "Incorrect API key provided"
            else:
                return await self.app(scope, receive, send)
            return await _send_error(
                send,
                401,
                error_body(msg, code="invalid_api_key"),
                [(b"www-authenticate", b'Bearer realm="blsp"')],
            )
        await self.app(scope, receive, send)


def create_app(
    pipeline: Any, settings: ServerSettings, batching: str = "continuous", engine_factory: Any = None
) -> Any:
    """The FastAPI application serving ``pipeline`` under ``settings`` (the engine starts with it).

    ``batching``: ``"continuous"`` (requests join a running batch) or ``"static"``.
    ``engine_factory``: builds the engine instead of blsp's own (``make_engine``'s signature),
    e.g. the vLLM engine of ``blsp.inference.vllm_engine``.
    """
    from blsp.serving.engine import make_engine

    engine = (engine_factory or make_engine)(
        pipeline,
        batching,
        max_batch_size=settings.max_batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        max_queue=settings.max_queue,
    )
    decoder = ThreadPoolExecutor(
        max_workers=max(1, settings.decode_workers), thread_name_prefix="blsp-decode"
    )
    decoding = 0  # decode tasks queued or running
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="BLSP speech-language model server", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        msg = f"request body is larger than {settings.max_body_bytes} bytes (--max-body-mb)"
        return JSONResponse(error_body(msg, code="request_too_large"), status_code=413)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = f"{request.method} {request.url.path[:200]}: {e.detail}"
        return JSONResponse(
            error_body(msg, code=None if e.status_code != 404 else "not_found"),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        # Anything not foreseen: still the OpenAI shape (the traceback goes to the log).
        logger.error("unexpected error on %s %s: %r", request.method, request.url.path[:200], e)
        return JSONResponse(
            error_body("internal server error; see the server log", type="server_error"), status_code=500
        )

    def deadline_error() -> ApiError:
        return ApiError(
            504,
            f"the request took longer than {settings.request_timeout_s:g} s (--request-timeout-s)",
            type="server_error",
            code="timeout",
        )

    async def guard(request: Request, fut: Any, deadline: float, job: Any = None) -> Any:
        """``fut``'s result (a failure as an API error), unless the client leaves, the deadline
        passes or the model worker dies first (then the job, if any, is cancelled)."""
        while True:
            left = deadline - time.monotonic()
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, min(0.5, left)))
            if done:
                try:
                    return fut.result()
                except ApiError:
                    raise
                except Exception as e:
                    raise as_api_error(e) from e
            failure = None
            if await request.is_disconnected():
                failure = ApiError(499, "client disconnected")
            elif time.monotonic() >= deadline:
                failure = deadline_error()
            elif job is not None and not engine.alive:
                from blsp.serving.engine import EngineUnavailable

                failure = as_api_error(EngineUnavailable("the model worker is not running"))
            if failure is not None:
                if job is not None:
                    engine.cancel(job)
                raise failure

    async def off_loop(request: Request, deadline: float, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the bounded decode pool (not the event loop, not the model worker)."""
        nonlocal decoding
        if decoding >= settings.max_queue:
            raise ApiError(
                503,
                f"the server has {settings.max_queue} requests decoding audio (--max-queue); try again later",
                type="server_error",
                code="server_overloaded",
            )
        decoding += 1
        try:
            return await guard(request, asyncio.wrap_future(decoder.submit(fn, *args)), deadline)
        finally:
            decoding -= 1

    async def read_json(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype and "json" not in ctype:
            raise ApiError(415, f"send the request as application/json, not {ctype[:100]}")
        raw = await request.body()
        return await run_in_threadpool(parse_json_body, raw)

    def submit(conv: list[dict[str, Any]], params: Any, stream: bool = False) -> Any:
        try:
            return engine.submit(conv, params, stream=stream)
        except Exception as e:
            raise as_api_error(e) from e

    def alive() -> None:
        try:
            engine.check_alive()
        except Exception as e:
            raise as_api_error(e) from e

    def prompt_check(max_new_tokens: int) -> Any:
        return lambda conv: engine.check_prompt(conv, max_new_tokens)

    async def next_event(request: Request, job: Any, deadline: float) -> tuple[str, Any]:
        getter = asyncio.ensure_future(job.events.get())
        try:
            return await guard(request, getter, deadline, job)
        finally:
            if not getter.done():
                getter.cancel()

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse(
            {"status": "ok" if ok else "error", "model": settings.model_name, "engine": engine.stats()},
            status_code=200 if ok else 503,
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(settings, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, settings)
        return model_card(settings, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        deadline = time.monotonic() + settings.request_timeout_s
        body = await read_json(request)
        req = await run_in_threadpool(parse_chat_request, body, settings)
        check_model(req.model, settings)
        params = generation_params(req, settings)
        alive()  # a dead worker fails the request now (503), before any decoding
        conv = await off_loop(
            request, deadline, parse_messages, req.messages, settings, prompt_check(params.max_new_tokens)
        )
        if not req.stream:
            job = submit(conv, params)
            result = await guard(request, job.future, deadline, job)
            return completion(result, settings.model_name)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        job = submit(conv, params, stream=True)
        kind, value = await next_event(request, job, deadline)  # "ready": the prompt was accepted
        if kind == "error":
            raise as_api_error(value)
        cid, created_at = new_id(), int(time.time())

        async def events() -> AsyncIterator[str]:
            def sse(obj: Any) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

            try:
                yield sse(chunk(cid, created_at, settings.model_name, {"role": "assistant", "content": ""}))
                while True:
                    try:
                        kind, value = await next_event(request, job, deadline)
                    except ApiError as e:
                        kind, value = "error", e
                    if kind == "delta":
                        yield sse(chunk(cid, created_at, settings.model_name, {"content": value}))
                    elif kind == "done":
                        yield sse(chunk(cid, created_at, settings.model_name, {}, finish_reason(value)))
                        if include_usage:
                            yield sse(chunk(cid, created_at, settings.model_name, {}, with_usage=value))
                        break
                    elif kind == "error":
                        yield sse(as_api_error(value).body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                engine.cancel(job)  # finished, failed or the client went away: stop its row

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def audio_form(request: Request) -> tuple[AudioForm, Any]:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise ApiError(415, "send the audio as multipart/form-data with a 'file' field", param="file")
        form = await request.form(max_files=1, max_fields=32)
        fields: dict[str, Any] = {}
        upload = None
        for key, value in form.multi_items():
            if key == "file":
                upload = value
            elif not isinstance(value, str):
                raise ApiError(
                    400, f"{key[:100]}: a file was sent where a form field belongs", param=key[:100]
                )
            elif key == "timestamp_granularities[]":
                fields.setdefault(key, []).append(value)
            else:
                fields[key] = value
        try:
            parsed = AudioForm.model_validate(fields)
        except ValidationError as e:
            raise validation_error(e) from e
        parsed.check_supported()
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file: a multipart file upload named 'file' is required", param="file")
        return parsed, upload

    async def audio_task(request: Request, task: str) -> Any:
        from blsp.data.audio import KNOWN_FORMATS
        from blsp.inference.generate import GenerationParams

        deadline = time.monotonic() + settings.request_timeout_s
        form, upload = await audio_form(request)
        check_model(form.model, settings)
        if task == "transcribe":
            from blsp.instructions import task_instruction

            instruction, language = task_instruction("asr"), form.language or "english"
        else:
            instruction, language = translation(form)
        alive()
        data = await upload.read()
        name = (upload.filename or "upload")[:200]
        suffix = name.rsplit(".", 1)[-1].lower() if "." in name else None
        ref = AudioRef(f"file {name!r}", data=data, fmt=suffix if suffix in KNOWN_FORMATS else None)
        conv = [
            {
                "role": "user",
                "content": [{"type": "text", "text": instruction}, {"type": "audio", "audio": ref}],
            }
        ]
        params = GenerationParams(max_new_tokens=settings.max_tokens_limit, temperature=form.temperature)
        conv = await off_loop(
            request, deadline, load_audio, conv, [ref], settings, prompt_check(params.max_new_tokens)
        )
        duration = len(conv[0]["content"][1]["audio"]) / 16000
        job = submit(conv, params)
        result = await guard(request, job.future, deadline, job)
        return audio_response(form, task, language, duration, result)

    def translation(form: AudioForm) -> tuple[str, str]:
        """The instruction and target language of a translation: into English unless asked otherwise."""
        from blsp.evaluation.tasks import LANGUAGE_NAMES, lang_code, translation_instruction

        target = form.target_language or settings.translation_language
        try:
            tgt = lang_code(target)
        except BlspError as e:
            raise ApiError(400, str(e), param="target_language") from e
        source = form.language or ("English" if tgt != "en" else settings.translation_source_language)
        try:
            src = lang_code(source) if source is not None else None
        except BlspError as e:
            raise ApiError(400, str(e), param="language") from e
        if src == tgt:
            raise ApiError(
                400,
                f"source and target language are both {LANGUAGE_NAMES[src]}; use /v1/audio/transcriptions",
                param="target_language",
            )
        return translation_instruction(src, tgt), LANGUAGE_NAMES[tgt].lower()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Any:
        return await audio_task(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Any:
        return await audio_task(request, "translate")

    # Outermost last: Host check, CORS (only when enabled), API key, body limit, then the routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if settings.allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)
    return app


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def audio_response(form: AudioForm, task: str, language: str, duration: float, result: Any) -> Any:
    """The answer of an audio endpoint in ``form.response_format`` (srt/vtt: one segment, the clip)."""
    text = result.text
    fmt = form.response_format
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "srt":
        return PlainTextResponse(f"1\n{_timestamp(0, ',')} --> {_timestamp(duration, ',')}\n{text}\n\n")
    if fmt == "vtt":
        return PlainTextResponse(
            f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(duration, '.')}\n{text}\n\n",
            media_type="text/vtt",
        )
    if fmt == "verbose_json":
        segment = {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": round(duration, 3),
            "text": text,
            "tokens": list(result.token_ids),
            "temperature": form.temperature,
        }
        return {
            "task": task,
            "language": language,
            "duration": round(duration, 3),
            "text": text,
            "segments": [segment],
            "words": [],
        }
    return {"text": text}


def serve(
    pipeline: Any,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    batching: str = "continuous",
    engine_factory: Any = None,
) -> None:
    """Run the server until interrupted (``batching``, ``engine_factory``: see ``create_app``)."""
    import uvicorn

    if settings.allowed_hosts is None and host in ("127.0.0.1", "localhost", "::1"):
        settings = replace(settings, allowed_hosts=LOOPBACK_HOSTS)  # bound to loopback: DNS rebinding
    app = create_app(pipeline, settings, batching, engine_factory)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        access_log=log_level == "debug",
    )
    server = uvicorn.Server(config)
    logger.info(
        "serving %s on http://%s:%d/v1 (%s batching, batch <= %d, wait %g ms)",
        settings.model_name,
        host,
        port,
        app.state.engine.batching,
        settings.max_batch_size,
        settings.batch_wait_ms,
    )
    server.run()
