"""OpenAI ``messages`` -> BLSP conversations, in two steps.

:func:`plan_messages` checks the structure and the message, audio-part and text budgets and turns
each audio part into an :class:`~blsp.serving.audio_sources.AudioRef` without decoding;
:func:`parse_messages` then runs :func:`~blsp.serving.audio_sources.fetch_audio` on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from blsp.errors import AudioError
from blsp.models.prompt import ROLES as CONVERSATION_ROLES
from blsp.serving.audio_sources import AudioRef, fetch_audio, input_audio_ref
from blsp.serving.openai_api import (
    ApiError,
    Message,
    ServerSettings,
    budget_error,
    short_repr,
    validation_error,
)

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
                f"{where}.role is {short_repr(msg.role)}; supported roles: system, developer, user, assistant",
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
                    ref = input_audio_ref(part, pw, settings)
                except AudioError as e:
                    raise ApiError(400, str(e), param=pw, code="invalid_audio") from e
                refs.append(ref)
                parts.append({"type": "audio", "audio": ref})
            elif kind in ("image_url", "input_image", "file", "input_file"):
                raise ApiError(400, f"{pw}: this model accepts text and audio, not {kind}", param=pw)
            else:
                raise ApiError(
                    400,
                    f"{pw}: unknown content part type {short_repr(kind)} (use text or input_audio)",
                    param=pw,
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


def parse_messages(
    messages: Any,
    settings: ServerSettings,
    check_prompt: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> list[dict[str, Any]]:
    """OpenAI ``messages`` -> a BLSP conversation whose audio parts hold 16 kHz arrays.

    :func:`plan_messages` then :func:`fetch_audio`; raises ``ApiError`` (4xx) naming the field for
    anything malformed or over a budget; audio errors keep the decoder's reason.
    """
    conv, refs = plan_messages(messages, settings)
    return fetch_audio(conv, refs, settings, check_prompt)
