"""Speech-blindness measures: the content gap, distinct answers, the baseline-corrected cosine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blsp.evaluation import metrics, scoring
from blsp.evaluation.analysis import Representations, representation_analysis, representation_tables
from blsp.evaluation.markdown import results_to_markdown
from blsp.evaluation.model_calls import response_nll
from blsp.evaluation.runner import content_partners, run_eval
from blsp.evaluation.systems import BlspSystem, TextSystem
from blsp.evaluation.tasks import make_task
from blsp.instructions import REPETITION, TABLE6
from blsp.models.prompt import make_conversation

TEXTS = ["the quick brown fox", "a man in an orange hat", "please repeat the following words"]


def _items(n: int = 3, seconds: float = 3.0) -> list[dict]:
    """Tones of different pitch, all of one length (so a constant adapter output makes them one input)."""
    t = np.arange(int(16000 * seconds)) / 16000
    return [
        {
            "id": f"c{i}",
            "audio_array": (0.3 * np.sin(2 * np.pi * (220 * 3**i) * t)).astype(np.float32),
            "text": TEXTS[i % len(TEXTS)],
        }
        for i in range(n)
    ]


def _speech_sensitive(model) -> None:
    """Make the tiny random model's loss depend on the clip: the random Whisper's output is its
    positional embeddings nearly alone (every clip encodes alike) and the random LLM barely reads its
    context (its value/output projections and head are scaled up)."""
    with torch.no_grad():
        model.encoder.whisper.embed_positions.weight.zero_()
        for layer in model.llm.model.layers:
            layer.self_attn.v_proj.weight.mul_(30)
            layer.self_attn.o_proj.weight.mul_(30)
        model.llm.lm_head.weight.mul_(30)


def _constant_adapter(model) -> None:
    """Every clip gives the same speech vectors: LayerNorm weight 0, a fixed bias."""
    with torch.no_grad():
        model.adapter.norm.weight.zero_()
        model.adapter.norm.bias.copy_(torch.linspace(-1.0, 1.0, model.adapter.norm.bias.numel()))


def test_content_task_matched_shuffled_and_gap(tiny_model, tmp_path):
    _speech_sensitive(tiny_model)
    items = _items()
    task = make_task("content", items, testset="noise")
    assert task.kind == "content" and task.instruction == REPETITION
    assert {k: p["id"] for k, p in content_partners(items).items()} == {"c0": "c1", "c1": "c2", "c2": "c0"}

    res = run_eval([BlspSystem(tiny_model, name="BLSP"), TextSystem(tiny_model)], [task], tmp_path / "o")
    r = res["results"]["BLSP"]["content@noise"]
    assert r["n"] == 3 and r["failed"] == 0 and r["tokens"] > 0
    assert r["gap"] == pytest.approx(r["shuffled"] - r["matched"], abs=1e-12)
    assert abs(r["gap"]) > 1e-2  # other speech, other loss (a random model: either sign)
    assert r["uses_speech"] is (r["gap"] >= scoring.SPEECH_GAP_NATS)
    assert res["results"]["Text+LLM"]["content@noise"]["status"].startswith("n/a")  # no speech path

    # each row's matched loss is the model's own mean token loss on that example (all logits, no shared head)
    rows = [
        json.loads(x)
        for x in (tmp_path / "o" / "outputs" / "BLSP" / "content@noise.jsonl").read_text().splitlines()
    ]
    row = next(x for x in rows if x["id"] == "c1")
    assert row["partner"] == "c2"
    for audio, key in ((items[1]["audio_array"], "matched_sum"), (items[2]["audio_array"], "shuffled_sum")):
        batch = tiny_model.collate(
            [{"conversation": make_conversation(REPETITION, audio=audio), "response": items[1]["text"]}]
        )
        with torch.no_grad():
            loss = float(tiny_model(**batch).loss)
        assert row[key] / row["tokens"] == pytest.approx(loss, rel=1e-4)
    md = results_to_markdown(res)
    assert "## content@noise" in md and "matched nats/tok" in md
    assert "| Text+LLM | n/a |" in md

    # a different sample (--limit) pairs c1 with c0 instead: its row is scored again, not reused
    res2 = run_eval(
        [BlspSystem(tiny_model, name="BLSP")], [make_task("content", items[:2], "noise")], tmp_path / "o"
    )
    rows = [
        json.loads(x)
        for x in (tmp_path / "o" / "outputs" / "BLSP" / "content@noise.jsonl").read_text().splitlines()
    ]
    assert {x["id"]: x["partner"] for x in rows} == {"c0": "c1", "c1": "c0"}
    assert res2["results"]["BLSP"]["content@noise"]["n"] == 2


def test_response_nll_sums_per_example(tiny_model):
    exs = [{"conversation": make_conversation(REPETITION, transcript=t), "response": t} for t in TEXTS[:2]]
    both = response_nll(tiny_model, exs)
    assert both == [pytest.approx(response_nll(tiny_model, [ex])[0], rel=1e-4) for ex in exs]
    assert [n for _, n in both] == [len(tiny_model.prompt.response_ids(t)) for t in TEXTS[:2]]


def test_constant_speech_has_no_gap_and_is_flagged(tiny_model, tmp_path):
    _speech_sensitive(tiny_model)
    task = make_task("content", _items(), testset="noise")
    before = run_eval([BlspSystem(tiny_model, name="m")], [task], tmp_path / "a")["results"]["m"][
        "content@noise"
    ]
    assert abs(before["gap"]) > 1e-2
    _constant_adapter(tiny_model)
    res = run_eval([BlspSystem(tiny_model, name="deaf")], [task], tmp_path / "b")
    r = res["results"]["deaf"]["content@noise"]
    assert r["failed"] == 0 and r["matched"] > 0
    assert abs(r["gap"]) < 1e-4
    assert r["uses_speech"] is False
    md = results_to_markdown(res)
    assert "does not use the speech (gap < 0.1 nats)" in md
    assert "(does not use the speech)" in md.split("\n## ", 1)[0]  # in the overview table too


def test_speech_flag_threshold():
    task = make_task("content", [])

    def rows(gap: float) -> list[dict]:
        return [{"id": "a", "ok": True, "matched_sum": 4.0, "shuffled_sum": 4.0 + 2 * gap, "tokens": 2},
                {"id": "b", "ok": False, "error": "AudioError: x"}]  # fmt: skip

    hi, lo = scoring.score(task, rows(0.3)), scoring.score(task, rows(0.05))
    assert hi["gap"] == pytest.approx(0.3) and hi["uses_speech"] is True and hi["failed"] == 1
    assert lo["gap"] == pytest.approx(0.05) and lo["uses_speech"] is False
    assert scoring.speech_verdict(lo) == "does not use the speech (gap < 0.1 nats)"
    assert scoring.score(task, rows(0.3)[1:])["uses_speech"] is None  # nothing scored: no verdict
    assert "distinct_answers" not in hi  # content generates no answers


def test_distinct_answers_on_hand_made_rows():
    task = make_task("asr", [])
    rows = [
        {"id": "1", "ok": True, "response": "Hello, world!", "reference": "hello world"},
        {"id": "2", "ok": True, "response": "hello world", "reference": "a b"},
        {"id": "3", "ok": True, "response": "Good bye.", "reference": "c d"},
        {"id": "4", "ok": False, "response": None, "error": "AudioError: x", "reference": "e f"},
    ]
    res = scoring.score(task, rows)
    assert res["distinct_answers"] == 2 and res["distinct_ratio"] == pytest.approx(0.5)
    cls = scoring.score(make_task("sentiment", []), [dict(r, label=None) for r in rows])
    assert cls["distinct_answers"] == 2
    assert metrics.distinct_count(["A.", "a", ""]) == 2
    md = results_to_markdown(
        {"tasks": [task.describe()], "systems": [{"name": "S"}], "results": {"S": {"asr": res}}}
    )
    assert "| distinct |" in md and "| 2/4 |" in md


def test_distinct_answers_in_eval_tables(tiny_model, tmp_path):
    res = run_eval(
        [TextSystem(tiny_model)], [make_task("asr", _items(), "noise")], tmp_path / "o", max_new_tokens=3
    )
    r = res["results"]["Text+LLM"]["asr@noise"]
    assert 1 <= r["distinct_answers"] <= 3 and r["n"] == 3
    assert f"{r['distinct_answers']}/3" in (tmp_path / "o" / "results.md").read_text()


def test_corrected_cosine_is_zero_for_identical_speech_vectors():
    rng = np.random.default_rng(0)
    text = rng.standard_normal((5, 8)) + 3.0  # transcripts in one region, the speech vector near it
    same = np.tile(text.mean(0), (5, 1))
    assert metrics.paired_cosine(same, text) > 0.9  # the raw number looks "aligned"
    assert metrics.corrected_modality_table({"CW": same}, {"CW": text})["CW"] == pytest.approx(0.0, abs=1e-12)
    eye = np.eye(4)
    assert metrics.unpaired_cosine(eye, eye) == pytest.approx(0.0)
    assert metrics.corrected_modality_table({"CW": eye}, {"CW": eye})["CW"] == pytest.approx(1.0)
    assert metrics.unpaired_cosine(eye[:1], eye[:1]) is None
    tables = representation_tables(Representations(["a"] * 5, {"CW": same}, {"CW": text}))
    assert tables["paired_speech_text"]["CW"] > 0.9  # the raw table is kept
    assert tables["paired_speech_text_corrected"]["CW"] == pytest.approx(0.0, abs=1e-12)


def test_corrected_cosine_of_a_constant_adapter_model(tiny_model, tmp_path):
    _speech_sensitive(tiny_model)
    items = _items()
    t = representation_analysis(tiny_model, items, tmp_path / "r0", name="m", tsne=False)["tables"]
    assert max(abs(v) for v in t["paired_speech_text_corrected"].values()) > 1e-3
    _constant_adapter(tiny_model)
    out = representation_analysis(tiny_model, items, tmp_path / "repr", name="deaf", tsne=False)
    t = out["tables"]
    assert set(t["paired_speech_text_corrected"]) == set(TABLE6)
    for k in TABLE6:
        assert t["paired_speech_text_corrected"][k] == pytest.approx(0.0, abs=1e-5)
        assert t["paired_speech_text"][k] == pytest.approx(t["unpaired_speech_text"][k], abs=1e-5)
    assert "| paired − unpaired |" in out["markdown"] and "| paired |" in out["markdown"]


def test_demo_report_shows_gap_flag_and_distinct_answers(tmp_path):
    from blsp import demo

    assert "content@tts-asr-en" in demo.EVAL_TASKS
    results = {
        "tasks": [{"key": "asr@t", "kind": "asr"}, {"key": "content@t", "kind": "content"}],
        "systems": [{"name": n} for n in demo.SYSTEMS],
        "results": {
            "blsp": {
                "asr@t": {"n": 3, "distinct_answers": 1},
                "content@t": {"n": 3, "matched": 2.0, "shuffled": 2.05, "gap": 0.05, "uses_speech": False},
            },
            "blsp_rp": {
                "content@t": {"n": 3, "matched": 1.0, "shuffled": 1.5, "gap": 0.5, "uses_speech": True}
            },
            "text_llm": {"content@t": {"n": 3, "failed": 0, "status": "n/a: only a speech adapter"}},
        },
    }
    md = "\n".join(demo.speech_use_section(results, tmp_path))
    assert "| BLSP | 2.000 | 2.050 | 0.050 | does not use the speech (gap < 0.1 nats) | asr 1/3 |" in md
    assert "| BLSP+RP | 1.000 | 1.500 | 0.500 | uses the speech (gap >= 0.1 nats) | – |" in md
    assert "Text+LLM" not in md  # trained systems only
    # no intervals in these results: the verdict on the demo's own adapters is not checked
    assert "use the speech (gap above 0.3 nats, the whole 95 % interval, on every one)? **not checked**" in md
    results["tasks"] = results["tasks"][:1]
    assert demo.speech_use_section(results, tmp_path) == []  # no content task in the eval: no section


def test_evaluation_and_data_import_share_a_non_empty_spelling_map():
    """`make install` installs whisper-normalizer: the map is found, once, for both tools."""
    from blsp.data.normalize import get_normalizer
    from blsp.evaluation.metrics import english_spelling_map, normalize

    mapping, source = english_spelling_map()
    assert len(mapping) > 1000 and source.endswith("english.json")
    assert normalize("The colour of the centre") == "the color of the center"
    assert get_normalizer("whisper")("The colour of the centre") == "the color of the center"
