"""Malformed requests get 4xx in the OpenAI error shape, with a message, and the server keeps serving."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.slow


def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(
        buf, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16"
    )
    return buf.getvalue()


def chat(model: str, part: dict, **extra) -> dict:
    return {
        "model": model,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Repeat."}, part]}],
        **extra,
    }


def input_audio(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_malformed_requests_are_refused_and_the_server_keeps_serving(server, tmp_path):
    good = wav_bytes(1.0)
    m = server.model
    cases = {
        "bad base64": (chat(m, input_audio("@@@ this is not base64 @@@")), 400, "invalid base64"),
        "truncated wav": (chat(m, input_audio(b64(good[: len(good) // 2]))), 400, "truncated WAV"),
        "wav header only": (chat(m, input_audio(b64(good[:40]))), 400, "cannot decode audio"),
        "unknown format": (chat(m, input_audio(b64(good), "xyz")), 400, "unknown audio format 'xyz'"),
        "audio over the limit": (
            chat(m, input_audio(b64(wav_bytes(12.0)))),
            400,
            "12.0 s long; the limit is 10 s",
        ),
        "file url": (
            chat(m, {"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}),
            400,
            "reading local files is disabled",
        ),
        "plain path": (
            chat(m, {"type": "audio_url", "audio_url": {"url": "/etc/passwd"}}),
            400,
            "reading local files is disabled",
        ),
        "http url": (
            chat(m, {"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:9/a.wav"}}),
            400,
            "fetching audio from URLs is disabled",
        ),
        "path as base64": (chat(m, input_audio("file:///etc/passwd")), 400, "invalid base64"),
        "unknown model": (chat("gpt-4o-audio", input_audio(b64(good))), 404, "does not exist"),
        "too many tokens": (chat(m, input_audio(b64(good)), max_tokens=10_000), 400, "at most 24 tokens"),
        "image part": (chat(m, {"type": "image_url", "image_url": {"url": "x"}}), 400, "not image_url"),
        "bad role": ({"model": m, "messages": [{"role": "tool", "content": "x"}]}, 400, "supported roles"),
        "n > 1": (chat(m, input_audio(b64(good)), n=3), 400, "one choice"),
    }
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for name, (body, status, needle) in cases.items():
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
            err = r.json()["error"]
            assert needle in err["message"], f"{name}: {err}"
            assert err["type"] and "param" in err and "code" in err

        # 10x the 1 MB body limit: 413 without reading it into memory, declared or streamed.
        big = b"x" * (10 * 1024 * 1024)
        r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "at most 1048576 bytes" in r.json()["error"]["message"]
        r = http.post(
            "/v1/chat/completions",
            content=(big[i : i + 65536] for i in range(0, len(big), 65536)),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        r = http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = http.post(
            "/v1/audio/transcriptions", files={"file": ("a.wav", good[:100], "audio/wav")}, data={"model": m}
        )
        assert r.status_code == 400 and "file 'a.wav': truncated WAV" in r.json()["error"]["message"]
        r = http.post("/v1/audio/transcriptions", data={"model": m})
        assert r.status_code == 400 and "file" in r.json()["error"]["message"]
        r = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", good, "audio/wav")},
            data={"model": m, "response_format": "xml"},
        )
        assert r.status_code == 400 and "xml" in r.json()["error"]["message"]
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()

        # Still serving.
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/v1/chat/completions", json=chat(m, input_audio(b64(good))))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    assert server.proc.poll() is None
