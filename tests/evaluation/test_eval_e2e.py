"""`blsp eval` end to end on the tiny random model, and the pieces that need a model."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blsp.evaluation.judge import OpenAIJudge
from blsp.evaluation.markdown import results_to_markdown
from blsp.evaluation.model_calls import response_kl
from blsp.evaluation.runner import run_eval
from blsp.evaluation.systems import BlspSystem, ModelHandle, TextSystem
from blsp.evaluation.tasks import make_task
from blsp.instructions import CONTINUATION
from blsp.models.prompt import make_conversation
from blsp.utils.io import write_jsonl

SENTENCES = ["the quick brown fox", "a man in an orange hat"]


@pytest.fixture
def toy_manifest(tmp_path, speech_wav) -> Path:
    rows = [
        {
            "id": f"u{i}",
            "audio": str(speech_wav(s)),
            "text": s,
            "lang": "en",
            "de": ["der schnelle braune Fuchs", "ein Mann mit einem orangen Hut"][i],
            "label": ["positive", "negative"][i],
            "question": "What is this about?",
        }
        for i, s in enumerate(SENTENCES)
    ]
    # a clip that cannot be read: every speech system must count it as failed, never crash
    rows.append({"id": "bad", "audio": str(tmp_path / "missing.wav"), "text": "no audio here", "lang": "en",
                 "de": "kein Ton", "label": "neutral", "question": "What?"})  # fmt: skip
    path = tmp_path / "toy" / "test.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.fixture
def ctc_dir(tiny_blsp_config, tmp_path) -> Path:
    """A tiny CTC baseline adapter folder (character CTC head on the adapter)."""
    from blsp.models.ctc import configure_ctc
    from blsp.models.hub import load_llm
    from blsp.models.modeling_blsp import BlspModel

    cfg = copy.deepcopy(tiny_blsp_config)  # the fixture's config is shared with tiny_model
    _, tok = load_llm(cfg.llm)
    configure_ctc(cfg, tok, "chars", upsample=2, normalize=True)
    torch.manual_seed(1)
    model = BlspModel.from_config(cfg, device="cpu")
    out = tmp_path / "ctc"
    model.save_pretrained(out)
    return out


def test_blsp_eval_cli_end_to_end(tiny_model, tiny_dirs, toy_manifest, ctc_dir, tmp_path):
    from blsp.cli import main

    adapter = tmp_path / "adapter"
    tiny_model.save_pretrained(adapter)
    out = tmp_path / "eval"
    m = str(toy_manifest)
    argv = ["eval", "-s", f"BLSP=blsp:{adapter}", "-s", "text", "-s", f"ctc:{ctc_dir}", "-o", str(out),
            "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu", "--judge", str(tiny_dirs["llm"])]  # fmt: skip
    for t in ("asr", "st:de", "sentiment", "qa", "align"):
        argv += ["-t", f"{t}@{m}"]
    assert main(argv) == 0

    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["systems"]] == ["BLSP", "Text+LLM", "CTC+LLM"]
    keys = [t["key"] for t in res["tasks"]]
    assert keys == ["asr@toy", "st:de@toy", "sentiment@toy", "qa@toy", "align@toy"]
    r = res["results"]
    for task in keys:
        assert r["BLSP"][task]["n"] == 3 and r["BLSP"][task]["failed"] == 1  # the unreadable clip
        assert r["Text+LLM"][task]["failed"] == 0  # the text path needs no audio
        assert r["CTC+LLM"][task]["failed"] == 1
    # the cascade reports its standalone ASR next to the LLM-repeated WER (Table 2's two numbers)
    assert "asr_component" in r["CTC+LLM"]["asr@toy"] and "asr_component" not in r["BLSP"]["asr@toy"]
    assert r["BLSP"]["asr@toy"]["wer"] >= 0
    assert r["BLSP"]["st:de@toy"]["bleu_tokenizer"] == "13a"
    assert 0 <= r["Text+LLM"]["sentiment@toy"]["accuracy"] <= 100
    # the text path against itself: identical responses and zero KL
    align = r["Text+LLM"]["align@toy"]
    assert align["exact_match"] == 100.0 and align["chrf"] == pytest.approx(100.0)
    assert align["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["BLSP"]["align@toy"]["kl"] > 0 and r["BLSP"]["align@toy"]["kl_tokens"] > 0
    # a local judge answered every answered row (a failed answer is unacceptable without asking it)
    qa = r["BLSP"]["qa@toy"]
    assert qa["judged"] == 3 and "status" not in qa
    assert res["meta"]["bleu"]["de"].startswith("nrefs:1") and "en" in res["meta"]["normalizers"]

    md = (out / "results.md").read_text()
    assert "| System | asr@toy WER↓ | st:de@toy BLEU↑" in md
    assert "| CTC+LLM |" in md and "## align@toy" in md and "(1 failed)" in md

    rows = [json.loads(x) for x in (out / "outputs" / "BLSP" / "asr@toy.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in rows) == ["bad", "u0", "u1"]
    bad = next(x for x in rows if x["id"] == "bad")
    assert bad["ok"] is False and "AudioError" in bad["error"]
    tr = (out / "outputs" / "CTC+LLM" / "transcripts@toy.jsonl").read_text().splitlines()
    assert len(tr) == 2  # the failed clip's transcript is not kept: it is retried on the next run

    # resuming: a second run reuses every output line and gives the same metrics
    assert main(argv) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert len((out / "outputs" / "BLSP" / "asr@toy.jsonl").read_text().splitlines()) == 3
    for s in r:
        for t in keys:
            a, b = dict(r[s][t]), dict(res2["results"][s][t])
            a.pop("seconds"), b.pop("seconds")
            assert a == b

    # the missing clip appears: --retry-failed runs the failed utterances (only them) again
    shutil.copy(json.loads(toy_manifest.read_text().splitlines()[0])["audio"], tmp_path / "missing.wav")
    assert main([*argv, "--retry-failed"]) == 0
    res3 = json.loads((out / "results.json").read_text())["results"]
    assert res3["BLSP"]["asr@toy"]["failed"] == 0 and res3["CTC+LLM"]["asr@toy"]["failed"] == 0
    assert len((out / "outputs" / "BLSP" / "asr@toy.jsonl").read_text().splitlines()) == 3


def test_judge_down_is_reported_not_scored_zero(tiny_model, toy_manifest, tmp_path):
    from blsp.evaluation.testsets import load_testset

    _, items = load_testset(str(toy_manifest))
    task = make_task("qa", items[:2], testset="toy")
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "judge", timeout=2)  # nothing listens on port 9
    res = run_eval([TextSystem(tiny_model)], [task], tmp_path / "qa", max_new_tokens=4, judge=judge)
    qa = res["results"]["Text+LLM"]["qa@toy"]
    assert qa["accept_rate"] is None and qa["judged"] == 0
    assert qa["status"].startswith("judge unavailable")
    assert "judge n/a" in results_to_markdown(res)


def test_a_system_that_cannot_load_is_recorded_not_fatal(tiny_model, toy_manifest, tmp_path):
    from blsp.evaluation.testsets import load_testset

    _, items = load_testset(str(toy_manifest))
    task = make_task("asr", items[:2], testset="toy")
    broken = BlspSystem(tmp_path / "no-such-adapter", name="broken")
    res = run_eval([broken, TextSystem(tiny_model)], [task], tmp_path / "out", max_new_tokens=4)
    assert res["results"]["broken"]["asr@toy"]["failed"] == 2
    assert "ModelLoadError" in json.dumps(res["results"]["broken"]["asr@toy"]["failure_kinds"])
    assert res["results"]["Text+LLM"]["asr@toy"]["failed"] == 0


def test_resuming_outputs_of_other_decoding_settings_is_refused(tiny_model, toy_manifest, tmp_path):
    from blsp.errors import BlspError
    from blsp.evaluation.testsets import load_testset

    _, items = load_testset(str(toy_manifest))
    task = make_task("asr", items[:2], testset="toy")
    out = tmp_path / "out"
    run_eval([TextSystem(tiny_model)], [task], out, max_new_tokens=4)
    assert json.loads((out / "outputs" / "decoding.json").read_text()) == {
        "max_new_tokens": 4,
        "loop_guard": True,
    }
    run_eval([TextSystem(tiny_model)], [task], out, max_new_tokens=4)  # the same settings resume
    with pytest.raises(BlspError, match=r"decoding.json: .*loop_guard=True there, False here"):
        run_eval([TextSystem(tiny_model)], [task], out, max_new_tokens=4, loop_guard=False)
    with pytest.raises(BlspError, match="max_new_tokens=4 there, 8 here"):
        run_eval([TextSystem(tiny_model)], [task], out, max_new_tokens=8)


def test_response_kl_matches_a_direct_computation(tiny_model):
    m = tiny_model
    a = make_conversation(CONTINUATION, transcript="the quick brown fox")
    b = make_conversation(CONTINUATION, transcript="a man in an orange hat")
    resp = "the lazy dog"
    (kl_same, n_same), (kl_diff, n_diff) = response_kl(m, [a, b], [a, a], [resp, resp])
    assert kl_same == pytest.approx(0.0, abs=1e-5)
    target = m.prompt.response_ids(resp)
    assert n_same == n_diff == len(target)

    def logprobs(conv):  # the LLM on plain token ids: distributions predicting each response token
        ids = torch.tensor([m.prompt.text_prompt(conv) + target])
        with torch.no_grad():
            logits = m.llm(input_ids=ids).logits[0].float()
        return torch.log_softmax(logits[-len(target) - 1 : -1], -1)

    lt, ls = logprobs(a), logprobs(b)
    expected = float((lt.exp() * (lt - ls)).sum())
    assert kl_diff == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert kl_diff > 0


def test_representation_analysis_tables_and_tsne(tiny_model, toy_manifest, tmp_path):
    from blsp.evaluation.analysis import extract_representations, last_prompt_states, representation_analysis
    from blsp.evaluation.testsets import load_testset
    from blsp.instructions import TABLE6

    _, items = load_testset(str(toy_manifest))
    out = representation_analysis(tiny_model, items, tmp_path / "repr", name="tiny", highlight=1)
    tables = out["tables"]
    assert tables["n"] == 2 and [s[0] for s in out["skipped"]] == ["bad"]
    t7 = tables["speech_cross_instruction"]
    assert list(t7) == list(TABLE6) and all(t7[k][k] == pytest.approx(1.0) for k in t7)
    assert set(tables["paired_speech_text"]) == set(TABLE6)
    assert all(-1.0 <= v <= 1.0 for v in tables["paired_speech_text"].values())
    assert Path(out["png"]).stat().st_size > 1000 and Path(out["npz"]).is_file()
    assert "Tables 7 / 12" in out["markdown"]

    # the text-path representation is the LLM's last hidden state at the last prompt token
    conv = make_conversation(TABLE6["CW"], transcript=items[0]["text"])
    ids = torch.tensor([tiny_model.prompt.text_prompt(conv)])
    with torch.no_grad():
        direct = tiny_model.llm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    got = last_prompt_states(tiny_model, [conv])[0]
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5)
    reps = extract_representations(tiny_model, items[:2], {"CW": TABLE6["CW"]})
    np.testing.assert_allclose(reps.text["CW"][0], direct, rtol=1e-4, atol=1e-5)


def test_progress_curve_over_checkpoints(tiny_model, toy_manifest, tmp_path):
    from blsp.evaluation.progress import expand_checkpoints, progress_curve
    from blsp.evaluation.testsets import load_testset

    run = tmp_path / "run"
    for step in (10, 20):
        ck = run / "checkpoints" / f"step-{step:08d}"
        tiny_model.save_pretrained(ck / "weights")
        (ck / "meta.json").write_text(json.dumps({"step": step}))
    assert [s for s, _ in expand_checkpoints([run])] == [10, 20]
    _, items = load_testset(str(toy_manifest), limit=2)
    tasks = [make_task("asr", items, "toy"), make_task("st:de", items, "toy")]
    res = progress_curve([run], tasks, tmp_path / "prog", max_new_tokens=4, device="cpu")
    assert list(res["series"]) == ["asr@toy WER", "st:de@toy BLEU"]
    assert [s for s, _ in res["series"]["asr@toy WER"]] == [10, 20]
    assert Path(res["png"]).stat().st_size > 1000


def test_model_handle_shares_and_releases(tiny_blsp_config, tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "a")
    h = ModelHandle(tmp_path / "a", device="cpu")
    assert not h.loaded
    m1 = h.get()
    assert h.get() is m1 and h.loaded
    h.release()
    assert not h.loaded
    ready = ModelHandle(tiny_model)
    ready.release()  # a model given ready is the caller's: kept
    assert ready.get() is tiny_model


def test_text_system_on_a_set_without_transcripts_is_not_applicable(tiny_model, toy_manifest, tmp_path):
    from blsp.evaluation.testsets import load_testset

    _, items = load_testset(str(toy_manifest))
    spoken_only = [{k: v for k, v in it.items() if k != "text"} for it in items[:2]]  # like picovoice-coffee
    res = run_eval([TextSystem(tiny_model)], [make_task("sentiment", spoken_only, "coffee")], tmp_path / "o")
    r = res["results"]["Text+LLM"]["sentiment@coffee"]
    assert r["status"].startswith("n/a") and r["failed"] == 0
    assert "| Text+LLM | n/a |" in results_to_markdown(res)
