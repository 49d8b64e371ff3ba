"""The OpenAI-compatible HTTP backend against a real loopback server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from blsp.behaviors.backends import HttpBackend, behavior_params, completions_url
from blsp.behaviors.inputs import sidecar
from blsp.behaviors.job import BehaveOptions, run_behave
from blsp.utils.io import iter_jsonl


class FaultyServer:
    """``/v1/completions`` that answers by the first prompt token id's remainder mod 10.

    0-5: ok; 6: two 503s then ok; 7: first reply after the client's timeout, then ok;
    8: always 500 (until ``healed``); 9: 400 (a client error, never retried). ``bodies`` keeps every request.
    """

    def __init__(self) -> None:
        self.app = FastAPI()
        self.attempts: Counter = Counter()
        self.bodies: list[dict] = []
        self.healed = False
        self.lock = threading.Lock()

        @self.app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            prompt = body["prompt"]
            key = tuple(prompt) if isinstance(prompt, list) else prompt
            with self.lock:
                self.bodies.append(body)
                self.attempts[key] += 1
                n = self.attempts[key]
            mode = (prompt[0] if isinstance(prompt, list) else len(prompt)) % 10
            if mode == 6 and n <= 2:
                return JSONResponse({"error": "overloaded"}, status_code=503)
            if mode == 7 and n == 1:
                await asyncio.sleep(1.0)
            if mode == 8 and not self.healed:
                return JSONResponse({"error": "internal"}, status_code=500)
            if mode == 9:
                return JSONResponse({"error": {"message": "bad model"}}, status_code=400)
            finish = "length" if len(prompt) % 3 == 0 else "stop"
            text = f"  A fresh sentence number {len(prompt)} about gardens and rivers. "
            return {
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                "usage": {"completion_tokens": 9},
            }


@pytest.fixture
def faulty():
    return FaultyServer()


def test_completions_url():
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert completions_url("http://h/x/v1/completions") == "http://h/x/v1/completions"


def test_retries_timeouts_and_client_errors(faulty, loopback):
    prompts = [[10 + m, 5, 5] for m in range(10)]  # first id mod 10 = m
    settings = behavior_params(max_new_tokens=12)
    with loopback(faulty.app) as url:
        backend = HttpBackend(url + "/v1", "served-name", concurrency=4, timeout=0.4, retries=3, backoff=0.01)
        results = backend.generate(prompts, settings)
        backend.close()
    by_mode = dict(enumerate(results))
    for m in (0, 1, 2, 3, 4, 5):
        assert by_mode[m].finish == "length" and by_mode[m].text.startswith("A fresh sentence")  # stripped
        assert faulty.attempts[tuple(prompts[m])] == 1
    assert by_mode[6].finish == "length" and faulty.attempts[tuple(prompts[6])] == 3  # two 503s, then ok
    assert by_mode[7].finish == "length" and faulty.attempts[tuple(prompts[7])] == 2  # timeout, then ok
    assert by_mode[8].finish == "error" and "HTTP 500" in by_mode[8].error
    assert faulty.attempts[tuple(prompts[8])] == 4  # 1 + 3 retries
    assert by_mode[9].finish == "error" and "HTTP 400" in by_mode[9].error
    assert faulty.attempts[tuple(prompts[9])] == 1  # a client error is not retried
    body = faulty.bodies[0]
    assert body["model"] == "served-name" and body["max_tokens"] == 12 and body["temperature"] == 0.0
    assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])


def test_dead_endpoint_fails_every_line_without_raising():
    backend = HttpBackend("http://127.0.0.1:9", "m", concurrency=2, timeout=0.5, retries=1, backoff=0.01)
    results = backend.generate([[1, 2], [3, 4]], behavior_params())
    backend.close()
    assert [r.finish for r in results] == ["error", "error"]
    assert all("connection error" in r.error for r in results)


def test_failed_lines_are_recorded_the_job_goes_on_and_a_rerun_retries_them(
    tiny_dirs, faulty, loopback, tmp_path
):
    sentences = Path(__file__).resolve().parents[2] / "src/blsp/resources/sentences/train.txt"
    texts = [t for t in sentences.read_text(encoding="utf-8").splitlines() if t.strip()][:30]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "cw.jsonl"
    opts = BehaveOptions(
        manifest=manifest,
        out=out,
        model=str(tiny_dirs["llm"]),
        backend="http",
        endpoint=None,
        settings=behavior_params(max_new_tokens=8),
        batch_size=8,
        concurrency=4,
        timeout=0.4,
        retries=2,
        backoff=0.01,
        prompt_format="text",  # vary the server's behaviour by prompt length (len(text) % 10)
    )
    with loopback(faulty.app) as url:
        opts.endpoint = url
        summary = run_behave(opts)
        dead = {b["prompt"] for b in faulty.bodies if len(b["prompt"]) % 10 in (8, 9)}
        n_dead = len(dead)
        assert dead and any(len(t) % 10 == 9 for t in dead), "the test needs prompts of both failing kinds"
        assert summary["failed"] == n_dead and summary["kept"] == 30 - n_dead and summary["remaining"] == 0
        failed = [obj for _, obj, _ in iter_jsonl(sidecar(out, "failed.jsonl"))]
        assert len(failed) == n_dead and all(
            ("HTTP 500" in f["error"]) or ("HTTP 400" in f["error"]) for f in failed
        )
        kept = [obj for _, obj, _ in iter_jsonl(out)]
        assert all(
            r["generation"]["backend"] == "http" and r["generation"]["prompt_format"] == "text" for r in kept
        )
        assert any("truncated" in r["flags"] for r in kept)

        faulty.healed = True  # the 500s stop; the 400s remain
        again = run_behave(opts)
    still = sum(1 for t in dead if len(t) % 10 == 9)
    assert again["this_run"]["generated"] == n_dead - still
    assert again["failed"] == still and again["kept"] == 30 - still
    ids = [obj["id"] for _, obj, _ in iter_jsonl(out)]
    assert len(ids) == len(set(ids))


def test_http_backend_requires_an_endpoint(tmp_path):
    from blsp.errors import ConfigError

    with pytest.raises(ConfigError, match="--endpoint"):
        run_behave(
            BehaveOptions(manifest=Path(tmp_path / "m.jsonl"), out=tmp_path / "o.jsonl", backend="http")
        )
