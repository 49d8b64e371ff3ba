from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp.cli import main as blsp_main
from blsp.data.audio import load_audio, parse_audio_ref
from blsp.data.importers import gigaspeech_text, import_corpus
from blsp.data.manifest import read_manifest, resolve_audio_path
from blsp.errors import BlspError


def _read(path: Path) -> list[dict]:
    items, errors = read_manifest(path)
    assert errors == []
    return items


def test_librispeech_tree(tmp_path, espeak_audio):
    chap = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chap.mkdir(parents=True)
    texts = {
        "84-121123-0000": "GO DO YOU HEAR",
        "84-121123-0001": "BUT IN LESS THAN FIVE MINUTES",
        "84-121123-0002": "THIS ONE HAS NO AUDIO",
    }
    for utt, text in list(texts.items())[:2]:
        x, sr = espeak_audio(text.lower())
        sf.write(chap / f"{utt}.flac", x, sr)
    (chap / "84-121123.trans.txt").write_text("".join(f"{u} {t}\n" for u, t in texts.items()))
    out = tmp_path / "out" / "libri.jsonl"
    res = blsp_main(
        ["data", "import", "librispeech", str(tmp_path / "LibriSpeech"), str(out), "--normalize", "lower"]
    )
    assert res == 0
    items = _read(out)
    assert [i["id"] for i in items] == ["84-121123-0000", "84-121123-0001"]
    assert items[0]["text"] == "go do you hear" and items[0]["text_raw"] == "GO DO YOU HEAR"
    assert items[0]["speaker"] == "84" and items[0]["lang"] == "en"
    assert Path(items[0]["audio"]).is_absolute()  # outside the manifest's folder -> absolute
    assert items[1]["duration"] == pytest.approx(
        len(espeak_audio(texts["84-121123-0001"].lower())[0]) / 22050, abs=2e-3
    )
    assert len(load_audio(items[1]["audio"])) == pytest.approx(items[1]["duration"] * 16000, abs=20)
    res2 = import_corpus("librispeech", tmp_path / "LibriSpeech", out)
    assert [s.reason.split(":")[0] for s in res2.skipped] == ["missing audio"]


def test_commonvoice_tree(tmp_path, espeak_audio):
    root = tmp_path / "cv" / "en"
    (root / "clips").mkdir(parents=True)
    header = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment\n"
    rows = []
    for n, text in enumerate(["Hello there.", "The sky is blue today."]):
        name = f"common_voice_en_{n}.mp3"
        x, sr = espeak_audio(text)
        sf.write(root / "clips" / name, x, sr, format="MP3")
        rows.append(f"spk{n}\t{name}\tsid{n}\t{text}\t\t2\t0\ttwenties\tfemale\t\t\ten\t\n")
    rows.append("spk9\tcommon_voice_en_9.mp3\tsid9\tMissing clip.\t\t2\t0\t\t\t\t\ten\t\n")
    (root / "test.tsv").write_text(header + "".join(rows))
    (root / "train.tsv").write_text(header)
    with pytest.raises(BlspError, match="--tsv.*test, train"):
        import_corpus("commonvoice", root, tmp_path / "x.jsonl")
    out = root / "test.jsonl"  # inside the corpus folder -> relative paths
    res = import_corpus("commonvoice", root, out, tsv="test", normalize="whisper")
    assert res.written == 2 and len(res.skipped) == 1 and "common_voice_en_9" in res.skipped[0].where
    items = _read(out)
    assert items[0]["audio"] == "clips/common_voice_en_0.mp3"
    assert (
        items[0]["text"] == "hello there" and items[0]["speaker"] == "spk0" and items[0]["gender"] == "female"
    )
    y = load_audio(resolve_audio_path(items[1]["audio"], out.parent))
    assert abs(len(y) / 16000 - items[1]["duration"]) < 0.1


def test_speechocean_manifest_import(shared_dir, tmp_path):
    src = shared_dir / "speech" / "speechocean762" / "test.jsonl"
    out = tmp_path / "so.jsonl"
    res = import_corpus("manifest", src, out, normalize="whisper")
    assert res.written == 2500 and not res.skipped
    assert 2.0 < res.hours < 4.0
    items = _read(out)
    first = json.loads(src.read_text().splitlines()[0])
    assert items[0]["id"] == first["id"] and items[0]["text_raw"] == first["text"]
    assert items[0]["text"] == first["text"].lower()
    assert items[0]["audio"] == str(src.parent / first["audio"])
    assert len(load_audio(items[0]["audio"])) == pytest.approx(first["duration"] * 16000, abs=16)


def _speechocean_items(shared_dir: Path, n: int) -> list[dict]:
    src = shared_dir / "speech" / "speechocean762" / "test.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    for r in rows:
        r["path"] = src.parent / r["audio"]
    return rows


