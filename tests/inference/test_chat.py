"""Multi-turn chat: the KV cache kept across turns gives the answers of a fresh recompute."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from blsp.errors import BlspError
from blsp.inference.chat import ChatSession, run_terminal_chat
from blsp.inference.pipeline import SpeechPipeline


def clip(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def test_cached_turns_equal_recompute(tiny_model):
    pipe = SpeechPipeline(tiny_model, max_new_tokens=6)
    chat = ChatSession(pipe, system="a man in an orange hat")
    turns = [
        [
            {"type": "text", "text": "please repeat the following words"},
            {"type": "audio", "audio": clip(1.0, 1)},
        ],
        "the quick brown fox",
        [{"type": "audio", "audio": clip(0.7, 2)}],
        "continue the following text",
    ]
    for k, turn in enumerate(turns):
        before = chat.messages()
        got = chat.send(turn)
        user = chat.history[-2]
        # Recomputed from scratch by the model's own generate (no cache): the same tokens.
        ref = tiny_model.generate([{"conversation": [*before, user]}], max_new_tokens=6, return_ids=True)[0]
        assert got.token_ids == ref, f"turn {k}"
        assert got.text == tiny_model.tokenizer.decode(ref, skip_special_tokens=True).strip()
        assert chat.last_reused + chat.last_computed == got.prompt_tokens
        if k:
            assert chat.last_reused > 0, f"turn {k} recomputed everything"
            assert chat.last_computed < chat.last_reused
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 4


def test_no_cache_mode_and_streaming_give_the_same(tiny_model):
    turns = ["the quick brown fox", [{"type": "audio", "audio": clip(0.5, 3)}], "please repeat"]
    a, b = ChatSession(tiny_model), ChatSession(tiny_model, use_cache=False)
    for turn in turns:
        pieces: list[str] = []
        ra = a.send(turn, max_new_tokens=5, sink=pieces.append)
        rb = b.send(turn, max_new_tokens=5)
        assert ra.text == rb.text == "".join(pieces)
    assert b.last_reused == 0 and a.last_reused > 0


def test_history_is_cut_from_the_oldest_turn(tiny_model):
    chat = ChatSession(tiny_model, system="the lazy dog", max_context=90)
    for k in range(6):
        chat.send(f"the quick brown fox number {k}", max_new_tokens=4)
        assert chat.last_reused + chat.last_computed + 4 <= 90  # the prompt of this turn + its answer fit
    assert chat.dropped_turns > 0
    assert chat.messages()[0] == {"role": "system", "content": "the lazy dog"}
    assert chat.history[0]["role"] == "user" and "number 0" not in chat.history[0]["content"]
    assert "number 5" in chat.history[-2]["content"]
    with pytest.raises(BlspError, match="does not fit the context window"):
        chat.send("please repeat the following words " * 40, max_new_tokens=4)


def test_terminal_chat_mixes_text_and_audio_and_survives_bad_input(tiny_model, tmp_path):
    wav = tmp_path / "turn.wav"
    sf.write(wav, clip(0.8, 4), 16000)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    script = (
        "\n".join(
            [
                "the quick brown fox",
                f"/audio {wav} please repeat the following words",
                f"/audio {tmp_path / 'missing.wav'}",
                f"/audio {bad}",
                "/nonsense",
                "/mic 0.5 describe it",
                "/history",
                "/reset",
                "hello",
                "/quit",
                "never read",
            ]
        )
        + "\n"
    )
    out = io.StringIO()
    chat = ChatSession(tiny_model)
    rc = run_terminal_chat(chat, stdin=io.StringIO(script), stdout=out, max_new_tokens=4)
    text = out.getvalue()
    assert rc == 0
    assert text.count("assistant> ") == 3
    assert f"\nerror: {tmp_path / 'missing.wav'}: audio file not found" in text
    assert f"\nerror: {bad}: cannot decode audio" in text
    assert "unknown command /nonsense" in text
    try:
        import sounddevice  # noqa: F401
    except Exception:  # not installed here, or no PortAudio: /mic says why and the chat goes on
        assert "error: microphone input needs the 'sounddevice' package" in text
    assert "user: please repeat the following words [audio 0.8 s]" in text
    assert "(conversation reset)" in text
    assert len(chat.history) == 2  # only the turn after /reset
