"""OpenAI API shapes: request schemas and validation, parameters, and errors.

Requests follow the OpenAI chat-completions and audio APIs so that existing clients (the
``openai`` package, curl examples) work unchanged. Everything a client can get wrong becomes an
``ApiError`` with a 4xx status and a message that names the field (and, for a limit, its flag).
Bodies are validated by strict pydantic models (``ChatRequest``, ``Message``, ``AudioForm``).

The rest of the request path lives beside it: ``blsp.serving.messages`` turns ``messages`` into a
BLSP conversation, ``blsp.serving.audio_sources`` fetches, budget-checks and decodes the audio
parts, ``blsp.serving.responses`` builds the answers, ``blsp.serving.server`` routes them.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blsp.errors import AudioError, BlspError
from blsp.serving.settings import ServerSettings


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
                    f"'{name}' is {short_repr(value)}: not supported ({why}); leave it out",
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


def short_repr(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters, for error messages."""
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
            f"The model {short_repr(requested)} does not exist; this server serves '{settings.model_name}'",
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
            f"'{name}' is {short_repr(max_tokens)}; this server allows at most {settings.max_tokens_limit} tokens "
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