def test_kaldi_dir_from_speechocean(shared_dir, tmp_path):
    rows = _speechocean_items(shared_dir, 4)
    d = tmp_path / "data" / "test"
    d.mkdir(parents=True)
    scp = [f"{r['id']} {r['path']}" for r in rows]
    scp += ["piped flac -c -d -s /corpus/x.flac |", "arked /corpus/feats.ark:1234"]
    (d / "wav.scp").write_text("\n".join(scp) + "\n")
    (d / "text").write_text("".join(f"{r['id']} {r['text']}\n" for r in rows) + "piped HELLO\narked HI\n")
    (d / "utt2spk").write_text("".join(f"{r['id']} {r['speaker']}\n" for r in rows))
    res = import_corpus("kaldi", d, tmp_path / "k.jsonl")
    assert res.written == 4
    reasons = {s.where: s.reason for s in res.skipped}
    assert "piped command" in reasons["piped"] and "wav.scp:5" in reasons["piped"]
    assert "archive" in reasons["arked"]
    items = _read(tmp_path / "k.jsonl")
    assert [(i["id"], i["text"], i["speaker"]) for i in items] == [
        (r["id"], r["text"], r["speaker"]) for r in rows
    ]

    # with segments: two halves of each recording
    (d / "wav.scp").write_text("\n".join(scp[:4]) + "\n")
    seg, text = [], []
    for r in rows:
        half = round(r["duration"] / 2, 2)
        seg += [f"{r['id']}_a {r['id']} 0.00 {half}", f"{r['id']}_b {r['id']} {half} -1"]
        text += [f"{r['id']}_a FIRST HALF", f"{r['id']}_b SECOND HALF"]
    (d / "segments").write_text("\n".join(seg) + "\nbadline x\n")
    (d / "text").write_text("\n".join(text) + "\n")
    (d / "utt2spk").write_text("")
    res = import_corpus("kaldi", d, tmp_path / "k2.jsonl")
    assert res.written == 8 and [s.reason.split(" ")[0] for s in res.skipped] == ["segments"]
    items = _read(tmp_path / "k2.jsonl")
    full = load_audio(rows[0]["path"])
    a, b = load_audio(items[0]["audio"]), load_audio(items[1]["audio"])
    assert parse_audio_ref(items[0]["audio"])[1] == 0
    assert len(a) + len(b) == len(full)
    assert np.allclose(np.concatenate([a, b]), full, atol=1e-6)
    assert items[1]["duration"] + items[0]["duration"] == pytest.approx(rows[0]["duration"], abs=2e-3)


def test_kaldi_all_piped_fails_clearly(tmp_path):
    (tmp_path / "wav.scp").write_text("u1 sox a.wav -t wav - |\n")
    with pytest.raises(BlspError, match="no usable utterance.*piped command"):
        import_corpus("kaldi", tmp_path, tmp_path / "k.jsonl")


def test_hf_save_to_disk(tmp_path, espeak_audio):
    datasets = pytest.importorskip("datasets")
    wavs = []
    for n, text in enumerate(["one two three", "four five six"]):
        x, sr = espeak_audio(text)
        p = tmp_path / f"src{n}.wav"
        sf.write(p, x, sr)
        wavs.append(str(p))
    ds = datasets.Dataset.from_dict(
        {"audio": wavs, "sentence": ["one two three", ""], "speaker_id": [3, 4], "uid": ["u0", "u1"]}
    ).cast_column("audio", datasets.Audio())
    dd = datasets.DatasetDict({"test": ds, "train": ds})
    dd.save_to_disk(str(tmp_path / "hfds"))
    for p in wavs:  # the saved dataset must carry its own audio bytes
        Path(p).unlink()
    out = tmp_path / "out" / "hf.jsonl"
    with pytest.raises(BlspError, match="--split"):
        import_corpus("hf", tmp_path / "hfds", out, text_col="sentence")
    res = import_corpus("hf", tmp_path / "hfds", out, split="test", text_col="sentence", id_col="uid")
    assert res.written == 1 and res.skipped[0].where == "u1" and "transcript" in res.skipped[0].reason
    items = _read(out)
    assert items[0]["id"] == "u0" and items[0]["audio"] == "audio/u0.wav" and items[0]["speaker_id"] == 3
    info = sf.info(out.parent / "audio" / "u0.wav")
    assert info.samplerate == 16000 and info.channels == 1
    assert items[0]["duration"] == pytest.approx(len(espeak_audio("one two three")[0]) / 22050, abs=2e-3)


