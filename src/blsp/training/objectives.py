"""Losses of BLSP step 2 and its baselines, as ``nn.Module``s that DDP can wrap.

- ``ce``: language-model loss on the behavior response given speech (paper section 3). With an
  ASR source (``task: asr``) this is the ASR-pretraining baseline (appendix A); with a target
  field and LoRA it is the downstream fine-tuning of Table 4.
- ``kl``: distillation from the text path: the same frozen LLM fed the transcript in place of
  the speech is the teacher; ``T^2 * KL(teacher || student)`` at temperature ``T`` on the
  response positions (BLSP-Emo / Ultravox; T = 2 by default).
- ``ce+kl``: ``ce_weight * ce + kl_weight * kl``.

Every loss is returned as a *sum* over target tokens with the token count, so the trainer can
normalise by the number of target tokens in the whole global batch: one process with gradient
accumulation and N processes with DDP then compute the same gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blsp.errors import AudioError
from blsp.training.data import Example

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def _first_target(labels: torch.Tensor) -> int:
    """Index of the earliest target position in the batch."""
    has = (labels != IGNORE_INDEX).any(0).nonzero()
    return int(has[0]) if len(has) else labels.shape[1] - 1


def response_logits(
    forward: Any, batch: dict[str, torch.Tensor], **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``forward(**batch)`` keeping only the logits that predict target tokens.

    Returns ``(logits [Ntok, V], targets [Ntok])`` in batch-then-position order.
    """
    labels = batch["labels"]
    first = max(1, _first_target(labels))
    keep = labels.shape[1] - first + 1  # logits at positions first-1 .. L-1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = forward(**inputs, logits_to_keep=keep, **kwargs)
    logits = out.logits[:, :-1]
    targets = labels[:, first:].to(logits.device)
    mask = targets != IGNORE_INDEX
    return logits[mask], targets[mask]


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * sum_positions KL(softmax(teacher/T) || softmax(student/T))``."""
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * (t * t)


class BlspCollator:
    """Turns :class:`Example`s into the model's batch (and the teacher's text-path batch).

    With an encoder cache, a clip whose encoder output is cached is not read from disk: a zero
    log-mel placeholder of the cached length lays out its speech positions, and its cached encoder
    output is handed over under ``cached``. A clip that cannot be read is skipped and counted.
    """

    def __init__(self, model: Any, *, teacher: bool = False, cache: Any = None, need_features: bool = True):
        self.model = model
        self.teacher = teacher
        self.cache = cache
        self.need_features = need_features

    def speech_part(self, ex: Example) -> tuple[torch.Tensor, Any]:
        """Log-mel (or placeholder) for ``ex`` and its cached encoder output (or None)."""
        from blsp.data.audio import load_audio

        enc = self.model.encoder
        hit = self.cache.get(ex.audio) if self.cache is not None else None
        if hit is not None:
            hidden, frames = hit
            return torch.zeros(enc.num_mel_bins, frames), hidden
        audio = load_audio(ex.audio, sr=enc.sampling_rate)
        return enc.features(audio), None

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        from blsp.models.prompt import make_conversation

        rows, teachers, cached, refs, ids, skipped = [], [], [], [], [], []
        for ex in examples:
            try:
                feats, hidden = self.speech_part(ex)
            except AudioError as e:
                skipped.append((ex.id, str(e)))
                continue
            rows.append(
                {"conversation": make_conversation(ex.instruction, audio=feats), "response": ex.response}
            )
            if self.teacher:
                conv = make_conversation(ex.instruction, transcript=ex.transcript)
                teachers.append({"conversation": conv, "response": ex.response})
            cached.append(hidden)
            refs.append(ex.audio)
            ids.append(ex.id)
        out: dict[str, Any] = {"ids": ids, "skipped": skipped, "count": 0}
        if not rows:
            return out
        student = self.model.collate(rows)
        out["student"] = student
        out["cached"] = cached
        out["refs"] = refs
        out["count"] = int((student["labels"][:, 1:] != IGNORE_INDEX).sum())
        if self.teacher:
            out["teacher"] = self.model.collate(teachers)
        return out


def attach_encoder_states(model: Any, batch: dict[str, Any], cache: Any) -> None:
    """Replace ``input_features`` by encoder outputs: cached ones, and fresh ones for the misses
    (rounded to the cache dtype, as a hit would come back, and written to the cache). Runs the
    frozen encoder without gradients."""
    student = batch["student"]
    if "input_features" not in student:
        return
    cached: list[torch.Tensor | None] = batch["cached"]
    feats, lengths = student.pop("input_features"), student.pop("feature_lengths")
    miss = [i for i, h in enumerate(cached) if h is None]
    hiddens: list[torch.Tensor] = [h for h in cached]  # type: ignore[misc]
    if miss:
        idx = torch.tensor(miss)
        with torch.no_grad():
            h, hl = model.encode_speech(feats[idx], lengths[idx])
        for j, i in enumerate(miss):
            one = h[j, : int(hl[j])]
            if cache is not None:
                one = cache.round(one)
                cache.put(batch["refs"][i], one, int(lengths[i]))
            hiddens[i] = one
    if cache is not None:
        cache.encoded += len(miss)
        cache.served += len(cached) - len(miss)
    device = model.device
    t = max(int(x.shape[0]) for x in hiddens)
    d = hiddens[0].shape[-1]
    states = torch.zeros(len(hiddens), t, d, device=device, dtype=torch.float32)
    for i, x in enumerate(hiddens):
        states[i, : x.shape[0]] = x.to(device, states.dtype)
    student["encoder_hidden_states"] = states
    student["encoder_lengths"] = torch.tensor([int(x.shape[0]) for x in hiddens], device=device)


class BlspLoss(nn.Module):
    """``forward(student, teacher=None) -> {"loss_sum", "count", "ce_sum", "kl_sum"}``."""

    def __init__(
        self,
        model: Any,
        objective: str = "ce",
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        temperature: float = 2.0,
        train_encoder: bool = False,
        shared_head: bool = True,
    ) -> None:
        super().__init__()
        if objective not in ("ce", "kl", "ce+kl"):
            raise ValueError(f"BlspLoss objective must be ce, kl or ce+kl, not {objective!r}")
        self.model = model
        self.objective = objective
        self.ce_weight = ce_weight if objective == "ce+kl" else 1.0
        self.kl_weight = kl_weight if objective == "ce+kl" else 1.0
        self.temperature = temperature
        self.train_encoder = train_encoder
        self.shared_head = shared_head

    def _student_inputs(self, student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.train_encoder or "input_features" not in student:
            return student
        student = dict(student)
        enc = self.model.encoder
        feats = student.pop("input_features").to(self.model.device, enc.whisper.conv1.weight.dtype)
        lengths = student.pop("feature_lengths").to(self.model.device)
        student["encoder_hidden_states"], student["encoder_lengths"] = enc(feats, lengths)
        return student

    def forward(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        # the shared head (system prompt, instruction) is computed once a batch; with LoRA the
        # model sees a trainable LLM and runs every position itself
        logits, targets = response_logits(
            self.model, self._student_inputs(student), share_head=self.shared_head
        )
        zero = logits.new_zeros((), dtype=torch.float32)
        out = {"count": torch.tensor(targets.numel(), device=logits.device), "ce_sum": zero, "kl_sum": zero}
        total = zero
        if self.objective in ("ce", "ce+kl"):
            ce = F.cross_entropy(logits.float(), targets, reduction="sum")
            out["ce_sum"] = ce.detach()
            total = total + self.ce_weight * ce
        if self.objective in ("kl", "ce+kl"):
            if teacher is None:
                raise ValueError("the kl objective needs the teacher (transcript) batch")
            with torch.no_grad():
                t_logits, t_targets = response_logits(self.model, teacher, share_head=self.shared_head)
            if t_targets.shape != targets.shape or not torch.equal(t_targets, targets):
                raise RuntimeError("teacher and student response tokens differ: the prompts are misaligned")
            kl = kl_sum(logits, t_logits, self.temperature)
            out["kl_sum"] = kl.detach()
            total = total + self.kl_weight * kl
        out["loss_sum"] = total
        return out
