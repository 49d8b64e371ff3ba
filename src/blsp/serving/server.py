"""``blsp serve``: an OpenAI-compatible HTTP server for a BLSP model (FastAPI + uvicorn).

Endpoints:

- ``POST /v1/chat/completions``: messages with ``text`` and ``input_audio`` parts, any number of
  turns, ``stream`` (server-sent events in the OpenAI chunk format, ending ``data: [DONE]``),
  ``max_tokens``/``max_completion_tokens``, ``temperature`` (default 0 = greedy, as in the
  paper), ``top_p``, ``stop``, ``stream_options.include_usage``.
- ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: multipart upload, answered by
  the model with the paper's ASR instruction and ST instruction (Table 11). BLSP translates
  English speech *into* another language, so translations go into ``--translation-language``
  (or the form field ``target_language``), unlike OpenAI's into-English endpoint.
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.

Batching: requests that arrive within ``--batch-wait-ms`` of each other (up to
``--max-batch-size``) run as one batched ``generate``, streamed and non-streamed alike; each
keeps its own ``max_tokens`` and ``stop``. Requests with different ``temperature``/``top_p``
run in separate batches. ``--max-batch-size 1`` turns batching off.

Limits answer 4xx in the OpenAI error shape: body size (413), audio length, malformed base64,
unknown audio format, unknown model (404), ``max_tokens`` over the limit or over the context
window. No request can make the server read a local file or fetch a URL unless the operator
starts it with ``--allow-local-files`` (``--local-files-root DIR``) / ``--allow-urls``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blsp.serving.openai_api import (
    ApiError,
    ServerSettings,
    as_api_error,
    check_model,
    chunk,
    completion,
    error_body,
    finish_reason,
    generation_params,
    model_card,
    new_id,
    parse_messages,
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


def create_app(pipeline: Any, settings: ServerSettings) -> Any:
    """The FastAPI application serving ``pipeline`` under ``settings`` (the engine starts with it)."""
    from blsp.serving.engine import BatchEngine

    engine = BatchEngine(
        pipeline,
        max_batch_size=settings.max_batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        max_queue=settings.max_queue,
    )
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="BLSP speech-language model server", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        msg = f"request body is larger than {settings.max_body_bytes} bytes (--max-body-mb)"
        return JSONResponse(error_body(msg, code="request_too_large"), status_code=413)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(
            error_body(f"{loc or 'request'}: {first.get('msg', 'invalid request')}", param=loc or None),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(
            error_body(msg, code=None if e.status_code != 404 else "not_found"), status_code=e.status_code
        )

    async def read_json(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype and "json" not in ctype:
            raise ApiError(415, f"send the request as application/json, not {ctype}")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def wait_or_cancel(request: Request, job: Any) -> Any:
        """The job's result (a failure as an API error); cancels the job if the client disconnects first."""
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.5)
            if done:
                try:
                    return job.future.result()
                except ApiError:
                    raise
                except Exception as e:
                    raise as_api_error(e) from e
            if await request.is_disconnected():
                job.cancel.set()
                raise ApiError(499, "client disconnected")

    def submit(conv: list[dict[str, Any]], params: Any, stream: bool = False) -> Any:
        try:
            return engine.submit(conv, params, stream=stream)
        except Exception as e:
            raise as_api_error(e) from e

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
        body = await read_json(request)
        check_model(body.get("model"), settings)
        params = generation_params(body, settings)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        conv = await run_in_threadpool(parse_messages, body.get("messages"), settings)
        if not stream:
            result = await wait_or_cancel(request, submit(conv, params))
            return completion(result, settings.model_name)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        job = submit(conv, params, stream=True)
        kind, value = await job.events.get()
        if kind == "error":
            raise as_api_error(value)
        cid, created_at = new_id(), int(time.time())

        async def events() -> AsyncIterator[str]:
            def sse(obj: Any) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

            try:
                yield sse(chunk(cid, created_at, settings.model_name, {"role": "assistant", "content": ""}))
                while True:
                    kind, value = await job.events.get()
                    if kind == "delta":
                        yield sse(chunk(cid, created_at, settings.model_name, {"content": value}))
                    elif kind == "done":
                        yield sse(chunk(cid, created_at, settings.model_name, {}, finish_reason(value)))
                        if include_usage:
                            yield sse(chunk(cid, created_at, settings.model_name, {}, with_usage=value))
                        break
                    elif kind == "error":
                        err = as_api_error(value)
                        yield sse(err.body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # the client went away: stop its row

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def audio_task(
        request: Request,
        file: Any,
        model_name: str | None,
        response_format: str,
        temperature: float,
        instruction: str,
        task: str,
        language: str | None,
    ) -> Any:
        check_model(model_name, settings)
        if response_format not in ("json", "text", "verbose_json"):
            raise ApiError(
                400,
                f"response_format {response_format!r} is not supported; use json, text or verbose_json",
                param="response_format",
            )
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"'temperature' is {temperature}; it must be in [0, 2]", param="temperature")
        data = await file.read()
        name = file.filename or "upload"
        suffix = name.rsplit(".", 1)[-1].lower() if "." in name else None
        from blsp.errors import AudioError
        from blsp.inference.audio_input import KNOWN_FORMATS, decode_audio_bytes
        from blsp.inference.generate import GenerationParams

        hint = suffix if suffix in KNOWN_FORMATS else None
        try:
            wav = await run_in_threadpool(
                decode_audio_bytes, data, hint, source=f"file {name!r}", limits=settings.audio_limits
            )
        except AudioError as e:
            raise ApiError(400, str(e), param="file", code="invalid_audio") from e
        conv = [
            {
                "role": "user",
                "content": [{"type": "text", "text": instruction}, {"type": "audio", "audio": wav}],
            }
        ]
        params = GenerationParams(max_new_tokens=settings.max_tokens_limit, temperature=temperature)
        result = await wait_or_cancel(request, submit(conv, params))
        if response_format == "text":
            return PlainTextResponse(result.text + "\n")
        if response_format == "verbose_json":
            return {
                "task": task,
                "language": language or "english",
                "duration": round(len(wav) / 16000, 3),
                "text": result.text,
                "segments": [],
                "words": [],
            }
        return {"text": result.text}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: Request,
        file: UploadFile = File(...),
        model: str | None = Form(None),
        language: str | None = Form(None),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
    ) -> Any:
        from blsp.instructions import task_instruction

        return await audio_task(
            request,
            file,
            model,
            response_format,
            temperature,
            task_instruction("asr"),
            "transcribe",
            language,
        )

    @app.post("/v1/audio/translations")
    async def translations(
        request: Request,
        file: UploadFile = File(...),
        model: str | None = Form(None),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
        target_language: str | None = Form(None),
    ) -> Any:
        from blsp.errors import BlspError
        from blsp.instructions import task_instruction

        target = (target_language or settings.translation_language).strip()
        try:
            instruction = task_instruction(f"st:{target}")
        except BlspError as e:
            raise ApiError(400, str(e), param="target_language") from e
        return await audio_task(
            request, file, model, response_format, temperature, instruction, "translate", target
        )

    return BodyLimitMiddleware(app, settings.max_body_bytes)


def serve(
    pipeline: Any,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(pipeline, settings)
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
        "serving %s on http://%s:%d/v1 (batch <= %d, wait %g ms)",
        settings.model_name,
        host,
        port,
        settings.max_batch_size,
        settings.batch_wait_ms,
    )
    server.run()
