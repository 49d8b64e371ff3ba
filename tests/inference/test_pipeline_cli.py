"""``SpeechPipeline`` (the Python API) and ``blsp generate`` (batch, resumable) on the tiny model."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import soundfile as sf

from blsp.cli import main
from blsp.errors import BlspError
from blsp.inference.pipeline import SpeechPipeline
from blsp.instructions import task_instruction


def clip(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


@pytest.fixture
def adapter_dir(tiny_model, tmp_path):
    path = tmp_path / "adapter"
    tiny_model.save_pretrained(path)
    return path


def test_pipeline_accepts_paths_arrays_bytes_and_batches(adapter_dir, tmp_path):
    from transformers import TextIteratorStreamer

    pipe = SpeechPipeline.from_pretrained(adapter_dir, device="cpu", max_new_tokens=6)
    x = clip(1.0, 1)
    wav = tmp_path / "a.wav"
    sf.write(wav, x, 16000)
    instr = "please repeat the following words"
    by_path = pipe(str(wav), instr)
    assert isinstance(by_path, str)
    assert pipe(wav.read_bytes(), instr) == by_path
    assert pipe(x, instr) == by_path
    x8k = sf.read(wav)[0][::2].astype(np.float32)  # same clip at 8 kHz: resampled on the way in
    assert isinstance(pipe(x8k, instr, sampling_rate=8000), str)
    batch = pipe([str(wav), clip(0.5, 2)], instr, batch_size=2)
    assert batch[0] == by_path and len(batch) == 2
    assert pipe(str(wav), task="asr") == pipe(str(wav), task_instruction("asr"))
    conv = [
        {"role": "user", "content": [{"type": "text", "text": instr}, {"type": "audio", "audio": str(wav)}]}
    ]
    assert pipe.chat(conv) == by_path
    assert "".join(pipe.stream(str(wav), instr)) == by_path
    result = pipe(str(wav), instr, return_result=True)
    assert result.text == by_path and result.prompt_tokens > 0

    streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=pipe, args=(str(wav), instr), kwargs={"streamer": streamer})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == by_path

    with pytest.raises(BlspError, match="missing.wav: audio file not found"):
        pipe(str(tmp_path / "missing.wav"), instr)
    with pytest.raises(BlspError, match="either an instruction or a task"):
        pipe(str(wav), instr, task="asr")


def write_manifest(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_generate_cli_batches_skips_bad_lines_and_resumes(adapter_dir, tmp_path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    for k in range(3):
        sf.write(audio / f"{k}.wav", clip(0.4 + 0.2 * k, k), 16000)
    (audio / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    manifest = tmp_path / "m.jsonl"
    write_manifest(
        manifest,
        [
            {"id": "a", "audio": "audio/0.wav", "duration": 0.4, "text": "kept"},
            {"id": "b", "audio": "audio/1.wav", "instruction": "the quick brown fox"},
            {"id": "c", "audio": "audio/missing.wav"},
            {"id": "d", "audio": "audio/broken.wav"},
            "{not json",
            {"audio": "audio/2.wav"},
        ],
    )
    out = tmp_path / "out.jsonl"
    args = [
        "generate",
        str(adapter_dir),
        str(manifest),
        str(out),
        "--task",
        "asr",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 written, 0 already done, 4 skipped (of 6 lines)" in err
    assert f"{audio / 'missing.wav'}: audio file not found" in err
    assert f"{audio / 'broken.wav'}" in err and "cannot decode audio" in err
    assert (
        f"{manifest}:5: malformed JSON (not one JSON object)" in err
        and f"{manifest}:6: missing field 'id'" in err
    )
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["instruction"] == task_instruction("asr") and rows["a"]["text"] == "kept"
    assert rows["b"]["instruction"] == "the quick brown fox"  # the line's own instruction wins
    assert all(isinstance(r["response"], str) for r in rows.values())

    # The answers are the pipeline's answers.
    pipe = SpeechPipeline.from_pretrained(adapter_dir, device="cpu", max_new_tokens=4)
    assert rows["a"]["response"] == pipe(str(audio / "0.wav"), task="asr")

    # Rerun: nothing new; a new line: only it is generated.
    assert main(args) == 0
    assert "0 written, 2 already done" in capsys.readouterr().err
    with manifest.open("a") as f:
        f.write(json.dumps({"id": "e", "audio": str(audio / "2.wav")}) + "\n")
    assert main(args) == 0
    assert "1 written, 2 already done" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 3


def test_generate_cli_needs_an_instruction(adapter_dir, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    sf.write(tmp_path / "0.wav", clip(0.4, 0), 16000)
    write_manifest(manifest, [{"id": "a", "audio": "0.wav"}])
    assert (
        main(["generate", str(adapter_dir), str(manifest), str(tmp_path / "o.jsonl"), "--device", "cpu"]) == 1
    )
    assert "no instruction" in capsys.readouterr().err
    assert (
        main(["generate", str(adapter_dir), str(manifest), str(tmp_path / "o.jsonl"), "--task", "nope"]) == 2
    )
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_chat_cli_reads_turns_from_stdin(adapter_dir, tmp_path, monkeypatch, capsys):
    import io

    wav = tmp_path / "a.wav"
    sf.write(wav, clip(0.6, 5), 16000)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"the quick brown fox\n/audio {wav} please repeat\n"))
    assert (
        main(["chat", str(adapter_dir), "--device", "cpu", "--max-new-tokens", "3", "--system", "be brief"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "error" not in out