def test_hf_array_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    arr = (0.2 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    ds = datasets.Dataset.from_dict({"audio": [{"array": arr, "sampling_rate": 8000}], "text": ["x"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    res = import_corpus("hf", tmp_path / "ds", tmp_path / "o.jsonl", audio_format="flac")
    assert res.written == 1
    assert len(load_audio(tmp_path / "audio" / "00000000.flac")) == 16000


def test_gigaspeech_segments(tmp_path, espeak_audio):
    import soxr

    sr = 16000  # GigaSpeech ships 16 kHz Opus
    a = soxr.resample(espeak_audio("first segment here")[0], 22050, sr)
    b = soxr.resample(espeak_audio("and a second one")[0], 22050, sr)
    x = np.concatenate([a, np.zeros(sr, dtype=np.float32), b])
    (tmp_path / "audio" / "podcast").mkdir(parents=True)
    sf.write(tmp_path / "audio" / "podcast" / "POD1.opus", x, sr, format="OGG", subtype="OPUS")
    sr_file = sf.info(tmp_path / "audio" / "podcast" / "POD1.opus").samplerate
    t_a, t_b = len(a) / sr, (len(a) + sr) / sr
    meta = {
        "audios": [
            {
                "aid": "POD1",
                "path": "audio/podcast/POD1.opus",
                "segments": [
                    {
                        "sid": "POD1_S0",
                        "begin_time": 0.0,
                        "end_time": t_a,
                        "text_tn": "FIRST SEGMENT HERE <PERIOD>",
                        "subsets": ["{XS}"],
                    },
                    {
                        "sid": "POD1_S1",
                        "begin_time": t_a,
                        "end_time": t_b,
                        "text_tn": "<SIL>",
                        "subsets": ["{XS}"],
                    },
                    {
                        "sid": "POD1_S2",
                        "begin_time": t_b,
                        "end_time": t_b + len(b) / sr,
                        "text_tn": "AND A SECOND ONE <COMMA> YES",
                        "subsets": ["{M}"],
                    },
                ],
            },
            {"aid": "POD2", "path": "audio/podcast/missing.opus", "segments": [{"sid": "POD2_S0"}]},
        ]
    }
    (tmp_path / "GigaSpeech.json").write_text(json.dumps(meta))
    res = import_corpus("gigaspeech", tmp_path, tmp_path / "g.jsonl")
    assert res.written == 2 and {s.where for s in res.skipped} == {"POD1_S1", "POD2_S0"}
    items = _read(tmp_path / "g.jsonl")
    assert [i["text"] for i in items] == ["FIRST SEGMENT HERE.", "AND A SECOND ONE, YES"]
    assert items[1]["audio"].startswith("audio/podcast/POD1.opus:")
    assert parse_audio_ref(items[1]["audio"])[1] == round(t_b * sr_file)
    assert items[1]["duration"] == pytest.approx(len(b) / sr, abs=1e-3)
    assert len(load_audio(resolve_audio_path(items[1]["audio"], tmp_path))) == pytest.approx(
        len(b) / sr * 16000, abs=2
    )
    res = import_corpus("gigaspeech", tmp_path / "GigaSpeech.json", tmp_path / "g.jsonl", subset="XS")
    assert res.written == 1
    assert gigaspeech_text("<MUSIC> WELL <COMMA> OK <QUESTIONMARK>") == "WELL, OK?"


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_generic_table(tmp_path, tone, fmt):
    sep = "\t" if fmt == "tsv" else ","
    (tmp_path / "wav").mkdir()
    sf.write(tmp_path / "wav" / "a.wav", tone(0.5), 16000)
    sf.write(tmp_path / "wav" / "b.wav", tone(0.7), 16000)
    quote = '"' if fmt == "csv" else ""
    (tmp_path / f"t.{fmt}").write_text(
        sep.join(["file", "transcript", "uid", "label"])
        + "\n"
        + sep.join(["wav/a.wav", f"{quote}Hello, world{quote}", "A1", "pos"])
        + "\n"
        + sep.join(["wav/b.wav", "bye", "B1", "neg"])
        + "\n"
        + sep.join(["", "nothing", "C1", "neg"])
        + "\n"
    )
    out = tmp_path / "t.jsonl"
    with pytest.raises(BlspError, match="no column 'audio'"):
        import_corpus(fmt, tmp_path / f"t.{fmt}", out)
    res = blsp_main(
        [
            "data",
            "import",
            fmt,
            str(tmp_path / f"t.{fmt}"),
            str(out),
            "--audio-col",
            "file",
            "--text-col",
            "transcript",
            "--id-col",
            "uid",
        ]
    )
    assert res == 0
    items = _read(out)
    assert [(i["id"], i["audio"], i["text"], i["label"], i["duration"]) for i in items] == [
        ("A1", "wav/a.wav", "Hello, world", "pos", 0.5),
        ("B1", "wav/b.wav", "bye", "neg", 0.7),
    ]


def test_cli_choice_lists_match_modules():
    from blsp.data import cli, importers, normalize

    assert cli.FORMATS == importers.FORMATS == tuple(importers.IMPORTERS)
    assert cli.NORMALIZERS == normalize.NORMALIZERS


def test_whisper_normalizer_offline():
    from blsp.data.normalize import english_spelling_mapping, get_normalizer

    norm = get_normalizer("whisper")
    assert norm("Mr. Smith paid $20, didn't he?") == "mister smith paid $20 did not he"
    if english_spelling_mapping():
        assert norm("The colour of the theatre") == "the color of the theater"
    assert get_normalizer("whisper-basic")("Ça va?  Oui!") == "ça va oui"
    with pytest.raises(BlspError, match="unknown normaliser"):
        get_normalizer("nope")
