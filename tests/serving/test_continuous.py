"""Continuous batching: rows join and leave a running batch and keep the answers they get alone."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from blsp.errors import BlspError
from blsp.inference.generate import (
    GenerationParams,
    PreparedExample,
    generate_prepared,
    prepare_conversation,
)
from blsp.inference.pipeline import SpeechPipeline
from blsp.serving.engine import (
    BatchEngine,
    ContinuousEngine,
    EngineUnavailable,
    _ActiveRows,
    make_engine,
    supports_continuous,
)


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
    [
        {"role": "system", "content": "a man in an orange hat"},
        {"role": "user", "content": "continue the following text"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": clip(2.0, 3)}, {"type": "text", "text": "classify it"}],
        }
    ],
]


def alone(model: Any, conv: list[dict], params: GenerationParams):
    return generate_prepared(model, [prepare_conversation(model, conv)], params)[0]


def same(got: Any, want: Any) -> None:
    assert (got.token_ids, got.text, got.finish_reason, got.prompt_tokens) == (
        want.token_ids,
        want.text,
        want.finish_reason,
        want.prompt_tokens,
    )


@pytest.fixture
def mixed_params(tiny_model) -> list[GenerationParams]:
    """Different budgets, and stop strings taken from the rows' own answers (one never matches)."""
    texts = [alone(tiny_model, c, GenerationParams(max_new_tokens=16)).text for c in CONVS[:2]]
    assert all(len(t) >= 8 for t in texts), texts
    return [
        GenerationParams(max_new_tokens=12),
        GenerationParams(max_new_tokens=16, stop=(texts[1][5:8],)),
        GenerationParams(max_new_tokens=3),
        GenerationParams(max_new_tokens=1),
        GenerationParams(max_new_tokens=9, stop=("never in the answer",)),
    ]


# ----------------------------------------------------------------------------- the batch of rows
@dataclass
class FakeJob:
    """What ``_ActiveRows`` reads of a ``Job``; records the streamed pieces."""

    prepared: PreparedExample
    params: GenerationParams
    stream: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)
    pieces: list[str] = field(default_factory=list)

    def emit(self, kind: str, value: Any) -> None:
        assert kind == "delta"
        self.pieces.append(value)


def test_rows_joining_a_running_batch_get_their_alone_answers(tiny_model, mixed_params):
    prepared = [prepare_conversation(tiny_model, c) for c in CONVS]
    jobs = [
        FakeJob(ex, p, stream=k != 2) for k, (ex, p) in enumerate(zip(prepared, mixed_params, strict=True))
    ]
    joins = {0: [0, 2], 2: [1], 3: [3], 5: [4]}  # decode step -> rows admitted before it (0, 2: together)
    rows, results, running_at_join = _ActiveRows(tiny_model), {}, []
    step = 0
    while len(results) < len(jobs):
        if step in joins:
            running_at_join.append(len(rows))
            for row in rows.prefill([jobs[i] for i in joins[step]]):
                if row.decode.done:
                    results[jobs.index(row.job)] = row.decode.result()
        if rows:
            rows.step()
            for row in rows.retire():
                results[jobs.index(row.job)] = row.decode.result()
            if rows:  # the cache holds each row's positions, no all-padding column
                assert rows.mask.shape[1] == rows.cache.get_seq_length() and rows.mask[:, 0].any()
        step += 1
    assert min(running_at_join[1:]) >= 1, running_at_join  # each later wave joined running rows
    static = generate_prepared(tiny_model, prepared, mixed_params)  # one static batch of all rows
    for k, (conv, p) in enumerate(zip(CONVS, mixed_params, strict=True)):
        same(results[k], alone(tiny_model, conv, p))
        same(results[k], static[k])
        assert results[k].completion_tokens <= p.max_new_tokens
        if jobs[k].stream:
            assert "".join(jobs[k].pieces) == results[k].text
        else:
            assert jobs[k].pieces == []
    assert results[1].finish_reason == "stop" and results[3].completion_tokens == 1
    assert results[4].finish_reason == "length"


