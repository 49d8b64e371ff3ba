"""OpenAI API shapes: request parsing into BLSP conversations, responses, and errors.

Requests follow the OpenAI chat-completions and audio APIs so that existing clients (the
``openai`` package, curl examples) work unchanged. Audio comes as ``input_audio`` content parts
(``{"data": base64, "format": "wav"}``); ``audio_url`` parts (a vLLM extension) may be ``data:``
URLs, and only when the operator allows it a local path / ``file://`` URL or an http(s) URL.
Everything a client can get wrong becomes an ``ApiError`` with a 4xx status and a message that
names the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blsp.errors import AudioError, BlspError
from blsp.inference.audio_input import (
    AudioLimits,
    decode_audio_bytes,
    decode_base64_audio,
    read_audio_file,
)


class ApiError(Exception):
    """An error answered to the client in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ServerSettings:
    """What ``blsp serve`` allows and how it batches (see ``blsp serve --help``)."""

    model_name: str = "blsp"
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_body_mb: float = 25.0
    max_audio_seconds: float = 120.0
    max_tokens_limit: int = 512
    default_max_tokens: int = 256
    allow_local_files: str | None = None  # a folder root; "/" = anywhere; None = never
    allow_urls: bool = False
    url_timeout_s: float = 10.0
    translation_language: str = "German"
    max_queue: int = 256

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def audio_limits(self) -> AudioLimits:
        return AudioLimits(max_seconds=self.max_audio_seconds, max_bytes=self.max_body_bytes)


# ----------------------------------------------------------------------------- parameters
def check_model(requested: Any, settings: ServerSettings) -> None:
    if requested is None or requested == "":
        return
    if not isinstance(requested, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if requested != settings.model_name:
        raise ApiError(
            404,
            f"The model '{requested}' does not exist; this server serves '{settings.model_name}'",
            param="model",
            code="model_not_found",
        )


def generation_params(body: dict[str, Any], settings: ServerSettings) -> Any:
    """``GenerationParams`` from ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``."""
    from blsp.inference.generate import GenerationParams

    def number(name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ApiError(400, f"'{name}' must be a number, not {value!r}", param=name)
        if value < lo or value > hi or (lo_open and value == lo):
            bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
            raise ApiError(400, f"'{name}' is {value}; it must be in {bound}", param=name)
        return float(value)

    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{name}' must be a positive integer, not {max_tokens!r}", param=name)
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"'{name}' is {max_tokens}; this server allows at most {settings.max_tokens_limit} tokens per answer",
            param=name,
            code="max_tokens_exceeded",
        )
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, f"'n' is {n!r}; this server returns one choice (n=1)", param="n")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return GenerationParams(
        max_new_tokens=max_tokens,
        temperature=number("temperature", 0.0, 0.0, 2.0),
        top_p=number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=stops,
    )


# ----------------------------------------------------------------------------- audio sources
def _audio_from_url(url: str, where: str, settings: ServerSettings) -> Any:
    limits = settings.audio_limits
    if url.startswith("data:"):
        return decode_base64_audio(url, None, source=where, limits=limits)
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        if not settings.allow_urls:
            raise ApiError(
                400,
                f"{where}: fetching audio from URLs is disabled on this server (the operator can enable it "
                "with --allow-urls); send the audio inline as input_audio base64 data",
                param=where,
                code="url_not_allowed",
            )
        return _fetch(url, where, settings)
    if scheme in ("file", ""):
        if settings.allow_local_files is None:
            raise ApiError(
                400,
                f"{where}: reading local files is disabled on this server (the operator can enable it "
                "with --allow-local-files); send the audio inline as input_audio base64 data",
                param=where,
                code="local_files_not_allowed",
            )
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(url).path) if scheme == "file" else url).resolve()
        root = Path(settings.allow_local_files).resolve()
        if not path.is_relative_to(root):
            raise ApiError(
                403,
                f"{where}: {path} is outside the folder this server may read ({root})",
                param=where,
                code="local_files_not_allowed",
            )
        return read_audio_file(path, limits=limits)
    raise ApiError(
        400, f"{where}: unsupported URL scheme {scheme!r} (use data:, or input_audio)", param=where
    )


