"""Greedy answers of the shipped adapter, pinned: every generation entry point gives these exact texts.

The literals were produced by the code before generation was moved into one core
(``blsp.models.generation_blsp``); a refactor of that core must leave them unchanged. They were
re-pinned, by the same functions, when the shipped weights changed in session 8. fp32 on the CPU,
24 new tokens, three held-out speechocean762 clips (skipped where ``../shared/data`` is absent).
Entry points: ``BlspModel.generate`` (a mixed speech/text batch), ``SpeechPipeline`` (batched,
streamed, a stop string), ``ChatSession`` (a speech turn, then a text turn on the kept KV cache) and
the behavior step's ``TransformersBackend`` (text prompts, ``shrink`` and ``static`` batching).
"""

from __future__ import annotations

import json

import pytest

from blsp.instructions import CONTINUATION, REPETITION
from blsp.models.prompt import make_conversation

pytestmark = pytest.mark.slow

N = 24
TRANSCRIPTS = [
    "the quick brown fox jumps over the lazy dog",
    "a man in an orange hat is looking at something",
    "kate loves china",
    "once upon a time there was a little robot who wanted to see the sea",
]

MODEL_GENERATE = [
    "mike is going to see elephant",
    "gait loves buckle",
    "two six four eight",
    "The quick brown fox jumps over the lazy dog.",
]
PIPELINE_BATCH = [
    ("mike is going to see elephant", "stop", 7, 58),
    ("gig loves kindness", "stop", 4, 68),
    ("two six four eight", "stop", 4, 55),
]
PIPELINE_STREAM = ["g", "ig", " loves", " kindness"]
PIPELINE_STOP = (" loves", [("gig", "stop"), ("mike is", "length", 3)])
CHAT = [("two six four eight", "stop"), ("two six four eight", "stop")]
_BEHAVE = [
    ("The quick brown fox jumps over the lazy dog.", "stop", 10),
    ("The man in an orange hat is looking at something.", "stop", 11),
    ("kate loves china is a great place to visit.", "stop", 11),
    ("Once upon a time, there was a little robot who wanted", "length", 12),
]
BEHAVE = {"shrink": _BEHAVE, "static": _BEHAVE}


@pytest.fixture(scope="module")
def shipped():
    import torch

    from blsp.models.modeling_blsp import BlspModel

    torch.manual_seed(0)
    return BlspModel.from_pretrained(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clips(shared_data):
    from blsp.data.audio import load_audio

    folder = shared_data / "speech" / "speechocean762"
    rows = [json.loads(x) for x in (folder / "test.jsonl").read_text().splitlines()][:3]
    return [load_audio(folder / r["audio"]) for r in rows]


def model_generate(model, clips):
    examples = [{"conversation": make_conversation(REPETITION, audio=a)} for a in clips]
    examples.append({"conversation": make_conversation(CONTINUATION, transcript=TRANSCRIPTS[0])})
    return model.generate(examples, max_new_tokens=N)


def pipeline_batch(model, clips):
    from blsp.inference.pipeline import SpeechPipeline

    pipe = SpeechPipeline(model, max_new_tokens=N)
    results = pipe(clips, [REPETITION, CONTINUATION, REPETITION], return_result=True)
    return [(r.text, r.finish_reason, r.completion_tokens, r.prompt_tokens) for r in results]


def pipeline_stream(model, clips):
    from blsp.inference.pipeline import SpeechPipeline

    return list(SpeechPipeline(model, max_new_tokens=N).stream(clips[1], CONTINUATION))


def pipeline_stop(model, clips, stop):
    """A stop string, then a token budget that cuts the answer."""
    from blsp.inference.pipeline import SpeechPipeline

    pipe = SpeechPipeline(model, max_new_tokens=N)
    r = pipe(clips[1], CONTINUATION, stop=stop, return_result=True)
    short = pipe(clips[0], REPETITION, max_new_tokens=3, return_result=True)
    return [(r.text, r.finish_reason), (short.text, short.finish_reason, short.completion_tokens)]


def chat(model, clips):
    from blsp.inference.chat import ChatSession

    session = ChatSession(model)
    first = session.send(
        [{"type": "text", "text": REPETITION}, {"type": "audio", "audio": clips[2]}], max_new_tokens=N
    )
    pieces: list[str] = []
    second = session.send("Now write a long story about these numbers.", max_new_tokens=N, sink=pieces.append)
    assert session.last_reused > 0  # the text turn ran on the cache of the speech turn
    assert "".join(pieces) == second.text
    return [(first.text, first.finish_reason), (second.text, second.finish_reason)]


def behave(model, batching):
    from blsp.behaviors.backends import TransformersBackend, behavior_params

    prompts = [model.prompt.text_prompt(make_conversation(CONTINUATION, transcript=t)) for t in TRANSCRIPTS]
    backend = TransformersBackend(model.llm, model.tokenizer, model.prompt.stop_token_ids, batching=batching)
    out = backend.generate(prompts, behavior_params(max_new_tokens=12))  # the last row hits it
    return [(c.text, c.finish, c.tokens) for c in out]


def test_model_generate_is_pinned(shipped, clips):
    assert model_generate(shipped, clips) == MODEL_GENERATE


def test_pipeline_is_pinned(shipped, clips):
    assert pipeline_batch(shipped, clips) == PIPELINE_BATCH
    assert pipeline_stream(shipped, clips) == PIPELINE_STREAM
    assert "".join(PIPELINE_STREAM) == PIPELINE_BATCH[1][0]
    assert pipeline_stop(shipped, clips, PIPELINE_STOP[0]) == PIPELINE_STOP[1]


def test_chat_is_pinned(shipped, clips):
    assert chat(shipped, clips) == CHAT


@pytest.mark.parametrize("batching", ["shrink", "static"])
def test_behavior_backend_is_pinned(shipped, batching):
    assert behave(shipped, batching) == BEHAVE[batching]
