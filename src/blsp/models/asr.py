"""Batched greedy Whisper transcription (used for ASR baselines and to transcribe speech data).

Each audio is cut into 30 s windows (Whisper's receptive field); all windows of all audios are
decoded in batches with ``WhisperForConditionalGeneration.generate`` and the window texts of one
audio are joined with a space, so long audio is never truncated.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from blsp.data.audio import SAMPLE_RATE
from blsp.errors import BlspError
from blsp.models.hub import DEFAULT_WHISPER, load_whisper

WINDOW_SECONDS = 30


class WhisperTranscriber:
    """Transcribe (or translate to English) 16 kHz float32 mono audio with a Whisper model."""

    def __init__(
        self,
        ref: str | os.PathLike[str] = DEFAULT_WHISPER,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_new_tokens: int = 224,  # openai/whisper's sample_len: half the decoder context
    ) -> None:
        self.model, self.processor = load_whisper(ref, dtype=dtype)
        self.model.to(device)
        self.device = torch.device(device)
        # Whisper's generate counts max_length from the end of the <|startoftranscript|>... prompt
        self.model.generation_config.max_length = max_new_tokens
        self.model.generation_config.max_new_tokens = None
        self.multilingual = bool(getattr(self.model.generation_config, "is_multilingual", True))

    def _check_language(self, language: str | None, task: str) -> tuple[str | None, str | None]:
        if task not in ("transcribe", "translate"):
            raise BlspError(f"task must be 'transcribe' or 'translate', not {task!r}")
        if self.multilingual:
            return language, task
        # English-only models have no language or task tokens
        if language not in (None, "en", "english") or task != "transcribe":
            raise BlspError(
                f"{self.model.name_or_path}: an English-only model; it cannot do {task} in {language}"
            )
        return None, None

    def transcribe(
        self,
        audios: list[np.ndarray],
        language: str | None = None,
        task: str = "transcribe",
        batch_size: int = 8,
    ) -> list[str]:
        """One text per audio; ``language=None`` lets a multilingual model detect it."""
        language, task_arg = self._check_language(language, task)
        window = WINDOW_SECONDS * SAMPLE_RATE
        segments: list[tuple[int, np.ndarray]] = []  # (audio index, <= 30 s window)
        for i, audio in enumerate(audios):
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise BlspError(f"audio {i}: expected mono 1-D samples, got shape {audio.shape}")
            segments += [(i, audio[s : s + window]) for s in range(0, len(audio), window)]

        pieces: list[list[str]] = [[] for _ in audios]
        for start in range(0, len(segments), max(1, batch_size)):
            batch = segments[start : start + batch_size]
            features = self.processor.feature_extractor(
                [a for _, a in batch],
                sampling_rate=SAMPLE_RATE,
                return_tensors="pt",
                return_attention_mask=True,
            )
            with torch.inference_mode():
                ids = self.model.generate(
                    features.input_features.to(self.device, self.model.dtype),
                    attention_mask=features.attention_mask.to(self.device),
                    language=language,
                    task=task_arg,
                    do_sample=False,
                    num_beams=1,
                )
            texts = self.processor.batch_decode(ids, skip_special_tokens=True)
            for (i, _), text in zip(batch, texts, strict=True):
                pieces[i].append(text.strip())
        return [" ".join(p for p in texts if p) for texts in pieces]
