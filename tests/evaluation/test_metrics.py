"""Metrics pinned against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blsp.evaluation import metrics
from blsp.evaluation.labels import LabelMapper, label_words
from blsp.evaluation.scoring import score_classify
from blsp.evaluation.tasks import make_task

# ----------------------------------------------------------------------------------------- WER


def test_wer_normalises_case_punctuation_and_numbers():
    # upper-case prompt vs a punctuated hypothesis with one extra word: 1 insertion / 6 words
    assert metrics.wer(
        ["MARK IS GOING TO SEE ELEPHANT"], ["Mark is going to see the elephant."]
    ) == pytest.approx(100 / 6)
    # Whisper's English normaliser: "Mr." -> "mister", "twenty-five dollars" -> "$25"
    assert metrics.wer(["Mr. Smith has twenty-five dollars"], ["Mister Smith has $25."]) == 0.0
    assert metrics.normalize("Mr. Smith has twenty-five dollars") == "mister smith has $25"


def test_wer_is_pooled_over_the_corpus_with_counts():
    er = metrics.error_rate(["a b c d", "e f"], ["a x c d", "e"])
    # 1 substitution + 1 deletion over 6 reference words (not the mean of 25% and 50%)
    assert er["score"] == pytest.approx(100 * 2 / 6)
    assert (er["substitutions"], er["deletions"], er["insertions"], er["hits"]) == (1, 1, 0, 4)
    assert er["metric"] == "wer"


def test_wer_empty_hypothesis_and_empty_reference():
    er = metrics.error_rate(["hello world", "Uh, um!"], ["", "anything"])  # fillers normalise away
    assert er["score"] == 100.0  # two deletions of two words
    assert er["skipped_empty_refs"] == 1 and er["n"] == 1
    assert metrics.error_rate([], [])["score"] is None


def test_cer_for_chinese():
    er = metrics.error_rate(["不要把难做的事。"], ["不要把难作的事"], lang="zh")
    assert er["metric"] == "cer"
    assert er["score"] == pytest.approx(100 / 7)


# ---------------------------------------------------------------------------------------- BLEU


def test_bleu_hand_computed():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        expected, abs=1e-6
    )
    assert metrics.bleu(["Ein Hund läuft."], ["Ein Hund läuft."], "de") == pytest.approx(100.0)
    assert metrics.bleu([], [], "de") is None


def test_bleu_tokenizer_per_target_language():
    assert metrics.bleu_tokenizer("de") == "13a" and metrics.bleu_tokenizer("fr") == "13a"
    assert metrics.bleu_tokenizer("en") == "13a" and metrics.bleu_tokenizer("zh") == "zh"
    hyp = ref = "我爱北京天安门"
    assert metrics.bleu([hyp], [ref], "zh") == pytest.approx(100.0)  # 7 character tokens
    assert metrics.bleu([hyp], [ref], "en") == 0.0  # one 13a token: no 4-grams
    assert "tok:zh" in metrics.bleu_signature("zh") and "tok:13a" in metrics.bleu_signature("de")


def test_chrf_sanity():
    same = metrics.chrf(["a man rides a bike"], ["a man rides a bike"])
    close = metrics.chrf(["a man rides a bicycle"], ["a man rides a bike"])
    far = metrics.chrf(["xyz qqq"], ["a man rides a bike"])
    assert same == pytest.approx(100.0)
    assert 0 <= far < close < same
    assert far == pytest.approx(0.0)


# ---------------------------------------------------------------------------- label mapping


SNIPS = [
    "DecreaseBrightness",
    "IncreaseBrightness",
    "SetLightBrightness",
    "SetLightColor",
    "SwitchLightOff",
    "SwitchLightOn",
]


def test_label_words_splits_camel_case():
    assert label_words("SwitchLightOn") == "switch light on"
    assert label_words("change_language-English") == "change language english"


@pytest.mark.parametrize(
    "answer,label,how",
    [
        ("SwitchLightOn", "SwitchLightOn", "exact"),
        ("switch light on.", "SwitchLightOn", "case"),
        ("switchlightoff", "SwitchLightOff", "case"),
        ("The intent is SwitchLightOff.", "SwitchLightOff", "contains"),
        ("You want to set light color to red", "SetLightColor", "contains"),
        ("Swich light of", "SwitchLightOff", "fuzzy"),
        ("hello there", None, "none"),
        ("", None, "none"),
        ("DecreaseBrightness, IncreaseBrightness, SetLightBrightness", None, "ambiguous"),
    ],
)
def test_label_mapping_camel_case_labels(answer, label, how):
    m = LabelMapper(SNIPS).map(answer)
    assert (m.label, m.how) == (label, how)


def test_label_mapping_prefers_longest_mention():
    m = LabelMapper(["mocha", "iced mocha", "coffee", "iced coffee", "house coffee"])
    assert m.map("An iced mocha, please.").label == "iced mocha"
    assert m.map("Iced Coffee").label == "iced coffee"
    assert m.map("just a coffee").label == "coffee"
    s = LabelMapper(["positive", "negative", "neutral"])
    assert s.map("The emotional tone of the text is negative.").label == "negative"
    assert s.map("positive, negative, or neutral").how == "ambiguous"


def test_accuracy_and_out_of_set_rate():
    task = make_task(
        "sentiment", [{"id": str(i), "label": lab} for i, lab in enumerate(["positive"] * 3 + ["negative"])]
    )
    mapper = LabelMapper(task.labels)
    answers = ["Positive.", "negative", "I cannot tell", None]  # right, wrong, out of set, failed
    rows = []
    for it, a in zip(task.items, answers, strict=True):
        row = {"id": it["id"], "ok": a is not None, "response": a, "reference": it["label"]}
        if a is not None:
            m = mapper.map(a)
            row["label"], row["how"] = m.label, m.how
        rows.append(row)
    res = score_classify(task, rows)
    assert res["accuracy"] == pytest.approx(25.0)  # 1 of 4; the failed one counts as wrong
    assert res["out_of_set_rate"] == pytest.approx(100 / 3)  # 1 of the 3 answered
    assert res["failed"] == 1
    assert metrics.accuracy(["a", None, "b", "a"], ["a", "a", "a", "a"]) == {
        "accuracy": 50.0,
        "out_of_set_rate": 25.0,
        "n": 4,
    }


# --------------------------------------------------------------------------------- cosines


def test_cosine_tables_on_known_vectors():
    s_cw = np.array([[1.0, 0.0], [0.0, 2.0]])
    s_sa = np.array([[1.0, 1.0], [0.0, -1.0]])
    t_cw = np.array([[3.0, 0.0], [1.0, 1.0]])
    t_sa = np.array([[1.0, 1.0], [0.0, 1.0]])
    cross = metrics.cross_instruction_table({"CW": s_cw, "SA": s_sa})
    # row 0: cos((1,0),(1,1)) = 1/sqrt2 ; row 1: cos((0,2),(0,-1)) = -1
    assert cross["CW"]["SA"] == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    assert cross["SA"]["CW"] == pytest.approx(cross["CW"]["SA"])
    assert cross["CW"]["CW"] == pytest.approx(1.0)
    paired = metrics.paired_modality_table({"CW": s_cw, "SA": s_sa}, {"CW": t_cw, "SA": t_sa})
    assert paired["CW"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert paired["SA"] == pytest.approx((1 - 1) / 2)
    with pytest.raises(ValueError):
        metrics.paired_cosine(s_cw, np.zeros((3, 2)))
