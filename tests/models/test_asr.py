"""Whisper transcription with the converted decoders: real speech in, words out."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from blsp.errors import BlspError
from blsp.models.hub import ALIASES

SENTENCE = "The weather today is sunny and warm, so we will walk to the park after lunch."


def wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    normalize = EnglishTextNormalizer({})
    return jiwer.wer(normalize(reference), normalize(hypothesis))


@pytest.mark.slow
def test_transcribe_cli_whisper_base(blsp_cmd, flite_wav, whisper_base_dir):
    wav = flite_wav(SENTENCE)
    cmd = [*blsp_cmd, "transcribe", str(wav), "--model", "whisper-base", "--language", "en", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["audio"] == str(wav)
    error = wer(SENTENCE, row["text"])
    print(f"whisper-base: {row['text']!r} WER={error:.3f}")
    assert error <= 0.2


@pytest.mark.slow
def test_long_audio_is_windowed_not_truncated(flite_wav):
    """Audio over 30 s is cut in 30 s windows whose texts are joined; English-only model, batched."""
    if ALIASES["whisper-tiny.en"].files() is None:
        pytest.skip(ALIASES["whisper-tiny.en"].install_command())
    from blsp.data.audio import load_audio
    from blsp.models.asr import WhisperTranscriber

    first, second = "Please open the window in the kitchen.", "My brother plays the piano every evening."
    a, b = load_audio(flite_wav(first)), load_audio(flite_wav(second))
    silence = np.zeros(31 * 16000 - len(a), dtype=np.float32)  # b starts after the 30 s boundary
    long_audio = np.concatenate([a, silence, b])

    transcriber = WhisperTranscriber("whisper-tiny.en")
    texts = transcriber.transcribe([long_audio, b, np.zeros(0, np.float32)], language="en", batch_size=2)

    print("whisper-tiny.en:", texts)
    assert wer(f"{first} {second}", texts[0]) <= 0.25
    assert wer(second, texts[1]) <= 0.25
    assert texts[2] == ""
    with pytest.raises(BlspError, match="English-only"):
        transcriber.transcribe([b], language="fr")
