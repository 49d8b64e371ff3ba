"""Per-row generation settings inside one batch, stop strings, streaming, cancel (tiny random model)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from blsp.errors import BlspError
from blsp.inference.generate import (
    GenerationParams,
    StreamTextFilter,
    finalize_text,
    generate_prepared,
    prepare_conversation,
)


def clip(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def conversations() -> list[list[dict]]:
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "please repeat the following words"},
                    {"type": "audio", "audio": clip(1.0, 1)},
                ],
            }
        ],
        [{"role": "user", "content": "the quick brown fox"}],
        [
            {"role": "system", "content": "a man in an orange hat"},
            {"role": "user", "content": [{"type": "audio", "audio": clip(0.6, 2)}]},
            {"role": "assistant", "content": "the lazy dog"},
            {"role": "user", "content": "continue the following text"},
        ],
    ]


def test_stream_filter_deltas_add_up_to_the_final_text():
    raw = "  Hello world!\nEND of it  "
    for stops in [(), ("END",), ("world!\nE", "zzz"), ("o",)]:
        f = StreamTextFilter(stops)
        pieces = [f.feed(raw[:k]) for k in range(len(raw) + 1)]
        final, _ = finalize_text(raw, stops)
        pieces.append(f.finish(final))
        assert "".join(pieces) == final, stops
    f = StreamTextFilter(("ab",))
    assert f.feed("xa") == "x"  # "a" might start the stop string: held back
    assert f.feed("xac") == "ac"


def test_batch_rows_keep_their_own_settings(tiny_model):
    convs = conversations()
    prepared = [prepare_conversation(tiny_model, c) for c in convs]
    params = [GenerationParams(max_new_tokens=n) for n in (3, 9, 6)]
    together = generate_prepared(tiny_model, prepared, params)
    # The model's own batched generate (one setting for all rows), cut to each row's budget.
    ref = tiny_model.generate([{"conversation": c} for c in convs], max_new_tokens=9, return_ids=True)
    for ex, p, got, ids in zip(prepared, params, together, ref, strict=True):
        alone = generate_prepared(tiny_model, [ex], p)[0]
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.token_ids == ids[: p.max_new_tokens]
        assert got.completion_tokens <= p.max_new_tokens
        assert got.finish_reason == ("length" if len(ids) >= p.max_new_tokens else "stop")
    lengths = [r.prompt_tokens for r in together]
    assert lengths[0] > 0 and len(set(lengths)) == 3


def test_stop_strings_and_streaming(tiny_model):
    prepared = [prepare_conversation(tiny_model, c) for c in conversations()]
    plain = generate_prepared(tiny_model, prepared, GenerationParams(max_new_tokens=16))
    text = plain[0].text
    assert len(text) >= 6, f"the tiny model's answer is too short to test stop strings: {text!r}"
    stop = text[3:6]
    params = [
        GenerationParams(max_new_tokens=16, stop=(stop,)),
        GenerationParams(max_new_tokens=16),
        GenerationParams(max_new_tokens=5),
    ]
    pieces: list[list[str]] = [[], [], []]
    sinks = [pieces[0].append, None, pieces[2].append]
    out = generate_prepared(tiny_model, prepared, params, sinks=sinks)
    assert out[0].text == text[: text.find(stop)].strip()
    assert out[0].finish_reason == "stop"
    assert out[1].text == plain[1].text
    assert "".join(pieces[0]) == out[0].text
    assert "".join(pieces[2]) == out[2].text
    assert pieces[1] == []


def test_cancelled_row_stops_others_continue(tiny_model):
    prepared = [prepare_conversation(tiny_model, c) for c in conversations()[:2]]
    cancel = threading.Event()
    cancel.set()
    params = GenerationParams(max_new_tokens=12)
    out = generate_prepared(tiny_model, prepared, params, cancels=[cancel, None])
    assert out[0].completion_tokens <= 1
    assert out[1].text == generate_prepared(tiny_model, prepared[1:], params)[0].text


def test_bad_input_names_the_place(tiny_model):
    with pytest.raises(BlspError, match=r"/nonexistent/x.wav: audio file not found"):
        prepare_conversation(
            tiny_model,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "audio", "audio": "/nonexistent/x.wav"},
                    ],
                }
            ],
        )
    with pytest.raises(BlspError, match="role must be"):
        prepare_conversation(tiny_model, [{"role": "robot", "content": "hi"}])
    with pytest.raises(BlspError, match="unknown part type 'image'"):
        prepare_conversation(tiny_model, [{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(BlspError, match="share temperature"):
        ex = prepare_conversation(tiny_model, conversations()[1])
        generate_prepared(tiny_model, [ex, ex], [GenerationParams(), GenerationParams(temperature=0.7)])
