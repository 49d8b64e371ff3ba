"""The batching engine and the OpenAI request parsing, in-process on the tiny model."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import soundfile as sf

from blsp.errors import BlspError
from blsp.inference.generate import GenerationParams, generate_prepared, prepare_conversation
from blsp.inference.pipeline import SpeechPipeline
from blsp.serving.engine import BatchEngine
from blsp.serving.messages import parse_messages
from blsp.serving.openai_api import ApiError, generation_params
from blsp.serving.settings import ServerSettings


def clip(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


CONVS = [
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "please repeat"}, {"type": "audio", "audio": clip(1.0, 1)}],
        }
    ],
    [{"role": "user", "content": "the quick brown fox"}],
    [{"role": "user", "content": [{"type": "audio", "audio": clip(0.5, 2)}]}],
]
PARAMS = [GenerationParams(max_new_tokens=n) for n in (4, 8, 6)]


def run_engine(pipe, max_batch_size, jobs, wait_ms=300.0):
    """Submit ``jobs`` [(conversation, params, stream)] together; returns (results or errors, streamed, stats)."""

    async def main():
        engine = BatchEngine(pipe, max_batch_size=max_batch_size, batch_wait_ms=wait_ms)
        engine.start()
        try:
            submitted = [engine.submit(c, p, stream=s) for c, p, s in jobs]

            async def streamed(job):
                if job.events is None:
                    return None
                pieces = []
                while True:
                    kind, value = await job.events.get()
                    if kind == "delta":
                        pieces.append(value)
                    elif kind in ("done", "error"):
                        return pieces

            pieces = await asyncio.gather(*(streamed(j) for j in submitted))
            results = await asyncio.gather(*(j.future for j in submitted), return_exceptions=True)
            return results, pieces, engine.stats()
        finally:
            engine.stop()

    return asyncio.run(main())


def test_jobs_arriving_together_share_one_batch(tiny_model):
    pipe = SpeechPipeline(tiny_model)
    alone = [
        generate_prepared(tiny_model, [prepare_conversation(tiny_model, c)], p)[0]
        for c, p in zip(CONVS, PARAMS, strict=True)
    ]
    jobs = [(c, p, k == 1) for k, (c, p) in enumerate(zip(CONVS, PARAMS, strict=True))]
    results, pieces, stats = run_engine(pipe, 8, jobs)
    assert stats["batches"] == 1 and stats["mean_batch_size"] == 3
    assert [r.text for r in results] == [r.text for r in alone]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert pieces[0] is None and "".join(pieces[1]) == results[1].text

    results, _, stats = run_engine(pipe, 1, jobs, wait_ms=0)  # batching off
    assert stats["batches"] == 3
    assert [r.text for r in results] == [r.text for r in alone]


def test_a_bad_job_fails_alone(tiny_model):
    pipe = SpeechPipeline(tiny_model)
    bad_audio = [{"role": "user", "content": [{"type": "audio", "audio": np.zeros(10, np.float32)}]}]
    jobs = [
        (CONVS[1], PARAMS[1], False),
        (bad_audio, PARAMS[0], True),
        (CONVS[2], GenerationParams(max_new_tokens=5000), False),  # over the tiny LLM's 1024 positions
        (CONVS[0], GenerationParams(max_new_tokens=3, temperature=0.8), False),  # samples: its own batch
    ]
    results, pieces, stats = run_engine(pipe, 8, jobs)
    assert (
        results[0].text
        == generate_prepared(tiny_model, [prepare_conversation(tiny_model, CONVS[1])], PARAMS[1])[0].text
    )
    assert isinstance(results[1], BlspError) and "too short" in str(results[1])
    assert isinstance(results[2], BlspError) and "context window of 1024" in str(results[2])
    assert results[3].completion_tokens <= 3
    assert stats["batches"] == 2 and stats["jobs_done"] == 2
    assert pieces[1] == []


def wav_b64(seconds: float) -> str:
    buf = io.BytesIO()
    sf.write(buf, clip(seconds, 0), 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def test_parse_messages_and_params():
    s = ServerSettings(model_name="m", max_audio_seconds=2, max_tokens_limit=32)
    conv = parse_messages(
        [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "input_audio", "input_audio": {"data": wav_b64(1.0), "format": "wav"}},
                ],
            },
            {"role": "assistant", "content": None},
            {
                "role": "user",
                "content": [
                    {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + wav_b64(0.5)}}
                ],
            },
        ],
        s,
    )
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user"]
    assert conv[1]["content"][1]["audio"].shape == (16000,) and conv[3]["content"][0]["audio"].shape == (
        8000,
    )
    p = generation_params({"max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "x"}, s)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.stop) == (7, 0.5, 0.9, ("x",))
    assert generation_params({}, s).max_new_tokens == 32 and generation_params({}, s).temperature == 0
    for body, needle in [
        ({"max_tokens": 33}, "at most 32"),
        ({"max_tokens": 0}, "positive integer"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [1]}, "stop"),
    ]:
        with pytest.raises(ApiError, match=needle):
            generation_params(body, s)
    with pytest.raises(ApiError, match=r"messages\[0\]\.content\[0\]\.input_audio: audio is 3.0 s long"):
        parse_messages(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": wav_b64(3.0), "format": "wav"}}
                    ],
                }
            ],
            s,
        )
    with pytest.raises(ApiError, match="last message must not be an assistant"):
        parse_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], s)
    with pytest.raises(ApiError, match="audio is accepted in user messages only"):
        parse_messages(
            [
                {
                    "role": "system",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": wav_b64(1.0), "format": "wav"}}
                    ],
                }
            ],
            s,
        )


def test_local_files_only_when_allowed_and_only_under_the_root(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    sf.write(allowed / "a.wav", clip(0.5, 0), 16000)
    outside = tmp_path / "b.wav"
    sf.write(outside, clip(0.5, 0), 16000)

    def msg(url):
        return [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}]

    with pytest.raises(ApiError, match="reading local files is disabled") as e:
        parse_messages(msg(f"file://{allowed / 'a.wav'}"), ServerSettings())
    assert e.value.status == 400
    s = ServerSettings(allow_local_files=str(allowed))
    assert parse_messages(msg(f"file://{allowed / 'a.wav'}"), s)[0]["content"][0]["audio"].shape == (8000,)
    assert parse_messages(msg(str(allowed / "a.wav")), s)[0]["content"][0]["audio"].shape == (8000,)
    for url in (f"file://{outside}", str(allowed / ".." / "b.wav"), "file:///etc/passwd"):
        with pytest.raises(ApiError, match="outside the folder") as e:
            parse_messages(msg(url), s)
        assert e.value.status == 403
    with pytest.raises(ApiError, match="URLs is disabled"):
        parse_messages(msg("https://example.com/a.wav"), s)
    with pytest.raises(ApiError, match="unsupported URL scheme 'ftp'"):
        parse_messages(msg("ftp://example.com/a.wav"), s)


def test_urls_are_fetched_only_when_allowed(tmp_path):
    import functools
    import http.server
    import threading

    sf.write(tmp_path / "a.wav", clip(0.5, 0), 16000)
    (tmp_path / "big.wav").write_bytes(b"\0" * 3_000_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    def msg(url):
        return [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}]

    try:
        with pytest.raises(ApiError, match="URLs is disabled"):
            parse_messages(msg(f"{base}/a.wav"), ServerSettings())
        with pytest.raises(ApiError, match="127.0.0.1, a loopback, link-local or private address"):
            parse_messages(msg(f"{base}/a.wav"), ServerSettings(allow_urls=True))
        s = ServerSettings(allow_urls=True, allow_private_urls=True, max_body_mb=1)
        assert parse_messages(msg(f"{base}/a.wav"), s)[0]["content"][0]["audio"].shape == (8000,)
        with pytest.raises(ApiError, match="HTTP 404"):
            parse_messages(msg(f"{base}/missing.wav"), s)
        with pytest.raises(ApiError, match="larger than 1048576 bytes") as e:
            parse_messages(msg(f"{base}/big.wav"), s)
        assert e.value.status == 413
        with pytest.raises(ApiError, match="reading local files is disabled"):
            parse_messages(msg(f"file://{tmp_path / 'a.wav'}"), s)  # URLs allowed does not allow files
    finally:
        httpd.shutdown()
