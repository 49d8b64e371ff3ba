"""The CTC head on the adapter output: its labels, config fields, log-probabilities and greedy decoding.

The head is ``model.extra["ctc"]``, saved and loaded with the adapter (``BlspConfig.ctc_vocab_size``
and the ``ctc_*`` fields in config.json). Labels are:

- ``tokenizer`` (default): the LLM tokenizer's vocabulary, through a linear layer;
- ``chars``: characters; the adapter runs at about 6 frames a second, fewer than characters are
  spoken, so ``upsample`` lets each frame emit several labels;
- ``embeddings``: the LLM tokens of the training transcripts, scored by the cosine between the
  adapter output and the frozen LLM's own input embedding of each token (plus a learned blank;
  :class:`~blsp.models.adapter.EmbeddingCtcHead`). Needing no LLM forward pass, it is cheap, and it
  pulls the adapter's outputs toward the token embeddings the LLM already reads: the warm start
  before behavior alignment (the ``align_ctc`` recipe).

:class:`CtcTranscriber` greedily decodes speech to text for the CTC+LLM cascade (paper 4.2). The
loss and collator that train the head are in :mod:`blsp.training.ctc`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from blsp.errors import ModelLoadError
from blsp.models.adapter import EmbeddingCtcHead

CHARS = " abcdefghijklmnopqrstuvwxyz'0123456789"
_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)
_SPACES = re.compile(r"\s+")


def normalize_transcript(text: str) -> str:
    """Lower-case, punctuation removed (apostrophes kept), single spaces."""
    return _SPACES.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


VOCAB_KINDS = ("tokenizer", "chars", "embeddings")


class CtcVocab:
    """CTC labels: the tokenizer's ids plus a blank (last); ``token_ids`` (a subset of them, for
    ``embeddings``) plus a blank (last); or characters with blank 0."""

    def __init__(
        self, kind: str, tokenizer: Any = None, normalize: bool = True, token_ids: list[int] | None = None
    ) -> None:
        if kind not in VOCAB_KINDS:
            raise ValueError(f"CTC vocabulary must be one of {', '.join(VOCAB_KINDS)}, not {kind!r}")
        if kind == "embeddings" and not token_ids:
            raise ValueError("the embeddings CTC vocabulary needs the token ids it covers")
        self.kind = kind
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.token_ids = list(token_ids or [])
        self._label = {t: i for i, t in enumerate(self.token_ids)}
        if kind == "tokenizer":
            self.size = len(tokenizer) + 1
            self.blank = len(tokenizer)
        elif kind == "embeddings":
            self.size = len(self.token_ids) + 1
            self.blank = len(self.token_ids)
        else:
            self.size = len(CHARS) + 1
            self.blank = 0
            self._index = {c: i + 1 for i, c in enumerate(CHARS)}

    def encode(self, text: str) -> list[int]:
        if self.normalize:
            text = normalize_transcript(text)
        if self.kind == "chars":
            return [self._index[c] for c in text.lower() if c in self._index]
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.kind == "embeddings":  # tokens outside the covered set cannot be emitted
            return [self._label[t] for t in ids if t in self._label]
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "embeddings":
            ids = [self.token_ids[i] for i in ids if 0 <= i < len(self.token_ids)]
        if self.kind != "chars":
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return "".join(CHARS[i - 1] for i in ids if 0 < i <= len(CHARS)).strip()


def configure_ctc(
    config: Any, tokenizer: Any, kind: str, upsample: int, normalize: bool, token_ids: list[int] | None = None
) -> CtcVocab:
    """Set the ``ctc_*`` fields of a ``BlspConfig`` (before the model is built) and return the vocab."""
    if kind == "embeddings" and upsample != 1:
        raise ValueError("the embeddings CTC vocabulary takes ctc.upsample 1 (one token slot a frame)")
    vocab = CtcVocab(kind, tokenizer, normalize, token_ids)
    config.ctc_vocab_size = vocab.size * upsample
    config.ctc_vocab = kind
    config.ctc_upsample = upsample
    config.ctc_normalize = normalize
    return vocab


def vocab_of(model: Any) -> tuple[CtcVocab, int]:
    cfg = model.config
    if "ctc" not in model.extra or not cfg.ctc_vocab:
        raise ModelLoadError("this BLSP model has no CTC projector (train one with objective: ctc)")
    upsample = int(cfg.ctc_upsample)
    head = model.extra["ctc"]
    token_ids = head.token_ids.tolist() if isinstance(head, EmbeddingCtcHead) else None
    vocab = CtcVocab(cfg.ctc_vocab, model.tokenizer, bool(cfg.ctc_normalize), token_ids)
    if vocab.size * upsample != cfg.ctc_vocab_size:
        raise ModelLoadError(
            f"CTC projector has {cfg.ctc_vocab_size} outputs but vocabulary {cfg.ctc_vocab!r} x upsample "
            f"{upsample} needs {vocab.size * upsample} (a different tokenizer?)"
        )
    return vocab, upsample


def ctc_log_probs(
    model: Any, upsample: int, size: int, **speech: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs [N, T*upsample, size], lengths [N])`` from features or encoder states."""
    y, lengths = model.speech_embeddings(**speech)
    head = model.extra["ctc"]
    logits = head(y.to(head.weight.dtype))
    n, t, _ = logits.shape
    logits = logits.reshape(n, t * upsample, size)
    return F.log_softmax(logits.float(), dim=-1), lengths * upsample


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    best = log_probs.argmax(-1).tolist()
    out = []
    for row, n in zip(best, lengths.tolist(), strict=True):
        ids, prev = [], None
        for t in row[: int(n)]:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


class CtcTranscriber:
    """Greedy CTC speech recognition with a trained BLSP encoder + adapter + CTC projector."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab, self.upsample = vocab_of(model)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> CtcTranscriber:
        from blsp.models.modeling_blsp import BlspModel

        return cls(BlspModel.from_pretrained(path, device=device, dtype=dtype))

    @torch.no_grad()
    def transcribe(self, audios: list[np.ndarray | str | Path], batch_size: int = 8) -> list[str]:
        """Text of each clip (16 kHz float32 arrays, or audio paths)."""
        from blsp.data.audio import load_audio

        enc = self.model.encoder
        out: list[str] = []
        for i in range(0, len(audios), batch_size):
            chunk = audios[i : i + batch_size]
            feats = []
            for a in chunk:
                wav = load_audio(a, sr=enc.sampling_rate) if isinstance(a, str | Path) else np.asarray(a)
                feats.append(enc.features(wav))
            lengths = torch.tensor([f.shape[-1] for f in feats])
            x = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()))
            for j, f in enumerate(feats):
                x[j, :, : f.shape[-1]] = f
            log_probs, out_len = ctc_log_probs(
                self.model, self.upsample, self.vocab.size, input_features=x, feature_lengths=lengths
            )
            out += [self.vocab.decode(ids) for ids in greedy_decode(log_probs, out_len, self.vocab.blank)]
        return out
