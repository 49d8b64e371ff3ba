"""`--backend vllm` wiring, with a stand-in `vllm` module (the real one needs a CUDA GPU).

The stand-in records what blsp hands vLLM and answers from it, so these tests pin the request
path (embedding -> vLLM prompt -> OpenAI answer, streamed or not) and the offline batch job; what
vLLM itself does with the embeddings is not run here (docs/SCALING.md).
"""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blsp.inference.generate import GenerationParams


class _Recorder:
    prompts: list[dict] = []
    sampling: list[dict] = []
    engine_kwargs: list[dict] = []
    aborted: list[str] = []


def _answer(prompt: dict) -> str:
    return f"heard {prompt['prompt_embeds'].shape[0]} positions"


def _fake_vllm() -> types.ModuleType:
    m = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            _Recorder.sampling.append(kw)

    class LLM:
        def __init__(self, **kw):
            _Recorder.engine_kwargs.append(kw)

        def generate(self, prompts, sampling, use_tqdm=False):
            _Recorder.prompts += prompts
            return [
                SimpleNamespace(
                    outputs=[SimpleNamespace(text=_answer(p), token_ids=[1, 2, 3], finish_reason="stop")]
                )
                for p in prompts
            ]

    class AsyncEngineArgs:
        def __init__(self, **kw):
            self.kw = kw

    class AsyncLLMEngine:
        @classmethod
        def from_engine_args(cls, args):
            _Recorder.engine_kwargs.append(args.kw)
            return cls()

        async def generate(self, prompt, sampling_params, request_id):
            _Recorder.prompts.append(prompt)
            words = _answer(prompt).split()
            for k in range(1, len(words) + 1):  # cumulative text, as vLLM's default output kind
                yield SimpleNamespace(
                    outputs=[
                        SimpleNamespace(
                            text=" ".join(words[:k]),
                            token_ids=list(range(k)),
                            finish_reason="stop" if k == len(words) else None,
                        )
                    ]
                )

        async def abort(self, request_id):
            _Recorder.aborted.append(request_id)

        def shutdown(self):
            pass

    m.SamplingParams, m.LLM, m.AsyncEngineArgs, m.AsyncLLMEngine = (
        SamplingParams,
        LLM,
        AsyncEngineArgs,
        AsyncLLMEngine,
    )
    return m


@pytest.fixture
def fake_vllm(monkeypatch):
    for k in ("prompts", "sampling", "engine_kwargs", "aborted"):
        setattr(_Recorder, k, [])
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm())
    monkeypatch.setitem(sys.modules, "vllm.v1", None)  # the stand-in has only the top-level names
    return _Recorder


def _wav_b64(seconds: float = 1.0) -> str:
    import base64
    import io

    import soundfile as sf

    buf = io.BytesIO()
    wav = (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    sf.write(buf, wav, 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def test_server_answers_through_vllm(tiny_model, fake_vllm):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from blsp.inference.pipeline import SpeechPipeline
    from blsp.inference.vllm_engine import engine_kwargs, vllm_engine_factory
    from blsp.serving.server import create_app
    from blsp.serving.settings import ServerSettings

    pipe = SpeechPipeline(tiny_model)
    settings = ServerSettings(model_name="tiny", allowed_hosts=("testserver",))
    app = create_app(pipe, settings, engine_factory=vllm_engine_factory(engine_kwargs(tiny_model, seed=7)))
    assert app.state.engine.batching == "vllm"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "please repeat the following words"},
                {"type": "input_audio", "input_audio": {"data": _wav_b64(), "format": "wav"}},
            ],
        }
    ]
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        prompt = fake_vllm.prompts[-1]["prompt_embeds"]
        assert body["choices"][0]["message"]["content"] == f"heard {prompt.shape[0]} positions"
        assert body["usage"]["prompt_tokens"] == prompt.shape[0]
        assert fake_vllm.sampling[-1]["max_tokens"] == 5 and fake_vllm.sampling[-1]["temperature"] == 0.0
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 5, "stream": True},
        ) as s:
            lines = [x for x in s.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        pieces = [
            c["choices"][0]["delta"].get("content", "")
            for c in map(lambda x: json.loads(x[6:]), lines)
            if c["choices"]
        ]
        assert "".join(pieces) == body["choices"][0]["message"]["content"]
        assert client.get("/health").json()["engine"]["batching"] == "vllm"
    kw = fake_vllm.engine_kwargs[0]
    assert kw["enable_prompt_embeds"] is True and kw["seed"] == 7


def _pcm() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)


def test_offline_batch_job_through_vllm(tiny_model, fake_vllm, tmp_path):
    import soundfile as sf

    from blsp.inference.generate import run_generate_job
    from blsp.inference.vllm_engine import VllmGenerator

    manifest = tmp_path / "m.jsonl"
    rows = []
    for i, secs in enumerate([0.5, 1.2]):
        sf.write(tmp_path / f"{i}.wav", _pcm()[: int(secs * 16000)], 16000)
        rows.append({"id": f"u{i}", "audio": f"{i}.wav", "duration": secs})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = VllmGenerator(tiny_model)
    stats = run_generate_job(
        tiny_model,
        manifest,
        tmp_path / "out.jsonl",
        instruction="repeat",
        params=GenerationParams(),
        progress=False,
        generate=gen.generate_prepared,
    )
    assert stats.written == 2
    out = {
        json.loads(x)["id"]: json.loads(x)["response"]
        for x in (tmp_path / "out.jsonl").read_text().splitlines()
    }
    sizes = [p["prompt_embeds"].shape[0] for p in fake_vllm.prompts]
    assert sorted(out.values()) == sorted(f"heard {n} positions" for n in sizes)
    assert all(p["prompt_embeds"].dtype == tiny_model.llm.dtype for p in fake_vllm.prompts)
    assert torch.is_tensor(fake_vllm.prompts[0]["prompt_embeds"])
