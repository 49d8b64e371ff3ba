"""OpenAI API shapes: request parsing into BLSP conversations, responses, and errors.

Requests follow the OpenAI chat-completions and audio APIs so that existing clients (the
``openai`` package, curl examples) work unchanged. Audio comes as ``input_audio`` content parts
(``{"data": base64, "format": "wav"}``); ``audio_url`` parts (a vLLM extension) may be ``data:``
URLs, and only when the operator allows it a local path / ``file://`` URL or an http(s) URL.
Everything a client can get wrong becomes an ``ApiError`` with a 4xx status and a message that
names the field (and, for a limit, its flag).

Bodies are validated by strict pydantic models (``ChatRequest``, ``Message``, ``AudioForm``).
Messages are parsed in two steps: :func:`plan_messages` checks structure and budgets and turns
each audio part into an :class:`AudioRef` (encoded bytes, a URL, a path) without decoding;
:func:`load_audio` fetches, reads headers, checks every header-known budget for all clips and the
prompt length, and only then decodes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blsp.data.audio import (
    FFMPEG_FORMATS,
    SAMPLE_RATE,
    UNKNOWN_FRAMES,
    AudioLimits,
    decode_audio_bytes,
    normalize_format,
)
from blsp.errors import AudioError, BlspError
from blsp.inference.audio_input import base64_audio_bytes, read_audio_file
from blsp.models.prompt import ROLES as CONVERSATION_ROLES


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
    """What ``blsp serve`` allows and how it batches (see ``blsp serve --help`` and docs/SECURITY.md)."""

    model_name: str = "blsp"
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_body_mb: float = 25.0
    max_audio_seconds: float = 120.0
    max_tokens_limit: int = 512
    default_max_tokens: int = 256
    allow_local_files: str | None = None  # a folder root; None = never
    allow_urls: bool = False
    allow_private_urls: bool = False
    url_timeout_s: float = 10.0
    translation_language: str = "English"
    translation_source_language: str | None = None
    max_queue: int = 256
    # per-request budgets, checked before any audio is decoded
    max_messages: int = 64
    max_audio_parts: int = 8
    max_total_audio_seconds: float = 300.0
    max_text_chars: int = 100_000
    max_audio_samples: int = 16_000_000
    decode_workers: int = 2
    request_timeout_s: float = 300.0
    # access
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None  # None: no Host check
    cors_origins: tuple[str, ...] = ()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def audio_limits(self) -> AudioLimits:
        return AudioLimits(
            max_seconds=self.max_audio_seconds,
            max_bytes=self.max_body_bytes,
            max_samples=self.max_audio_samples,
        )


# ----------------------------------------------------------------------------- request models
class _Model(BaseModel):
    """Strict JSON types, finite numbers, no unknown fields: every malformed value is a 400 naming it."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class Message(_Model):
    """One chat message; ``content`` is checked by :func:`plan_messages` (a string or a list of parts)."""

    role: str
    content: Any = None
    name: str | None = None
    # Echoed back by clients that replay an assistant message; only empty values are accepted.
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None


# name -> (the values that mean "not used", why it is refused otherwise)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "this server returns one choice (n=1)"),
    "tools": ((None, []), "this model does not call tools"),
    "tool_choice": ((None, "none"), "this model does not call tools"),
    "functions": ((None, []), "this model does not call functions"),
    "function_call": ((None, "none"), "this model does not call functions"),
    "logprobs": ((None, False), "this server does not return log probabilities"),
    "top_logprobs": ((None, 0), "this server does not return log probabilities"),
    "response_format": ((None, {"type": "text"}), "this server answers plain text only"),
    "frequency_penalty": ((None, 0), "this server does not apply penalties"),
    "presence_penalty": ((None, 0), "this server does not apply penalties"),
    "logit_bias": ((None, {}), "this server does not apply logit biases"),
    "audio": ((None,), "this model answers text, not audio"),
    "modalities": ((None, ["text"]), "this model answers text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "this model has no reasoning effort setting"),
    "web_search_options": ((None,), "this server does not search the web"),
}


