"""Test sets: TTS-built with held-out voices, and the real shared sets adapted to tasks."""

from __future__ import annotations

import json

import pytest

from blsp.data.audio import load_audio
from blsp.evaluation.tasks import make_task, translation_instruction
from blsp.evaluation.testsets import EVAL_VOICES, build_testset, load_testset, make_tasks
from blsp.instructions import task_instruction


def _rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_build_tts_testsets_from_the_package_texts(tmp_path):
    root = tmp_path / "sets"
    m_intent = build_testset("tts-intent", root, n=2)
    m_zh = build_testset("tts-x2en-zh", root, n=2)
    intent_rows, zh_rows = _rows(m_intent), _rows(m_zh)
    assert len(intent_rows) == 2 and len(zh_rows) == 2
    # only the voices kept out of training speak the test sets
    assert {r["speaker"] for r in intent_rows} <= set(EVAL_VOICES["en"])
    assert {r["speaker"] for r in zh_rows} <= set(EVAL_VOICES["zh"])
    # building again resumes: nothing is added twice
    build_testset("tts-intent", root, n=2)
    assert len(_rows(m_intent)) == 2

    tasks = make_tasks(["intent", "x2en:zh"], root=root)
    intent, zh = tasks
    assert intent.key == "intent@tts-intent" and intent.instruction == task_instruction("snips")
    assert all(intent.reference(it) in intent.labels for it in intent.items)
    assert (
        zh.instruction
        == translation_instruction("zh", "en")
        == ("Please translate the following Chinese text into English text.")
    )
    assert zh.target_lang == "en" and all(zh.reference(it) for it in zh.items)
    wav = load_audio(zh.items[0]["audio"])
    assert wav.ndim == 1 and len(wav) > 8000


def test_build_st_set_from_shared_text(tmp_path, shared_data):
    m = build_testset(
        "tts-st-en", tmp_path, n=2, source="shared", shared=shared_data, voices=["espeak:en-us"]
    )
    rows = _rows(m)
    assert len(rows) == 2 and all(r["de"] and r["fr"] and r["lang"] == "en" for r in rows)
    _, items = load_testset(str(m))
    de = make_task("st:de", items, "x")
    assert de.instruction == task_instruction("st:German") and de.reference(items[0]) == rows[0]["de"]


def test_real_sets_map_to_tasks(shared_data):
    coffee, zh, ocean = make_tasks(
        ["coffee", "asr@commonvoice-zh", "asr@speechocean762"], shared=shared_data, limit=3
    )
    # every Picovoice order is orderDrink: the task is naming the drink (coffeeDrink slot), over all drinks
    assert len(coffee.items) == 3 and len(coffee.labels) == 10 and "iced mocha" in coffee.labels
    assert all(coffee.reference(it) in coffee.labels for it in coffee.items)
    assert "choose from [americano, cappuccino" in coffee.instruction
    assert zh.target_lang == "zh" and zh.reference(zh.items[0])  # scored by CER
    assert ocean.target_lang == "en" and ocean.reference(ocean.items[0]).isupper()
    for t in (coffee, zh, ocean):
        assert len(load_audio(t.items[0]["audio"])) > 1000


def test_unknown_names_are_clear_errors(tmp_path):
    from blsp.errors import BlspError

    with pytest.raises(BlspError, match="not found"):
        load_testset("tts-asr-en", root=tmp_path)
    with pytest.raises(BlspError, match="unknown task"):
        make_task("translate", [])
    with pytest.raises(BlspError, match="unknown test set"):
        build_testset("nope", tmp_path)
