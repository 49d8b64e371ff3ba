"""CTC training on the adapter output: the collator and the loss of the CTC baseline's ASR model (paper
4.2) and of the alignment warm start (the ``align_ctc`` recipe). The head, its labels and decoding
are in :mod:`blsp.models.ctc`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blsp.errors import AudioError
from blsp.models.ctc import CtcVocab, ctc_log_probs
from blsp.training.data import Example


class CtcCollator:
    """Examples -> padded log-mel (or cached encoder states) and CTC targets."""

    def __init__(self, model: Any, vocab: CtcVocab, upsample: int, cache: Any = None) -> None:
        from blsp.training.objectives import BlspCollator

        self.model = model
        self.vocab = vocab
        self.upsample = upsample
        self._speech = BlspCollator(model, cache=cache)

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        feats, cached, refs, ids, targets, skipped = [], [], [], [], [], []
        for ex in examples:
            text = ex.transcript if ex.transcript is not None else ex.response
            target = self.vocab.encode(text)
            if not target:
                skipped.append((ex.id, "empty transcript after normalisation"))
                continue
            try:
                f, hidden = self._speech.speech_part(ex)
            except AudioError as e:
                skipped.append((ex.id, str(e)))
                continue
            frames = self.model.speech_length(f.shape[-1]) * self.upsample
            if len(target) > frames:
                skipped.append((ex.id, f"{len(target)} CTC labels for {frames} frames (raise ctc.upsample)"))
                continue
            feats.append(f)
            cached.append(hidden)
            refs.append(ex.audio)
            ids.append(ex.id)
            targets.append(target)
        out: dict[str, Any] = {"ids": ids, "skipped": skipped, "count": sum(len(t) for t in targets)}
        if not feats:
            return out
        lengths = torch.tensor([f.shape[-1] for f in feats])
        x = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()))
        for i, f in enumerate(feats):
            x[i, :, : f.shape[-1]] = f
        out["student"] = {"input_features": x, "feature_lengths": lengths}
        out["cached"], out["refs"] = cached, refs
        out["targets"] = torch.tensor([t for tg in targets for t in tg], dtype=torch.long)
        out["target_lengths"] = torch.tensor([len(t) for t in targets], dtype=torch.long)
        return out


class CtcLoss(nn.Module):
    """``forward(student, targets, target_lengths) -> {"loss_sum", "count"}`` (sum over utterances)."""

    def __init__(self, model: Any, vocab: CtcVocab, upsample: int) -> None:
        super().__init__()
        self.model = model
        self.vocab = vocab
        self.upsample = upsample

    def forward(
        self, student: dict[str, torch.Tensor], targets: torch.Tensor, target_lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        log_probs, lengths = ctc_log_probs(self.model, self.upsample, self.vocab.size, **student)
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            targets.to(log_probs.device),
            lengths,
            target_lengths.to(log_probs.device),
            blank=self.vocab.blank,
            reduction="sum",
            zero_infinity=True,
        )
        count = target_lengths.sum().to(loss.device)
        return {"loss_sum": loss, "count": count, "ctc_sum": loss.detach()}