class ChatRequest(_Model):
    """The body of ``POST /v1/chat/completions``."""

    model: str | None = None
    messages: list[Message] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Any = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    # accepted and without effect on the answer
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # refused unless unused (UNSUPPORTED)
    n: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    def check_supported(self) -> None:
        """400 naming the first parameter that this server would otherwise ignore."""
        for name, (unused, why) in UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in unused:
                raise ApiError(
                    400,
                    f"'{name}' is {_short(value)}: not supported ({why}); leave it out",
                    param=name,
                    code="unsupported_parameter",
                )
        if self.seed is not None and self.temperature:
            raise ApiError(
                400,
                "'seed' is not supported when sampling (temperature > 0); leave it out",
                param="seed",
                code="unsupported_parameter",
            )


RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


class AudioForm(BaseModel):
    """The form fields of ``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (besides ``file``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    target_language: str | None = None  # translations: a target other than English (a BLSP extension)
    timestamp_granularities: list[str] | None = Field(None, alias="timestamp_granularities[]")
    stream: bool | None = None

    def check_supported(self) -> None:
        if self.response_format not in RESPONSE_FORMATS:
            raise ApiError(
                400,
                f"response_format {self.response_format!r} is not supported; use {', '.join(RESPONSE_FORMATS)}",
                param="response_format",
                code="unsupported_parameter",
            )
        if self.prompt:
            raise ApiError(
                400,
                "'prompt' is not supported (this model takes no transcription prompt); leave it out",
                param="prompt",
                code="unsupported_parameter",
            )
        if self.stream:
            raise ApiError(
                400,
                "'stream' is not supported for audio endpoints",
                param="stream",
                code="unsupported_parameter",
            )
        if self.timestamp_granularities and set(self.timestamp_granularities) - {"segment"}:
            raise ApiError(
                400,
                "timestamp_granularities: only 'segment' is supported (one segment covering the clip)",
                param="timestamp_granularities[]",
                code="unsupported_parameter",
            )


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def validation_error(e: ValidationError | list[dict[str, Any]], prefix: str = "") -> ApiError:
    """The first problem of a pydantic validation as a 400 naming the field."""
    errors = e.errors() if isinstance(e, ValidationError) else e
    first = errors[0] if errors else {}
    loc = tuple(x for x in first.get("loc", ()) if x != "body")
    where = prefix + _loc(loc) if loc else prefix or "request"
    if first.get("type") == "extra_forbidden":
        return ApiError(
            400,
            f"unrecognized request argument {where!r}: this server does not support it",
            param=where,
            code="unsupported_parameter",
        )
    return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A JSON object from a request body; malformed, too deep or out-of-range JSON is a 400."""
    try:
        body = pydantic_core.from_json(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_chat_request(body: dict[str, Any], settings: ServerSettings) -> ChatRequest:
    """Validate a chat-completions body; the message count is checked before anything else."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise budget_error(
            f"the request has {len(messages)} messages", settings.max_messages, "--max-messages", "messages"
        )
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e
    req.check_supported()
    return req


def budget_error(what: str, limit: Any, flag: str, param: str | None = None) -> ApiError:
    return ApiError(
        400,
        f"{what}; this server accepts at most {limit} ({flag})",
        param=param,
        code="request_too_large",
    )


# ----------------------------------------------------------------------------- parameters
def check_model(requested: Any, settings: ServerSettings) -> None:
    if requested is None or requested == "":
        return
    if not isinstance(requested, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if requested != settings.model_name:
        raise ApiError(
            404,
            f"The model {_short(requested)} does not exist; this server serves '{settings.model_name}'",
            param="model",
            code="model_not_found",
        )


def generation_params(body: ChatRequest | dict[str, Any], settings: ServerSettings) -> Any:
    """``GenerationParams`` from ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``."""
    from blsp.inference.generate import GenerationParams

    if isinstance(body, dict):
        try:
            body = ChatRequest.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from e
        body.check_supported()
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, name)
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    if max_tokens < 1:
        raise ApiError(400, f"'{name}' must be a positive integer, not {max_tokens!r}", param=name)
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"'{name}' is {_short(max_tokens)}; this server allows at most {settings.max_tokens_limit} tokens "
            "per answer (--max-tokens-limit)",
            param=name,
            code="max_tokens_exceeded",
        )
    stop = body.stop
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if sum(len(s) for s in stops) > 4096:
        raise ApiError(400, "'stop' strings are longer than 4096 characters together", param="stop")
    return GenerationParams(
        max_new_tokens=max_tokens,
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stops,
    )


# ----------------------------------------------------------------------------- audio sources
@dataclass
class AudioRef:
    """An audio part before decoding: where it comes from, and its header facts once known."""

    where: str
    data: bytes | None = None  # encoded audio
    fmt: str | None = None  # a format hint (name or MIME type)
    url: str | None = None  # http(s), fetched when loaded
    path: str | None = None  # a local file (``path[:start:num]``), checked against the root when loaded
    samplerate: int = 0
    channels: int = 0
    frames: int | None = None  # None: not known before decoding (ffmpeg formats, unreadable header)

    @property
    def seconds(self) -> float | None:
        return self.frames / self.samplerate if self.frames is not None and self.samplerate else None

    @property
    def samples_16k(self) -> int:
        """A lower bound on the 16 kHz samples it decodes to (0 when unknown)."""
        if self.frames is None or not self.samplerate:
            return 0
        return max(0, self.frames * SAMPLE_RATE // self.samplerate - 1)


def _source_ref(url: str, where: str, settings: ServerSettings) -> AudioRef:
    """An ``audio_url`` as a reference, refused at once when the server does not allow its kind."""
    if url.startswith("data:"):
        data, fmt = base64_audio_bytes(url, None, source=where, limits=settings.audio_limits)
        return AudioRef(where, data=data, fmt=fmt)
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
        return AudioRef(where, url=url)
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

        path = unquote(urlparse(url).path) if scheme == "file" else url
        if "\x00" in path:
            raise ApiError(400, f"{where}: the path contains a NUL character", param=where)
        return AudioRef(where, path=path)
    raise ApiError(
        400, f"{where}: unsupported URL scheme {scheme!r} (use data:, or input_audio)", param=where
    )


def local_file(ref: str, where: str, settings: ServerSettings) -> str:
    """``ref`` (``path[:start:num]``) resolved strictly under the allowed root; 403 for anything outside.

    The segment suffix is split off first, so the file itself is resolved; relative paths are
    relative to the root; a symlink whose target leaves the root is refused.
    """
    from blsp.data.audio import format_audio_ref, parse_audio_ref

    if settings.allow_local_files is None:
        raise ApiError(
            400, f"{where}: reading local files is disabled", param=where, code="local_files_not_allowed"
        )
    root = Path(settings.allow_local_files).resolve(strict=True)
    path, start, num = parse_audio_ref(ref)
    lexical = Path(os.path.normpath(root / path))
    outside = ApiError(
        403,
        f"{where}: {path} is outside the folder this server may read ({root})",
        param=where,
        code="local_files_not_allowed",
    )
    if not lexical.is_relative_to(root):
        raise outside
    try:
        real = lexical.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise ApiError(
            400, f"{where}: {path}: audio file not found", param=where, code="invalid_audio"
        ) from e
    if not real.is_relative_to(root):
        raise outside
    if not real.is_file():
        raise ApiError(400, f"{where}: {path}: not a regular file", param=where, code="invalid_audio")
    return format_audio_ref(real, start, num)


def _refuse_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def fetch(url: str, where: str, settings: ServerSettings) -> tuple[bytes, str | None]:
    """GET ``url`` within ``url_timeout_s`` in all (DNS, connect, every read), at most ``max_body_bytes``.

    Unless ``allow_private_urls``, every address the host resolves to must be public (not
    loopback, link-local, private, shared or reserved), and the request goes to the address that
    was checked, so a second DNS answer cannot point it elsewhere. Redirects are not followed.
    """
    try:
        return asyncio.run(asyncio.wait_for(_fetch(url, where, settings), settings.url_timeout_s))
    except TimeoutError as e:
        raise ApiError(
            400,
            f"{where}: fetching {_short(url)} took longer than {settings.url_timeout_s:g} s (--url-timeout-s)",
            param=where,
            code="url_timeout",
        ) from e


async def _fetch(url: str, where: str, settings: ServerSettings) -> tuple[bytes, str | None]:
    import socket
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    host, scheme = parts.hostname, parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise ApiError(400, f"{where}: invalid port in {_short(url)}", param=where) from e
    if not host:
        raise ApiError(400, f"{where}: the URL has no host", param=where)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ApiError(
            400, f"{where}: cannot resolve {host!r} ({e})", param=where, code="url_not_allowed"
        ) from e
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addrs:
        raise ApiError(400, f"{where}: {host!r} has no address", param=where)
    if not settings.allow_private_urls:
        for ip in addrs:
            if _refuse_address(ip):
                raise ApiError(
                    400,
                    f"{where}: {host!r} resolves to {ip}, a loopback, link-local or private address; this "
                    "server fetches public addresses only (the operator can allow others with "
                    "--allow-private-urls)",
                    param=where,
                    code="url_not_allowed",
                )
    ip = addrs[0]
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    pinned = parts._replace(netloc=netloc).geturl()
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    limit = settings.max_body_bytes
    try:
        async with (
            httpx.AsyncClient(trust_env=False, follow_redirects=False) as client,
            client.stream(
                "GET",
                pinned,
                headers={"Host": host_header},
                extensions={"sni_hostname": host} if scheme == "https" else {},
            ) as r,
        ):
            if r.status_code != 200:
                raise ApiError(
                    400, f"{where}: fetching {_short(url)} answered HTTP {r.status_code}", param=where
                )
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"{where}: {_short(url)} is larger than {limit} bytes", param=where)
                chunks.append(chunk)
            ctype = r.headers.get("content-type", "")
    except httpx.HTTPError as e:
        raise ApiError(400, f"{where}: cannot fetch {_short(url)} ({e})", param=where) from e
    return b"".join(chunks), ctype if ctype.startswith("audio/") else None


def _input_audio_ref(part: dict[str, Any], where: str, settings: ServerSettings) -> AudioRef:
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
        source = f"{where}.input_audio"
        normalize_format(fmt, source)
        raw, fmt = base64_audio_bytes(data, fmt, source=source, limits=settings.audio_limits)
        return AudioRef(source, data=raw, fmt=fmt)
    spec = part.get("audio_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}.audio_url must be an object with a 'url' string", param=where)
    return _source_ref(url, f"{where}.audio_url", settings)


#: OpenAI roles -> conversation roles (``developer`` is the newer name of ``system``)
ROLES = {**{r: r for r in CONVERSATION_ROLES}, "developer": "system"}


def plan_messages(messages: Any, settings: ServerSettings) -> tuple[list[dict[str, Any]], list[AudioRef]]:
    """OpenAI ``messages`` -> a BLSP conversation whose audio parts hold ``AudioRef``s (nothing decoded).

    Checks the structure and the message, audio-part and text budgets; raises ``ApiError`` (4xx)
    naming the field.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > settings.max_messages:
        raise budget_error(
            f"the request has {len(messages)} messages", settings.max_messages, "--max-messages", "messages"
        )
    conv: list[dict[str, Any]] = []
    refs: list[AudioRef] = []
    chars = 0
    for i, raw in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(raw, Message):
            msg = raw
        else:
            if not isinstance(raw, dict):
                raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
            try:
                msg = Message.model_validate(raw)
            except ValidationError as e:
                raise validation_error(e, prefix=where + ".") from e
        role = ROLES.get(msg.role)
        if role is None:
            raise ApiError(
                400,
                f"{where}.role is {_short(msg.role)}; supported roles: system, developer, user, assistant",
                param=f"{where}.role",
            )
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(msg, name):
                raise ApiError(
                    400,
                    f"{where}.{name} is not supported by this server",
                    param=f"{where}.{name}",
                    code="unsupported_parameter",
                )
        content = msg.content
        if content is None:
            if role != "assistant":
                raise ApiError(400, f"{where}.content is missing", param=f"{where}.content")
            content = ""
        if isinstance(content, str):
            chars += len(content)
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
                chars += len(text)
                parts.append({"type": "text", "text": text})
            elif kind in ("input_audio", "audio_url"):
                if role != "user":
                    raise ApiError(400, f"{pw}: audio is accepted in user messages only", param=pw)
                if len(refs) >= settings.max_audio_parts:
                    raise budget_error(
                        "the request has more audio parts than allowed",
                        f"{settings.max_audio_parts} audio parts",
                        "--max-audio-parts",
                        pw,
                    )
                try:
                    ref = _input_audio_ref(part, pw, settings)
                except AudioError as e:
                    raise ApiError(400, str(e), param=pw, code="invalid_audio") from e
                refs.append(ref)
                parts.append({"type": "audio", "audio": ref})
            elif kind in ("image_url", "input_image", "file", "input_file"):
                raise ApiError(400, f"{pw}: this model accepts text and audio, not {kind}", param=pw)
            else:
                raise ApiError(
                    400, f"{pw}: unknown content part type {_short(kind)} (use text or input_audio)", param=pw
                )
        conv.append({"role": role, "content": parts})
        if chars > settings.max_text_chars:
            break
    if chars > settings.max_text_chars:
        raise budget_error(
            f"the request's text is over {settings.max_text_chars} characters",
            f"{settings.max_text_chars} characters of text",
            "--max-text-chars",
            "messages",
        )
    if conv[-1]["role"] == "assistant":
        raise ApiError(
            400, "the last message must not be an assistant message", param=f"messages[{len(conv) - 1}]"
        )
    return conv, refs


def _read_header(ref: AudioRef) -> None:
    """Fill in the header facts of ``ref`` (only the header is read; unknown stays None)."""
    from blsp.data.audio import FFMPEG_EXTENSIONS, audio_bytes_info, audio_info

    try:
        if ref.data is not None:
            fmt = normalize_format(ref.fmt, ref.where)
            info = None if fmt in FFMPEG_FORMATS else audio_bytes_info(ref.data, ref.where)
        else:
            info = (
                None
                if Path(ref.path or "").suffix.lower() in FFMPEG_EXTENSIONS
                else audio_info(ref.path or "")
            )
    except AudioError:
        info = None  # the decoder says why
    if info is not None and info.samplerate > 0 and 0 <= info.frames < UNKNOWN_FRAMES:
        ref.samplerate, ref.channels, ref.frames = info.samplerate, max(1, info.channels), info.frames


def _check_total(seconds: float, settings: ServerSettings) -> None:
    if seconds > settings.max_total_audio_seconds + 1e-6:
        raise budget_error(
            f"the request's audio is {seconds:.1f} s in all",
            f"{settings.max_total_audio_seconds:g} s of audio per request",
            "--max-total-audio-seconds",
            "messages",
        )


def _with_samples(conv: list[dict[str, Any]], samples: dict[int, int]) -> list[dict[str, Any]]:
    def part(p: dict[str, Any]) -> dict[str, Any]:
        if p.get("type") == "audio":
            return {"type": "audio", "samples": samples[id(p["audio"])]}
        return p

    return [
        m if isinstance(m["content"], str) else {**m, "content": [part(p) for p in m["content"]]}
        for m in conv
    ]


def load_audio(
    conv: list[dict[str, Any]],
    refs: list[AudioRef],
    settings: ServerSettings,
    check_prompt: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Fetch, budget-check and decode the audio of a planned conversation (blocking: run it off the loop).

    Every budget that a header can tell (per clip: seconds and ``channels x frames``; per request:
    total seconds; the prompt's length against the context window, via ``check_prompt`` on a
    conversation whose audio parts are ``{"type": "audio", "samples": n}``) is checked for all
    clips before the first one is decoded; the totals are checked again on the decoded lengths.
    """
    limits = settings.audio_limits
    for ref in refs:
        if ref.url is not None:
            ref.data, ref.fmt = fetch(ref.url, ref.where, settings)
        elif ref.path is not None:
            ref.path = local_file(ref.path, ref.where, settings)
        _read_header(ref)
        if ref.seconds is not None and ref.seconds > settings.max_audio_seconds + 1e-6:
            raise ApiError(
                400,
                f"{ref.where}: audio is {ref.seconds:.1f} s long; the limit is {settings.max_audio_seconds:g} s "
                "(--max-audio-seconds)",
                param=ref.where,
                code="audio_too_long",
            )
        if ref.frames is not None and ref.channels * ref.frames > settings.max_audio_samples:
            raise ApiError(
                400,
                f"{ref.where}: audio would decode to {ref.channels} channels x {ref.frames} frames at "
                f"{ref.samplerate} Hz = {ref.channels * ref.frames} samples; this server decodes at most "
                f"{settings.max_audio_samples} samples per clip (--max-audio-samples)",
                param=ref.where,
                code="audio_too_large",
            )
    _check_total(sum(r.seconds or 0.0 for r in refs), settings)
    if check_prompt is not None:
        check_prompt(_with_samples(conv, {id(r): r.samples_16k for r in refs}))
    wavs: dict[int, Any] = {}
    for ref in refs:
        try:
            if ref.data is not None:
                wav = decode_audio_bytes(ref.data, ref.fmt, source=ref.where, limits=limits)
            else:
                wav = read_audio_file(ref.path or "", limits=limits)
        except AudioError as e:
            msg = str(e) if str(e).startswith(ref.where) else f"{ref.where}: {e}"
            raise ApiError(400, msg, param=ref.where, code="invalid_audio") from e
        wavs[id(ref)] = wav
    _check_total(sum(len(w) for w in wavs.values()) / SAMPLE_RATE, settings)
    if check_prompt is not None and any(r.frames is None for r in refs):
        check_prompt(_with_samples(conv, {k: len(w) for k, w in wavs.items()}))

    def part(p: dict[str, Any]) -> dict[str, Any]:
        return {"type": "audio", "audio": wavs[id(p["audio"])]} if p.get("type") == "audio" else p

    return [
        m if isinstance(m["content"], str) else {**m, "content": [part(p) for p in m["content"]]}
        for m in conv
    ]


def parse_messages(
    messages: Any,
    settings: ServerSettings,
    check_prompt: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> list[dict[str, Any]]:
    """OpenAI ``messages`` -> a BLSP conversation whose audio parts hold 16 kHz arrays.

    :func:`plan_messages` then :func:`load_audio`; raises ``ApiError`` (4xx) naming the field for
    anything malformed or over a budget; audio errors keep the decoder's reason.
    """
    conv, refs = plan_messages(messages, settings)
    return load_audio(conv, refs, settings, check_prompt)


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
    from blsp.serving.engine import EngineUnavailable, QueueFullError

    if isinstance(e, QueueFullError):
        return ApiError(503, str(e), type="server_error", code="server_overloaded")
    if isinstance(e, EngineUnavailable):
        return ApiError(503, str(e), type="server_error", code="engine_unavailable")
    if isinstance(e, AudioError):
        return ApiError(400, str(e), code="invalid_audio")
    if isinstance(e, BlspError):
        code = "context_length_exceeded" if "context window" in str(e) else None
        return ApiError(400, str(e), param="messages" if code else None, code=code)
    return ApiError(500, "internal error while generating; see the server log", type="server_error")
