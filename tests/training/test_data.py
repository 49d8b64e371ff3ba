"""Manifests -> examples, and the deterministic, length-grouped, rank-sharded batch plan."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from blsp.errors import BlspError, ConfigError
from blsp.instructions import CONTINUATION, REPETITION, asr_instructions, task_instruction
from blsp.training.config import DataConfig, SourceConfig
from blsp.training.data import BatchPlan, Example, load_source


def _examples(n: int, source: int = 0, seed: int = 0) -> list[Example]:
    import random

    rng = random.Random(seed)
    return [
        Example(
            id=f"s{source}-{i}",
            instruction="x",
            response="y" * rng.randint(1, 40),
            audio="a.wav",
            duration=rng.uniform(0.5, 20.0),
            source=source,
        )
        for i in range(n)
    ]


def test_tasks_turn_lines_into_examples(tiny_manifests):
    path = tiny_manifests["train"]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    dc = DataConfig()
    beh = load_source(SourceConfig(path=str(path)), 0, dc, seed=0)
    assert len(beh) == len(rows)
    assert {e.instruction for e in beh} == {CONTINUATION, REPETITION}
    assert beh[0].response == rows[0]["response"] and beh[0].transcript == rows[0]["text"]
    assert beh[0].audio.startswith(str(path.parent)) and beh[0].duration == rows[0]["duration"]
    rep = load_source(SourceConfig(path=str(path), task="repetition"), 0, dc, seed=0)
    assert all(e.instruction == REPETITION and e.response == e.transcript for e in rep)
    asr = load_source(SourceConfig(path=str(path), task="asr"), 0, dc, seed=0)
    assert all(e.instruction in asr_instructions() and e.response == e.transcript for e in asr)
    assert len({e.instruction for e in asr}) > 1  # drawn per example
    assert [e.instruction for e in asr] == [
        e.instruction for e in load_source(SourceConfig(path=str(path), task="asr"), 0, dc, seed=0)
    ]
    tgt = load_source(
        SourceConfig(path=str(path), task="target", instruction="st:German", target_field="text"), 0, dc, 0
    )
    assert tgt[0].instruction == task_instruction("st:German") and tgt[0].response == rows[0]["text"]


def test_bad_lines_are_skipped_and_counted(tmp_path, tiny_manifests, caplog):
    good = tiny_manifests["train"].read_text().splitlines()
    lines = [
        good[0],
        "{not json",
        json.dumps({"id": "x", "audio": "wav/none.wav"}),
        good[1],
        json.dumps({**json.loads(good[2]), "duration": 99.0}),
    ]
    p = tiny_manifests["train"].parent / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        ex = load_source(SourceConfig(path=str(p)), 0, DataConfig(), seed=0)
    assert len(ex) == 2
    msg = caplog.text
    assert (
        "skipped 3 lines" in msg
        and "malformed JSON (not one JSON object) (first on line 2)" in msg
        and "duration outside" in msg
    )


def test_missing_and_unusable_manifests_are_clear_errors(tmp_path):
    with pytest.raises(BlspError, match="nope.jsonl: manifest not found"):
        load_source(SourceConfig(path=str(tmp_path / "nope.jsonl")), 0, DataConfig(), 0)
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "audio": "a.wav", "duration": 1.0, "behavior": "continuation"}\n[1, 2]\n')
    with pytest.raises(BlspError, match=r"bad.jsonl: no usable lines.*missing field 'response'.*line 1"):
        load_source(SourceConfig(path=str(p)), 0, DataConfig(), 0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BlspError, match="empty file"):
        load_source(SourceConfig(path=str(tmp_path / "empty.jsonl")), 0, DataConfig(), 0)


def test_plan_is_deterministic_and_the_same_for_any_world_size():
    ex = [_examples(50)]
    one = BatchPlan(ex, [None], global_batch_size=8, micro_batch_size=2, world_size=1, seed=3)
    two = BatchPlan(ex, [None], global_batch_size=8, micro_batch_size=2, world_size=2, seed=3)
    assert one.steps_per_epoch == 6 and one.accumulation == 4 and two.accumulation == 2
    for step in range(6):
        e, k = one.position(step)
        a = one.micro_batches(e, k, 0)
        b = two.micro_batches(e, k, 0) + two.micro_batches(e, k, 1)
        assert sorted(map(tuple, a)) == sorted(map(tuple, b))  # same micro-batches, dealt to ranks
    seen = [i for k in range(6) for mb in one.micro_batches(0, k, 0) for i in mb]
    assert len(seen) == len(set(seen)) == 48  # one epoch: each example at most once
    assert one.epoch_batches(1) != one.epoch_batches(0)  # reshuffled per epoch
    again = BatchPlan(ex, [None], global_batch_size=8, micro_batch_size=2, seed=3)
    assert again.epoch_batches(1) == one.epoch_batches(1)
    with pytest.raises(ConfigError, match="multiple of"):
        BatchPlan(ex, [None], global_batch_size=6, micro_batch_size=2, world_size=2)
    with pytest.raises(BlspError, match="fewer than one global batch"):
        BatchPlan([_examples(3)], [None], global_batch_size=8, micro_batch_size=2)


def test_length_grouping_cuts_padding():
    ex = [_examples(512, seed=1)]

    def padding(plan: BatchPlan) -> float:
        waste = 0.0
        for k in range(plan.steps_per_epoch):
            for mb in plan.micro_batches(0, k, 0):
                lens = [plan.flat[i].length for i in mb]
                waste += sum(max(lens) - x for x in lens)
        return waste

    kw = dict(global_batch_size=64, micro_batch_size=8, seed=0)
    grouped, plain = BatchPlan(ex, [None], **kw), BatchPlan(ex, [None], group_by_length=False, **kw)
    assert padding(grouped) < 0.3 * padding(plain)


def test_weighted_mixing_ratio():
    cont, rep = _examples(200, 0), _examples(30, 1)
    plan = BatchPlan([cont, rep], [9, 1], global_batch_size=10, micro_batch_size=5, seed=0, epoch_size=200)
    counts = Counter(plan.flat[i].source for b in plan.epoch_batches(0) for i in b)
    assert counts == {0: 180, 1: 20}


def test_overlong_responses_and_transcripts_are_skipped_and_counted(
    tiny_dirs, tiny_manifests, tmp_path, caplog
):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llm"])

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    good = [json.loads(x) for x in tiny_manifests["train"].read_text().splitlines()]
    long_text = "the quick brown fox jumps over the lazy dog " * 40
    rows = [
        good[0],
        {**good[1], "response": long_text},  # a runaway behavior response
        {**good[2], "text": long_text},  # a continuation line with a long transcript
        good[3],
    ]
    p = tmp_path / "long.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert count(long_text) > 64 >= max(count(r["response"]) for r in good[:4])
    src, dc = SourceConfig(path=str(p)), DataConfig(max_text_tokens=64)

    with caplog.at_level("WARNING"):
        ce = load_source(src, 0, dc, seed=0, count_tokens=count)
    assert [e.id for e in ce] == [good[0]["id"], good[2]["id"], good[3]["id"]]  # the transcript is unused
    assert (
        "skipped 1 lines: 1 x response longer than data.max_text_tokens=64 tokens (first on line 2)"
        in caplog.text
    )
    kl = load_source(src, 0, dc, seed=0, needs_transcript=True, count_tokens=count)  # the teacher reads it
    assert [e.id for e in kl] == [good[0]["id"], good[3]["id"]]
    assert len(load_source(src, 0, DataConfig(max_text_tokens=None), seed=0, count_tokens=count)) == 4
    assert DataConfig().max_text_tokens == 1024


def test_data_fingerprint_names_what_changed(tiny_manifests, tmp_path, monkeypatch):
    import os
    import shutil

    from blsp.training.data import data_changes, data_fingerprint

    monkeypatch.setenv("BLSP_CACHE", str(tmp_path / "cache"))  # file_sha256's memo
    p = tmp_path / "train.jsonl"
    shutil.copy(tiny_manifests["train"], p)
    src = [SourceConfig(path=str(p))]
    then = data_fingerprint(src)
    os.utime(p, ns=(1, 1))  # touched, same content
    assert data_changes(then, data_fingerprint(src)) == []

    p.write_text(p.read_text() + p.read_text().splitlines()[0].replace('"id": "', '"id": "x') + "\n")
    changed = data_changes(then, data_fingerprint(src))
    assert len(changed) == 1 and changed[0].startswith(f"data.train[0] {p.resolve()}: content changed")
    shutil.copy(tiny_manifests["train"], p)
    assert data_changes(then, data_fingerprint(src)) == []
    shutil.copy(p, tmp_path / "moved.jsonl")  # the same content elsewhere is the same data
    assert data_changes(then, data_fingerprint([SourceConfig(path=str(tmp_path / "moved.jsonl"))])) == []
    assert data_changes(then, data_fingerprint([SourceConfig(path=str(p), max_examples=8)])) == [
        f"data.train[0] {p.resolve()}: settings changed (max_examples)"
    ]
    assert data_changes(then, data_fingerprint(src * 2)) == ["1 train source(s) then, 2 now"]
