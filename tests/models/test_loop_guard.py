"""The loop guard: an answer that falls into a loop ends there and keeps one copy of the span."""

from __future__ import annotations

import pytest

from blsp.models.generation_blsp import (
    FINISH_LENGTH,
    FINISH_STOP,
    LOOP_MIN_TOKENS,
    DecodeRow,
    GenerationParams,
    first_loop,
    generate,
    loop_start,
)


def test_loop_start_needs_three_copies_over_twelve_tokens():
    head = [101, 102, 103]
    assert loop_start(head + [7] * LOOP_MIN_TOKENS) == len(head) + 1  # one 7 kept
    assert loop_start(head + [7] * (LOOP_MIN_TOKENS - 1)) is None  # "no no no ..." 11 times is text
    assert loop_start(head + [5, 6] * 6) == len(head) + 2
    assert loop_start(head + [5, 6] * 5) is None
    span = [1, 2, 3, 4]
    assert loop_start(head + span * 3) == len(head) + 4
    assert loop_start(head + span * 2) is None
    assert loop_start(head + span * 3 + [9]) is None  # only a loop at the very end counts
    assert loop_start(list(range(40))) is None and loop_start([]) is None


def test_first_loop_finds_where_it_began():
    tokens = [11, 12] + [7] * 30 + [8, 9]
    assert first_loop(tokens) == 3  # the first prefix that ends in a loop: 11 12 7 | 7 ...
    assert first_loop([1, 2, 3] * 3) is None  # 9 tokens: too short to call a loop
    assert first_loop(list(range(100))) is None


@pytest.fixture(scope="module")
def shipped():
    from blsp.models.modeling_blsp import BlspModel

    return BlspModel.from_pretrained(device="cpu", dtype="float32")


@pytest.mark.slow
def test_real_model_loop_is_cut_the_same_way_on_every_path(shipped):
    """The shipped model, asked to repeat a text ending in "long long long long", goes on saying
    "long": plain greedy decoding runs to the budget, the guard stops after one copy."""
    from blsp.models.prompt import make_conversation

    conv = make_conversation(
        "Please repeat the following words.", transcript="our roar checks up a long long long long"
    )
    plain = GenerationParams(max_new_tokens=40, loop_guard=False)
    raw = generate(shipped, [{"conversation": conv}], plain)[0]
    assert raw.finish_reason == FINISH_LENGTH and len(raw.token_ids) == 40
    keep = first_loop(raw.token_ids)
    assert keep is not None and keep < 20

    guarded = generate(shipped, [{"conversation": conv}], GenerationParams(max_new_tokens=40))[0]
    assert guarded.finish_reason == FINISH_STOP
    assert guarded.token_ids == raw.token_ids[:keep]
    assert guarded.text == shipped.tokenizer.decode(raw.token_ids[:keep], skip_special_tokens=True).strip()
    assert guarded.text.startswith("Our roar checks up a long") and "long long" not in guarded.text
    assert shipped.generate([{"conversation": conv}], max_new_tokens=40) == [guarded.text]

    # The step-by-step decoder of the server's continuous batching ends the row at the same token.
    row = DecodeRow(shipped.tokenizer, GenerationParams(max_new_tokens=40), shipped.prompt.stop_token_ids, 0)
    for t in raw.token_ids:
        if row.push(t):
            break
    assert row.result().text == guarded.text and row.result().finish_reason == FINISH_STOP
    assert len(row.tokens) < len(raw.token_ids)  # it stopped decoding, not only cut afterwards
