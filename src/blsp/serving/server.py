"""``blsp serve``: an OpenAI-compatible HTTP server for a BLSP model (FastAPI + uvicorn).

Longer than 500 lines because its docstring is the endpoint reference and every route, with the
request guard they share (ServerState), lives here; middleware, schemas, messages, audio and
responses are sibling modules.

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
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from blsp.errors import BlspError
from blsp.serving.audio_sources import AudioRef, fetch_audio
from blsp.serving.messages import parse_messages
from blsp.serving.middleware import (
    LOOPBACK_HOSTS,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    BodyTooLarge,
    HostCheckMiddleware,
)
from blsp.serving.openai_api import (
    ApiError,
    AudioForm,
    ServerSettings,
    as_api_error,
    check_model,
    error_body,
    generation_params,
    parse_chat_request,
    parse_json_body,
    validation_error,
)
from blsp.serving.responses import audio_response, chunk, completion, finish_reason, model_card, new_id

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share (``app.state.server``): the engine, the settings and the decode pool."""

    engine: Any
    settings: ServerSettings
    decoder: ThreadPoolExecutor
    created: int
    decoding: int = 0  # decode tasks queued or running

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s

    def deadline_error(self) -> ApiError:
        return ApiError(
            504,
            f"the request took longer than {self.settings.request_timeout_s:g} s (--request-timeout-s)",
            type="server_error",
            code="timeout",
        )

    async def guard(self, request: Request, fut: Any, deadline: float, job: Any = None) -> Any:
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
                failure = self.deadline_error()
            elif job is not None and not self.engine.alive:
                from blsp.serving.engine import EngineUnavailable

                failure = as_api_error(EngineUnavailable("the model worker is not running"))
            if failure is not None:
                if job is not None:
                    self.engine.cancel(job)
                raise failure

    async def off_loop(self, request: Request, deadline: float, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the bounded decode pool (not the event loop, not the model worker)."""
        limit = self.settings.max_queue
        if self.decoding >= limit:
            raise ApiError(
                503,
                f"the server has {limit} requests decoding audio (--max-queue); try again later",
                type="server_error",
                code="server_overloaded",
            )
        self.decoding += 1
        try:
            return await self.guard(request, asyncio.wrap_future(self.decoder.submit(fn, *args)), deadline)
        finally:
            self.decoding -= 1

    def submit(self, conv: list[dict[str, Any]], params: Any, stream: bool = False) -> Any:
        try:
            return self.engine.submit(conv, params, stream=stream)
        except Exception as e:
            raise as_api_error(e) from e

    def check_alive(self) -> None:
        try:
            self.engine.check_alive()
        except Exception as e:
            raise as_api_error(e) from e

    def prompt_check(self, max_new_tokens: int) -> Any:
        return lambda conv: self.engine.check_prompt(conv, max_new_tokens)

    async def next_event(self, request: Request, job: Any, deadline: float) -> tuple[str, Any]:
        getter = asyncio.ensure_future(job.events.get())
        try:
            return await self.guard(request, getter, deadline, job)
        finally:
            if not getter.done():
                getter.cancel()


def server_state(request: Request) -> ServerState:
    return request.app.state.server


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    state.engine.start()
    try:
        yield
    finally:
        state.engine.stop()
        state.decoder.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- errors
async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def on_body_too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
    limit = server_state(request).settings.max_body_bytes
    msg = f"request body is larger than {limit} bytes (--max-body-mb)"
    return JSONResponse(error_body(msg, code="request_too_large"), status_code=413)


async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    err = validation_error(list(e.errors()))
    return JSONResponse(err.body(), status_code=err.status)


async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    msg = f"{request.method} {request.url.path[:200]}: {e.detail}"
    return JSONResponse(
        error_body(msg, code=None if e.status_code != 404 else "not_found"),
        status_code=e.status_code,
        headers=getattr(e, "headers", None),
    )


async def on_unexpected_error(request: Request, e: Exception) -> JSONResponse:
    # Anything not foreseen: still the OpenAI shape (the traceback goes to the log).
    logger.error("unexpected error on %s %s: %r", request.method, request.url.path[:200], e)
    return JSONResponse(
        error_body("internal server error; see the server log", type="server_error"), status_code=500
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: on_api_error,
    BodyTooLarge: on_body_too_large,
    RequestValidationError: on_validation_error,
    StarletteHTTPException: on_http_error,
    Exception: on_unexpected_error,
}

# ----------------------------------------------------------------------------- routes
router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    ok = state.engine.alive
    return JSONResponse(
        {
            "status": "ok" if ok else "error",
            "model": state.settings.model_name,
            "engine": state.engine.stats(),
        },
        status_code=200 if ok else 503,
    )


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    return {"object": "list", "data": [model_card(state.settings, state.created)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    check_model(model_id, state.settings)
    return model_card(state.settings, state.created)


async def read_json(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    if ctype and "json" not in ctype:
        raise ApiError(415, f"send the request as application/json, not {ctype[:100]}")
    raw = await request.body()
    return await run_in_threadpool(parse_json_body, raw)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    state = server_state(request)
    settings = state.settings
    deadline = state.deadline()
    body = await read_json(request)
    req = await run_in_threadpool(parse_chat_request, body, settings)
    check_model(req.model, settings)
    params = generation_params(req, settings)
    state.check_alive()  # a dead worker fails the request now (503), before any decoding
    conv = await state.off_loop(
        request, deadline, parse_messages, req.messages, settings, state.prompt_check(params.max_new_tokens)
    )
    if not req.stream:
        job = state.submit(conv, params)
        result = await state.guard(request, job.future, deadline, job)
        return completion(result, settings.model_name)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    job = state.submit(conv, params, stream=True)
    kind, value = await state.next_event(request, job, deadline)  # "ready": the prompt was accepted
    if kind == "error":
        raise as_api_error(value)
    return StreamingResponse(
        chat_events(request, state, job, deadline, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def chat_events(
    request: Request, state: ServerState, job: Any, deadline: float, include_usage: bool
) -> AsyncIterator[str]:
    """The stream of a chat completion whose prompt was accepted, in the OpenAI chunk format."""
    cid, created_at, name = new_id(), int(time.time()), state.settings.model_name
    try:
        yield sse(chunk(cid, created_at, name, {"role": "assistant", "content": ""}))
        while True:
            try:
                kind, value = await state.next_event(request, job, deadline)
            except ApiError as e:
                kind, value = "error", e
            if kind == "delta":
                yield sse(chunk(cid, created_at, name, {"content": value}))
            elif kind == "done":
                yield sse(chunk(cid, created_at, name, {}, finish_reason(value)))
                if include_usage:
                    yield sse(chunk(cid, created_at, name, {}, with_usage=value))
                break
            elif kind == "error":
                yield sse(as_api_error(value).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        state.engine.cancel(job)  # finished, failed or the client went away: stop its row


async def audio_form(request: Request) -> tuple[AudioForm, Any]:
    """The form fields and the uploaded ``file`` of an audio endpoint (400/415 when malformed)."""
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
            raise ApiError(400, f"{key[:100]}: a file was sent where a form field belongs", param=key[:100])
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


def translation(form: AudioForm, settings: ServerSettings) -> tuple[str, str]:
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


async def answer_audio(request: Request, task: str) -> Any:
    """``/v1/audio/transcriptions`` (``task="transcribe"``) and ``/v1/audio/translations`` (``"translate"``)."""
    from blsp.data.audio import KNOWN_FORMATS
    from blsp.inference.generate import GenerationParams

    state = server_state(request)
    settings = state.settings
    deadline = state.deadline()
    form, upload = await audio_form(request)
    check_model(form.model, settings)
    if task == "transcribe":
        from blsp.instructions import task_instruction

        instruction, language = task_instruction("asr"), form.language or "english"
    else:
        instruction, language = translation(form, settings)
    state.check_alive()
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
    conv = await state.off_loop(
        request, deadline, fetch_audio, conv, [ref], settings, state.prompt_check(params.max_new_tokens)
    )
    duration = len(conv[0]["content"][1]["audio"]) / 16000
    job = state.submit(conv, params)
    result = await state.guard(request, job.future, deadline, job)
    return audio_response(form, task, language, duration, result)


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Any:
    return await answer_audio(request, "transcribe")


@router.post("/v1/audio/translations")
async def translations(request: Request) -> Any:
    return await answer_audio(request, "translate")


# ----------------------------------------------------------------------------- the app
def create_app(
    pipeline: Any, settings: ServerSettings, batching: str = "continuous", engine_factory: Any = None
) -> Any:
    """The FastAPI application serving ``pipeline`` under ``settings`` (the engine starts with it).

    ``batching``: ``"continuous"`` (requests join a running batch) or ``"static"``.
    ``engine_factory``: builds the engine instead of blsp's own (``make_engine``'s signature),
    e.g. the vLLM engine of ``blsp.inference.vllm_engine``. The routes are the module's
    functions; what they share is the :class:`ServerState` in ``app.state.server``.
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
    app = FastAPI(title="BLSP speech-language model server", version="0.1.0", lifespan=lifespan)
    app.state.server = ServerState(engine, settings, decoder, created=int(time.time()))
    app.state.engine = engine
    app.state.settings = settings
    for exc, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.include_router(router)

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
