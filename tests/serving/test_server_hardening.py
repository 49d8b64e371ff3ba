"""Hostile requests against a real `blsp serve` on loopback: budgets, one error shape, access, liveness.

Each hostile request gets a 4xx (or 5xx) in the OpenAI error shape, naming the limit, and the
server then still answers a normal request. A decompression bomb and many long clips are refused
from their headers, quickly, without the server's peak memory growing.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from blsp.errors import BlspError
from blsp.serving.messages import parse_messages
from blsp.serving.openai_api import ApiError
from blsp.serving.settings import ServerSettings

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ----------------------------------------------------------------------------- audio
def wav_bytes(seconds: float, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def silent_flac(seconds: float, sr: int = 16000, channels: int = 1) -> bytes:
    """Silence as FLAC: constant subframes, so hours of many-channel audio fit in a few hundred KB."""
    buf = io.BytesIO()
    block = np.zeros((sr, channels), dtype=np.int16)
    with sf.SoundFile(buf, "w", samplerate=sr, channels=channels, format="FLAC", subtype="PCM_16") as f:
        whole, rest = divmod(int(seconds * sr), sr)
        for _ in range(whole):
            f.write(block)
        f.write(block[:rest])
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def chat(model: str, *parts: dict, text: str = "Repeat.", **extra) -> dict:
    return {
        "model": model,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}],
        **extra,
    }


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def assert_openai_error(r: httpx.Response, status: int, needle: str, name: str) -> dict:
    assert r.status_code == status, f"{name}: {r.status_code} {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json"), f"{name}: {r.headers}"
    body = r.json()
    assert set(body) == {"error"}, f"{name}: {body}"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"{name}: {err}"
    assert needle in err["message"], f"{name}: {err}"
    return err


def serve_args(adapter, *extra: str) -> list[str]:
    return ["serve", str(adapter), "--device", "cpu", "--max-tokens-limit", "24", *extra]


def normal_request_works(http: httpx.Client, model: str, good: bytes) -> None:
    r = http.post("/v1/chat/completions", json=chat(model, audio_part(good)), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


# ----------------------------------------------------------------------------- the server
@pytest.mark.slow
def test_hostile_requests_get_openai_errors_and_the_server_keeps_serving(launch, real_adapter_dir, tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    good = wav_bytes(1.0)
    (root / "a.wav").write_bytes(good)
    (tmp_path / "secret.wav").write_bytes(good)
    os.symlink(tmp_path / "secret.wav", root / "link.wav")  # a symlink leaving the root
    run = launch(
        serve_args(
            real_adapter_dir,
            "--api-key",
            KEY,
            "--max-body-mb",
            "4",
            "--max-messages",
            "8",
            "--max-audio-parts",
            "3",
            "--max-total-audio-seconds",
            "200",
            "--max-text-chars",
            "60000",
            "--allow-local-files",
            "--local-files-root",
            str(root),
            "--allow-urls",
            "--cors-allow-origin",
            "http://app.example",
        ),
        "/health",
        tmp_path / "serve.log",
    )
    m = real_adapter_dir.name
    port = run.url.rsplit(":", 1)[1]
    deep = "[" * 100_000 + "]" * 100_000
    url_part = lambda url: {"type": "audio_url", "audio_url": {"url": url}}  # noqa: E731
    json_cases = {
        # type confusion and non-finite numbers: validated at the boundary
        "role as a list": ({"model": m, "messages": [{"role": ["user"], "content": "x"}]}, 400, "role"),
        "top_p NaN": ('{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400, "top_p"),
        "temperature NaN": (
            '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            400,
            "finite",
        ),
        "temperature Infinity": (
            '{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
            400,
            "temperature",
        ),
        "stream_options not an object": (chat(m, stream=True, stream_options="yes"), 400, "stream_options"),
        "stream not a bool": (chat(m, stream="yes"), 400, "stream"),
        "5000-digit integer": ('{"messages": [], "max_tokens": ' + "9" * 5000 + "}", 400, "not valid JSON"),
        "huge max_tokens": (chat(m, max_tokens=10**30), 400, "at most 24 tokens"),
        "deeply nested JSON": ('{"messages": ' + deep + "}", 400, "not valid JSON"),
        "lone surrogate": ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "not valid JSON"),
        "content a number": ({"model": m, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
        "part not an object": (
            {"model": m, "messages": [{"role": "user", "content": [5]}]},
            400,
            "unknown content part",
        ),
        # parameters the server does not implement: named, not ignored
        "tools": (chat(m, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "'tools'"),
        "tool_choice": (chat(m, tool_choice="auto"), 400, "'tool_choice'"),
        "response_format": (chat(m, response_format={"type": "json_object"}), 400, "'response_format'"),
        "logprobs": (chat(m, logprobs=True), 400, "'logprobs'"),
        "n": (chat(m, n=2), 400, "one choice"),
        "frequency_penalty": (chat(m, frequency_penalty=0.5), 400, "'frequency_penalty'"),
        "unknown argument": (chat(m, top_k=5), 400, "unrecognized request argument 'top_k'"),
        "tool_calls in a message": (
            {
                "model": m,
                "messages": [
                    {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                    {"role": "user", "content": "x"},
                ],
            },
            400,
            "tool_calls",
        ),
        # budgets, each naming its flag
        "too many messages": (
            {"model": m, "messages": [{"role": "user", "content": "x"}] * 9},
            400,
            "--max-messages",
        ),
        "too much text": (chat(m, text="x" * 60_001), 400, "--max-text-chars"),
        "too many audio parts": (chat(m, *[audio_part(good)] * 4), 400, "--max-audio-parts"),
        "over the context window": (
            chat(m, audio_part(good), text=" ".join(f"w{i}" for i in range(12_000))[:59_000]),
            400,
            "context window",
        ),
        # sources
        "NUL in a path": (chat(m, url_part(str(root / "a\x00.wav"))), 400, "NUL"),
        "path outside the root": (
            chat(m, url_part(str(root / ".." / "secret.wav"))),
            403,
            "outside the folder",
        ),
        "symlink leaving the root": (chat(m, url_part(str(root / "link.wav"))), 403, "outside the folder"),
        "symlink with a segment": (
            chat(m, url_part(f"{root / 'link.wav'}:0:8000")),
            403,
            "outside the folder",
        ),
        "/etc/passwd": (chat(m, url_part("file:///etc/passwd")), 403, "outside the folder"),
        "loopback URL": (
            chat(m, url_part(f"http://127.0.0.1:{port}/health")),
            400,
            "loopback, link-local or private",
        ),
        "localhost URL": (
            chat(m, url_part("http://localhost/a.wav")),
            400,
            "loopback, link-local or private",
        ),
        "metadata URL": (
            chat(m, url_part("http://169.254.169.254/latest")),
            400,
            "loopback, link-local or private",
        ),
        "private URL": (chat(m, url_part("http://10.1.2.3/a.wav")), 400, "loopback, link-local or private"),
        "IPv6 loopback URL": (
            chat(m, url_part("http://[::1]/a.wav")),
            400,
            "loopback, link-local or private",
        ),
    }
    with httpx.Client(base_url=run.url, timeout=120) as http:
        # Authentication: every /v1 route, 401 in the OpenAI shape; /health stays open.
        err = assert_openai_error(http.get("/v1/models"), 401, "API key", "no key")
        assert err["code"] == "invalid_api_key"
        assert_openai_error(
            http.post("/v1/chat/completions", json=chat(m), headers={"Authorization": "Bearer wrong"}),
            401,
            "Incorrect API key",
            "wrong key",
        )
        assert_openai_error(
            http.post("/v1/audio/transcriptions", files={"file": ("a.wav", good)}),
            401,
            "API key",
            "no key, audio",
        )
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == m

        # Host header allow-list (DNS rebinding): loopback names with any port pass, others do not.
        err = assert_openai_error(
            http.get("/v1/models", headers={**AUTH, "Host": "evil.example"}), 400, "not allowed", "host"
        )
        assert err["code"] == "invalid_host"
        for host in (f"localhost:{port}", "127.0.0.1:1", "[::1]:8000"):
            assert http.get("/v1/models", headers={**AUTH, "Host": host}).status_code == 200, host

        # CORS: only the origin the operator named.
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        r = http.options("/v1/chat/completions", headers={"Origin": "http://app.example", **pre})
        assert r.headers.get("access-control-allow-origin") == "http://app.example"
        r = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert "access-control-allow-origin" not in r.headers

        for name, (body, status, needle) in json_cases.items():
            t0 = time.perf_counter()
            if isinstance(body, str):
                r = http.post(
                    "/v1/chat/completions",
                    content=body.encode(),
                    headers={**AUTH, "content-type": "application/json"},
                )
            else:
                r = http.post("/v1/chat/completions", json=body, headers=AUTH)
            assert_openai_error(r, status, needle, name)
            assert time.perf_counter() - t0 < 30, name
        assert http.get("/health").json()["status"] == "ok"

        # A file under the root, with a segment, is read.
        r = http.post(
            "/v1/chat/completions", json=chat(m, url_part(f"{root / 'a.wav'}:0:8000")), headers=AUTH
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 0

        # Audio endpoints: srt / vtt / verbose_json give one segment covering the clip; translations
        # go into English unless another target is asked for; unsupported fields are named.
        def audio(path: str, **data):
            return http.post(
                path, files={"file": ("a.wav", good, "audio/wav")}, data={"model": m, **data}, headers=AUTH
            )

        r = audio("/v1/audio/transcriptions", response_format="srt")
        assert r.status_code == 200, r.text
        assert r.text.startswith("1\n00:00:00,000 --> 00:00:01,000\n"), r.text
        r = audio("/v1/audio/transcriptions", response_format="vtt")
        assert r.status_code == 200 and r.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n"), r.text
        r = audio("/v1/audio/transcriptions", response_format="verbose_json")
        seg = r.json()["segments"]
        assert len(seg) == 1 and seg[0]["start"] == 0 and seg[0]["end"] == 1.0
        r = audio("/v1/audio/translations", response_format="verbose_json")
        assert r.status_code == 200 and r.json()["language"] == "english", r.text
        r = audio("/v1/audio/translations", response_format="verbose_json", target_language="German")
        assert r.status_code == 200 and r.json()["language"] == "german", r.text
        for name, data, needle in [
            ("unknown target", {"target_language": "Klingon"}, "unknown language"),
            ("same languages", {"language": "en"}, "both English"),
            ("prompt", {"prompt": "hello"}, "'prompt'"),
            ("format", {"response_format": "xml"}, "xml"),
            ("temperature NaN", {"temperature": "nan"}, "temperature"),
            ("word timestamps", {"timestamp_granularities[]": "word"}, "segment"),
            ("unknown field", {"foo": "1"}, "unrecognized request argument 'foo'"),
        ]:
            assert_openai_error(audio("/v1/audio/translations", **data), 400, needle, name)

        # Unknown route and method: the same shape.
        assert_openai_error(http.get("/v1/nothing", headers=AUTH), 404, "Not Found", "404")
        assert_openai_error(http.get("/v1/chat/completions", headers=AUTH), 405, "Method Not Allowed", "405")

        assert http.get("/health").json()["status"] == "ok"
        normal_request_works(http, m, good)
    assert run.proc.poll() is None


@pytest.mark.slow
def test_decompression_bomb_and_many_long_clips_are_refused_quickly(launch, real_adapter_dir, tmp_path):
    run = launch(
        serve_args(
            real_adapter_dir, "--api-key", KEY, "--max-audio-parts", "3", "--max-total-audio-seconds", "200"
        ),
        "/health",
        tmp_path / "serve.log",
    )
    m = real_adapter_dir.name
    # 8 channels at 384 kHz for 119 s (under the 120 s clip limit): ~0.4 MB of FLAC that decodes to
    # 365 M samples (1.5 GB of float32 even when cut at the clip limit).
    bomb = silent_flac(119, sr=384_000, channels=8)
    hours = silent_flac(2 * 3600)  # mono 16 kHz silence, two hours
    long_clip = silent_flac(110)
    assert len(bomb) < 1_000_000 and len(hours) < 2_000_000, (len(bomb), len(hours))
    good = wav_bytes(1.0)
    cases = {
        "many-channel high-rate bomb": (chat(m, audio_part(bomb, "flac")), "--max-audio-samples"),
        "bomb declared as wav": (chat(m, audio_part(bomb, "wav")), "--max-audio-samples"),
        "two hours of silence": (chat(m, audio_part(hours, "flac")), "--max-audio-seconds"),
        "four long clips": (chat(m, *[audio_part(long_clip, "flac")] * 4), "--max-audio-parts"),
        "two long clips": (chat(m, *[audio_part(long_clip, "flac")] * 2), "--max-total-audio-seconds"),
    }
    with httpx.Client(base_url=run.url, timeout=120) as http:
        normal_request_works(http, m, good)  # the steady state's peak
        before = peak_rss_mb(run.proc.pid)
        for name, (body, needle) in cases.items():
            t0 = time.perf_counter()
            r = http.post("/v1/chat/completions", json=body, headers=AUTH)
            took = time.perf_counter() - t0
            assert_openai_error(r, 400, needle, name)
            print(f"{name}: refused in {took:.2f} s: {r.json()['error']['message']}")
            assert took < 10, f"{name} took {took:.1f} s"
        r = http.post(
            "/v1/audio/transcriptions", files={"file": ("b.flac", bomb)}, data={"model": m}, headers=AUTH
        )
        assert_openai_error(r, 400, "--max-audio-samples", "bomb upload")
        after = peak_rss_mb(run.proc.pid)
        print(f"server peak RSS (VmHWM): {before:.0f} MB before the hostile requests, {after:.0f} MB after")
        assert after - before < 300, (before, after)
        normal_request_works(http, m, good)


@pytest.mark.slow
def test_deadline_and_disconnected_clients_free_their_slots(launch, real_adapter_dir, tmp_path):
    # Every job waits 2.5 s for batch company, longer than the 1 s deadline.
    run = launch(
        serve_args(real_adapter_dir, "--batch-wait-ms", "2500", "--request-timeout-s", "1"),
        "/health",
        tmp_path / "serve.log",
    )
    m = real_adapter_dir.name
    good = wav_bytes(1.0)
    with httpx.Client(base_url=run.url, timeout=60) as http:
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", json=chat(m, audio_part(good)))
        err = assert_openai_error(r, 504, "--request-timeout-s", "deadline")
        assert err["code"] == "timeout" and time.perf_counter() - t0 < 5
        r = http.post("/v1/chat/completions", json=chat(m, audio_part(good), stream=True))
        assert_openai_error(r, 504, "--request-timeout-s", "deadline, streamed")
        time.sleep(3)
        stats = http.get("/health").json()["engine"]
        assert stats["queued"] == 0 and stats["jobs_done"] == 0, stats
        assert stats["jobs_cancelled"] >= 2, stats
        cancelled = stats["jobs_cancelled"]

    # Clients that go away while queued (streamed or not): their jobs are dropped, never run.
    for stream in (False, True):
        with pytest.raises(httpx.TimeoutException), httpx.Client(base_url=run.url, timeout=0.4) as gone:
            gone.post("/v1/chat/completions", json=chat(m, audio_part(good), stream=stream))
    time.sleep(3.5)
    stats = httpx.get(run.url + "/health").json()["engine"]
    assert stats["queued"] == 0 and stats["jobs_done"] == 0 and stats["jobs_cancelled"] >= cancelled + 2, (
        stats
    )
    assert run.proc.poll() is None


# ----------------------------------------------------------------------------- in-process
def test_a_dead_worker_fails_waiting_and_new_requests_fast(tiny_model):
    import asyncio

    from blsp.inference.generate import GenerationParams
    from blsp.inference.pipeline import SpeechPipeline
    from blsp.serving.engine import BatchEngine, EngineUnavailable

    engine = BatchEngine(SpeechPipeline(tiny_model), batch_wait_ms=200)

    def crash(batch):  # fault injection: the worker thread itself fails
        raise SystemExit("boom")

    engine._run_batch = crash  # type: ignore[method-assign]
    engine.start()

    async def main():
        job = engine.submit([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=2))
        with pytest.raises(EngineUnavailable, match="died"):
            await asyncio.wait_for(job.future, 10)
        t0 = time.perf_counter()
        with pytest.raises(EngineUnavailable, match="not running"):
            engine.submit([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=2))
        assert time.perf_counter() - t0 < 0.1

    asyncio.run(main())
    assert not engine.alive and engine.stats()["alive"] is False


def test_prompt_length_from_sample_counts_equals_the_featurised_one(tiny_model):
    from blsp.inference.generate import context_window, prepare_conversation
    from blsp.inference.pipeline import SpeechPipeline
    from blsp.serving.engine import BatchEngine

    engine = BatchEngine(SpeechPipeline(tiny_model))
    for seconds in (0.5, 1.0, 3.7):
        n = int(seconds * 16000)
        wav = (np.random.default_rng(0).standard_normal(n) * 0.1).astype(np.float32)
        conv = [
            {"role": "user", "content": [{"type": "text", "text": "repeat"}, {"type": "audio", "audio": wav}]}
        ]
        real = prepare_conversation(tiny_model, conv).prompt_tokens
        counted = [
            {"role": "user", "content": [{"type": "text", "text": "repeat"}, {"type": "audio", "samples": n}]}
        ]
        assert engine.check_prompt(counted, 1) == real
    window = context_window(tiny_model)
    with pytest.raises(BlspError, match="context window"):
        engine.check_prompt(
            [{"role": "user", "content": [{"type": "audio", "samples": 16000 * 3600}]}], window
        )


def test_url_fetch_has_a_total_deadline(tmp_path):
    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a byte every 0.2 s: no single read ever times out
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/a.wav"
    msg = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}]
    try:
        s = ServerSettings(allow_urls=True, allow_private_urls=True, url_timeout_s=1.0)
        t0 = time.perf_counter()
        with pytest.raises(ApiError, match="longer than 1 s") as e:
            parse_messages(msg, s)
        assert e.value.code == "url_timeout" and time.perf_counter() - t0 < 2.5
    finally:
        httpd.shutdown()


def test_header_budgets_refuse_before_decoding(tmp_path):
    s = ServerSettings(max_audio_samples=1_000_000, max_total_audio_seconds=5)
    bomb = silent_flac(60, sr=96_000, channels=8)
    msg = [
        {
            "role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": b64(bomb), "format": "flac"}}],
        }
    ]
    with pytest.raises(ApiError, match="--max-audio-samples"):
        parse_messages(msg, s)
    clip = {"type": "input_audio", "input_audio": {"data": b64(silent_flac(3)), "format": "flac"}}
    with pytest.raises(ApiError, match="--max-total-audio-seconds"):
        parse_messages([{"role": "user", "content": [clip, clip]}], s)
    seen = []
    with pytest.raises(ApiError, match="too long"):

        def refuse(conv):
            seen.append(conv)
            raise ApiError(400, "too long")

        parse_messages([{"role": "user", "content": [clip]}], s, refuse)
    assert seen[0][0]["content"][0] == {
        "type": "audio",
        "samples": 3 * 16000 - 1,
    }  # from the header, not decoded
    # The decoder refuses a bomb itself too, whatever the header says.
    from blsp.data.audio import AudioLimits, decode_audio_bytes

    with pytest.raises(BlspError, match="samples; the limit is 1000000"):
        decode_audio_bytes(bomb, "flac", limits=AudioLimits(max_samples=1_000_000))
