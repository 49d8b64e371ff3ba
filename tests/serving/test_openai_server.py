"""`blsp serve` driven by the official `openai` client: audio chat, streaming, multi-turn, transcription."""

from __future__ import annotations

import base64
import concurrent.futures as cf

import httpx
import pytest

from blsp.instructions import task_instruction

pytestmark = pytest.mark.slow

SENTENCE = "The quick brown fox jumps over the lazy dog."


def audio_part(path) -> dict:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"},
    }


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client marks translations so
def test_chat_with_audio_streamed_equals_non_streamed(client, server, speech_wav):
    assert [m.id for m in client.models.list().data] == [server.model]
    wav = speech_wav(SENTENCE)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": task_instruction("asr")}, audio_part(wav)]}
    ]
    full = client.chat.completions.create(model=server.model, messages=messages, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert 0 < full.usage.completion_tokens <= 16
    assert full.usage.prompt_tokens > 30  # the speech positions count: ~3 s of audio

    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed

    # Transcription upload: the same model under the ASR instruction (greedy, up to 24 tokens).
    with wav.open("rb") as f:
        tr = client.audio.transcriptions.create(model=server.model, file=f)
    assert tr.text.startswith(text)
    with wav.open("rb") as f:
        tl = client.audio.translations.create(model=server.model, file=f)
    assert tl.text


def test_two_turns_mixing_audio_and_text(client, server, speech_wav):
    wav = speech_wav("Tell me about dogs.")
    text_first = [{"role": "user", "content": "My name is Anna."}]
    r1 = client.chat.completions.create(model=server.model, messages=text_first, max_tokens=12, temperature=0)
    a1 = r1.choices[0].message.content
    assert a1
    two_turns = [
        *text_first,
        {"role": "assistant", "content": a1},
        {"role": "user", "content": [audio_part(wav), {"type": "text", "text": "Answer briefly."}]},
    ]
    r2 = client.chat.completions.create(model=server.model, messages=two_turns, max_tokens=12, temperature=0)
    assert r2.choices[0].message.content
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens
    audio_first = [
        two_turns[2],
        {"role": "assistant", "content": r2.choices[0].message.content},
        {"role": "user", "content": "What did I just ask?"},
    ]
    r3 = client.chat.completions.create(
        model=server.model, messages=audio_first, max_tokens=12, temperature=0
    )
    assert r3.choices[0].message.content


def test_requests_arriving_together_are_batched(client, server, speech_wav):
    wav = speech_wav(SENTENCE)
    jobs = [
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": task_instruction("asr")}, audio_part(wav)],
                }
            ],
            6,
        ),
        ([{"role": "user", "content": "Name a colour."}], 8),
        ([{"role": "user", "content": [audio_part(wav)]}], 4),
    ]

    def ask(job):
        messages, n = job
        r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=n, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    before = httpx.get(server.url + "/health").json()["engine"]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    after = httpx.get(server.url + "/health").json()["engine"]
    assert after["jobs_done"] - before["jobs_done"] == 3
    assert after["batches"] - before["batches"] < 3, "no two requests shared a batch"
    alone = [ask(j) for j in jobs]
    assert together == alone
    assert all(n <= j[1] for (_, n), j in zip(alone, jobs, strict=True))