def _fetch(url: str, where: str, settings: ServerSettings) -> Any:
    import httpx

    limit = settings.max_body_bytes
    try:
        with httpx.stream("GET", url, timeout=settings.url_timeout_s, follow_redirects=False) as r:
            if r.status_code != 200:
                raise ApiError(400, f"{where}: fetching {url} answered HTTP {r.status_code}", param=where)
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"{where}: {url} is larger than {limit} bytes", param=where)
                chunks.append(chunk)
            ctype = r.headers.get("content-type", "")
    except httpx.HTTPError as e:
        raise ApiError(400, f"{where}: cannot fetch {url} ({e})", param=where) from e
    fmt = ctype if ctype.startswith("audio/") else None
    try:
        return decode_audio_bytes(b"".join(chunks), fmt, source=where, limits=settings.audio_limits)
    except AudioError:
        if fmt is None:
            raise
        return decode_audio_bytes(b"".join(chunks), None, source=where, limits=settings.audio_limits)


def _audio_part(part: dict[str, Any], where: str, settings: ServerSettings) -> Any:
    kind = part["type"]
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise ApiError(
                400, f"{where}.input_audio must be an object with 'data' and 'format'", param=where
            )
        data = spec.get("data")
        if not isinstance(data, str) or not data:
            raise ApiError(
                400,
                f"{where}.input_audio.data must be a non-empty base64 string",
                param=f"{where}.input_audio.data",
            )
        fmt = spec.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise ApiError(
                400, f"{where}.input_audio.format must be a string", param=f"{where}.input_audio.format"
            )
        return decode_base64_audio(data, fmt, source=f"{where}.input_audio", limits=settings.audio_limits)
    spec = part.get("audio_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}.audio_url must be an object with a 'url' string", param=where)
    return _audio_from_url(url, f"{where}.audio_url", settings)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(messages: Any, settings: ServerSettings) -> list[dict[str, Any]]:
    """OpenAI ``messages`` -> a BLSP conversation whose audio parts hold 16 kHz arrays.

    Raises ``ApiError`` (4xx) naming the field for anything malformed; audio errors keep the
    decoder's reason.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    conv: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = ROLES.get(msg.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise ApiError(
                400,
                f"{where}.role is {msg.get('role')!r}; supported roles: system, developer, user, assistant",
                param=f"{where}.role",
            )
        content = msg.get("content")
        if content is None:
            if role != "assistant":
                raise ApiError(400, f"{where}.content is missing", param=f"{where}.content")
            content = ""
        if isinstance(content, str):
            conv.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(
                400, f"{where}.content must be a string or a list of parts", param=f"{where}.content"
            )
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise ApiError(400, f"{pw}.text must be a string", param=f"{pw}.text")
                parts.append({"type": "text", "text": text})
            elif kind in ("input_audio", "audio_url"):
                if role != "user":
                    raise ApiError(400, f"{pw}: audio is accepted in user messages only", param=pw)
                try:
                    wav = _audio_part(part, pw, settings)
                except AudioError as e:
                    raise ApiError(400, str(e), param=pw, code="invalid_audio") from e
                parts.append({"type": "audio", "audio": wav})
            elif kind in ("image_url", "input_image", "file", "input_file"):
                raise ApiError(400, f"{pw}: this model accepts text and audio, not {kind}", param=pw)
            else:
                raise ApiError(
                    400, f"{pw}: unknown content part type {kind!r} (use text or input_audio)", param=pw
                )
        conv.append({"role": role, "content": parts})
    if conv[-1]["role"] == "assistant":
        raise ApiError(
            400, "the last message must not be an assistant message", param=f"messages[{len(conv) - 1}]"
        )
    return conv


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: Any) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def finish_reason(result: Any) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def completion(result: Any, model: str, cid: str | None = None) -> dict[str, Any]:
    return {
        "id": cid or new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(result),
    }


def chunk(
    cid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    with_usage: Any = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage is not None:
        out["choices"] = []
        out["usage"] = usage(with_usage)
    return out


def model_card(settings: ServerSettings, created: int) -> dict[str, Any]:
    return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "blsp"}


def as_api_error(e: BaseException) -> ApiError:
    """Map an exception from parsing or generation to the error a client gets."""
    if isinstance(e, ApiError):
        return e
    from blsp.serving.engine import QueueFullError

    if isinstance(e, QueueFullError):
        return ApiError(503, str(e), type="server_error", code="server_overloaded")
    if isinstance(e, AudioError):
        return ApiError(400, str(e), code="invalid_audio")
    if isinstance(e, BlspError):
        code = "context_length_exceeded" if "context window" in str(e) else None
        return ApiError(400, str(e), code=code)
    return ApiError(500, "internal error while generating; see the server log", type="server_error")