# ----------------------------------------------------------------------------- the engine
class SlowSteps(ContinuousEngine):
    """Decode steps take a while, so that staggered requests arrive while others run."""

    step_s = 0.03

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.joined_running = 0  # admission waves while rows were decoding

    def _admit(self, rows: _ActiveRows, jobs: list) -> None:
        self.joined_running += bool(rows)
        super()._admit(rows, jobs)

    def _step(self, rows: _ActiveRows) -> None:
        time.sleep(self.step_s)
        super()._step(rows)


def run_jobs(engine: BatchEngine, jobs: list[tuple], cancel_after: int | None = None):
    """Submit [(conversation, params, stream, delay_s)]; returns (results or errors, streamed pieces, stats).

    ``cancel_after``: the first streamed job is cancelled once it has streamed that many pieces.
    """

    async def main():
        engine.start()
        try:

            async def one(conv, params, stream, delay, cancel):
                await asyncio.sleep(delay)
                job = engine.submit(conv, params, stream=stream)
                pieces = []
                if stream:
                    while True:
                        kind, value = await job.events.get()
                        if kind == "delta":
                            pieces.append(value)
                            if cancel and len(pieces) == cancel_after:
                                engine.cancel(job)
                        elif kind in ("done", "error"):
                            break
                try:
                    return await job.future, pieces
                except Exception as e:
                    return e, pieces

            first_stream = next((k for k, j in enumerate(jobs) if j[2]), None)
            out = await asyncio.gather(
                *(one(*j, cancel=cancel_after is not None and k == first_stream) for k, j in enumerate(jobs))
            )
            return [r for r, _ in out], [p for _, p in out], engine.stats()
        finally:
            engine.stop()

    return asyncio.run(main())


def test_staggered_requests_join_the_running_batch(tiny_model, mixed_params):
    pipe = SpeechPipeline(tiny_model)
    delays = [0.0, 0.08, 0.16, 0.16, 0.3]
    jobs = [
        (c, p, k % 2 == 0, d) for k, (c, p, d) in enumerate(zip(CONVS, mixed_params, delays, strict=True))
    ]
    sampled = (CONVS[0], GenerationParams(max_new_tokens=6, temperature=0.8, top_p=0.9), True, 0.1)
    engine = SlowSteps(pipe, max_batch_size=8, batch_wait_ms=5)
    results, pieces, stats = run_jobs(engine, [*jobs, sampled])
    assert engine.joined_running >= 1, stats  # later requests joined rows already decoding
    assert stats["batching"] == "continuous" and stats["jobs_done"] == 6
    assert stats["decode_steps"] > 0 and stats["mean_step_rows"] > 1, stats
    for k, (conv, p, stream, _) in enumerate(jobs):
        same(results[k], alone(tiny_model, conv, p))
        if stream:
            assert "".join(pieces[k]) == results[k].text
    # A sampling row shares the decode steps of the greedy ones.
    assert 1 <= results[-1].completion_tokens <= 6 and "".join(pieces[-1]) == results[-1].text

    static = run_jobs(make_engine(pipe, "static", batch_wait_ms=5), jobs)[0]
    for got, want in zip(results, static, strict=False):
        same(got, want)


def test_a_running_row_stops_when_cancelled_and_the_others_go_on(tiny_model):
    pipe = SpeechPipeline(tiny_model)
    long = GenerationParams(max_new_tokens=40)
    jobs = [(CONVS[0], long, True, 0.0), (CONVS[1], GenerationParams(max_new_tokens=10), False, 0.0)]
    results, pieces, stats = run_jobs(SlowSteps(pipe, batch_wait_ms=50), jobs, cancel_after=2)
    assert results[0].finish_reason == "cancelled", results[0]
    assert results[0].completion_tokens < 40
    full = alone(tiny_model, CONVS[0], long)
    assert full.token_ids[: results[0].completion_tokens] == results[0].token_ids
    same(results[1], alone(tiny_model, CONVS[1], jobs[1][1]))
    assert stats["jobs_done"] == 2


