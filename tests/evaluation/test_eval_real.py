"""A small real evaluation: whisper-base + SmolLM2-135M-Instruct, untrained adapter, two clips."""

from __future__ import annotations

import pytest

from blsp.evaluation.runner import run_eval
from blsp.evaluation.systems import BlspSystem, CascadeSystem, ModelHandle, TextSystem
from blsp.evaluation.tasks import make_task
from blsp.instructions import TABLE6

pytestmark = pytest.mark.slow

SENTENCES = ["the weather is nice today", "please open the window"]


def test_real_models_table2_style_eval(real_model, speech_wav, tmp_path):
    from blsp.models.asr import WhisperTranscriber

    items = [
        {"id": f"r{i}", "audio": str(speech_wav(s)), "text": s, "lang": "en", "label": "positive"}
        for i, s in enumerate(SENTENCES)
    ]
    handle = ModelHandle(real_model)
    systems = [
        BlspSystem(handle, name="BLSP (untrained)"),
        TextSystem(handle),
        CascadeSystem(WhisperTranscriber("whisper-base"), handle, name="Whisper+LLM"),
    ]
    res = run_eval(
        systems, [make_task("asr", items, "espeak")], tmp_path / "eval", max_new_tokens=16, batch_size=2
    )
    r = res["results"]
    for s in r:
        for t in r[s].values():
            assert t["failed"] == 0 and t["n"] == 2
    whisper_alone = r["Whisper+LLM"]["asr@espeak"]["asr_component"]
    text_repeat = r["Text+LLM"]["asr@espeak"]["wer"]
    untrained = r["BLSP (untrained)"]["asr@espeak"]["wer"]
    assert whisper_alone <= 50.0  # whisper-base on synthetic espeak speech
    assert text_repeat < 50.0  # SmolLM2 follows "repeat the following words"
    assert untrained > text_repeat  # an untrained adapter carries no words
    assert (tmp_path / "eval" / "results.md").read_text().count("| Whisper+LLM |") >= 2
    # SmolLM2 answers in sentences ("The emotional tone of the text is positive..."): mapped, not out of set
    sent = run_eval(
        [systems[1]], [make_task("sentiment", items, "espeak")], tmp_path / "sent", max_new_tokens=16
    )
    s = sent["results"]["Text+LLM"]["sentiment@espeak"]
    assert s["failed"] == 0 and s["out_of_set_rate"] < 100.0 and 0.0 <= s["accuracy"] <= 100.0


def test_real_model_representations(real_model, speech_wav, tmp_path):
    from blsp.evaluation.analysis import representation_analysis

    items = [{"id": f"r{i}", "audio": str(speech_wav(s)), "text": s} for i, s in enumerate(SENTENCES)]
    two = {k: TABLE6[k] for k in ("CW", "SA")}
    out = representation_analysis(real_model, items, tmp_path, name="untrained", instructions=two, tsne=False)
    text_tab = out["tables"]["text_cross_instruction"]
    # the same transcript under two different instructions is not the same representation
    assert text_tab["CW"]["SA"] < 0.999 and text_tab["CW"]["CW"] == pytest.approx(1.0)
    assert set(out["tables"]["paired_speech_text"]) == {"CW", "SA"}
