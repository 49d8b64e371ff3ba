"""The answers of ``blsp serve`` in the OpenAI shapes: chat completions, stream chunks, models, audio."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi.responses import PlainTextResponse

from blsp.serving.openai_api import AudioForm
from blsp.serving.settings import ServerSettings


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


def timestamp(seconds: float, sep: str) -> str:
    """``HH:MM:SS`` + ``sep`` + milliseconds, as in SRT (``,``) and WebVTT (``.``)."""
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
        return PlainTextResponse(f"1\n{timestamp(0, ',')} --> {timestamp(duration, ',')}\n{text}\n\n")
    if fmt == "vtt":
        return PlainTextResponse(
            f"WEBVTT\n\n{timestamp(0, '.')} --> {timestamp(duration, '.')}\n{text}\n\n",
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