def test_a_bad_job_fails_alone_and_a_queued_cancelled_one_never_runs(tiny_model):
    pipe = SpeechPipeline(tiny_model)
    bad_audio = [{"role": "user", "content": [{"type": "audio", "audio": np.zeros(10, np.float32)}]}]
    jobs = [
        (CONVS[1], GenerationParams(max_new_tokens=5), False, 0.0),
        (bad_audio, GenerationParams(max_new_tokens=3), True, 0.0),
        (CONVS[2], GenerationParams(max_new_tokens=5000), False, 0.0),  # over the tiny LLM's 1024 positions
        (CONVS[0], GenerationParams(max_new_tokens=3, temperature=0.8), False, 0.0),
    ]
    results, pieces, stats = run_jobs(make_engine(pipe, "continuous", batch_wait_ms=300), jobs)
    same(results[0], alone(tiny_model, CONVS[1], jobs[0][1]))
    assert isinstance(results[1], BlspError) and "too short" in str(results[1])
    assert isinstance(results[2], BlspError) and "context window of 1024" in str(results[2])
    assert results[3].completion_tokens <= 3
    assert stats["batches"] == 1 and stats["jobs_done"] == 2 and pieces[1] == []

    async def cancelled_while_queued():
        engine = make_engine(pipe, "continuous", batch_wait_ms=300)
        engine.start()
        try:
            job = engine.submit(CONVS[1], GenerationParams(max_new_tokens=3))
            engine.cancel(job)
            await asyncio.sleep(0.6)
            assert not job.future.done()
            return engine.stats()
        finally:
            engine.stop()

    stats = asyncio.run(cancelled_while_queued())
    assert stats["jobs_cancelled"] == 1 and stats["jobs_done"] == 0 and stats["queued"] == 0


def test_a_dead_continuous_worker_fails_waiting_and_new_requests_fast(tiny_model):
    engine = make_engine(SpeechPipeline(tiny_model), "continuous", batch_wait_ms=200)

    def crash(rows, jobs):  # fault injection: the worker thread itself fails
        raise SystemExit("boom")

    engine._admit = crash  # type: ignore[method-assign]
    engine.start()

    async def main():
        job = engine.submit([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=2))
        with pytest.raises(EngineUnavailable, match="died"):
            await asyncio.wait_for(job.future, 10)
        with pytest.raises(EngineUnavailable, match="not running"):
            engine.submit([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=2))

    asyncio.run(main())
    assert not engine.alive


def test_engine_choice(tiny_model, monkeypatch):
    pipe = SpeechPipeline(tiny_model)
    assert supports_continuous(tiny_model)
    assert type(make_engine(pipe)) is ContinuousEngine
    assert type(make_engine(pipe, "static")) is BatchEngine
    with pytest.raises(BlspError, match="batching must be one of"):
        make_engine(pipe, "dynamic")
    monkeypatch.setattr("blsp.serving.engine.supports_continuous", lambda model: False)
    assert type(make_engine(pipe, "continuous")) is BatchEngine  # e.g. sliding-window caches


# ----------------------------------------------------------------------------- the bundled model
@pytest.mark.slow
def test_continuous_equals_static_on_the_shipped_model(speech_wav):
    from blsp.models.modeling_blsp import BlspModel

    model = BlspModel.from_pretrained()  # the shipped adapter (blsp-base)
    pipe = SpeechPipeline(model)
    import soundfile as sf

    def speech(text: str, instruction: str) -> list[dict]:
        wav, sr = sf.read(speech_wav(text), dtype="float32")
        return [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": instruction},
                    {"type": "audio", "audio": wav, "sampling_rate": sr},
                ],
            }
        ]

    repeat = "Please repeat the following words."
    jobs = [
        (speech("The quick brown fox jumps over the lazy dog.", repeat), GenerationParams(12), True, 0.0),
        (speech("Please remind me to buy milk.", repeat), GenerationParams(16, stop=("milk",)), False, 0.0),
        ([{"role": "user", "content": "Name a colour."}], GenerationParams(6), True, 0.4),
        (speech("It is a sunny morning.", "Translate it into German."), GenerationParams(10), True, 0.8),
    ]
    cont = SlowSteps(pipe, batch_wait_ms=10)
    cont.step_s = 0.0
    got, pieces, stats = run_jobs(cont, jobs)
    want = run_jobs(make_engine(pipe, "static", batch_wait_ms=10), jobs)[0]
    for g, w in zip(got, want, strict=True):
        same(g, w)
    for k, (_, p, stream, _) in enumerate(jobs):
        assert got[k].completion_tokens <= p.max_new_tokens
        if stream:
            assert "".join(pieces[k]) == got[k].text
    assert stats["mean_step_rows"] > 1 and cont.joined_running >= 1, stats
