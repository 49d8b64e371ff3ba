"""The evaluation's model calls, each isolating failures per item: generation, token KL, response NLL."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def error_text(e: BaseException) -> str:
    """``Type: message`` of an exception, cut to 500 characters (what a row records)."""
    return f"{type(e).__name__}: {e}"[:500]


def generate_safe(
    model: Any, convs: Sequence[Any], max_new_tokens: int, loop_guard: bool = True
) -> list[str | Exception]:
    """``model.generate`` over ``convs`` (greedy; ``loop_guard`` as in ``GenerationParams``); a failing
    batch is retried item by item."""
    todo = [i for i, c in enumerate(convs) if not isinstance(c, Exception)]
    out: list[str | Exception] = [c if isinstance(c, Exception) else "" for c in convs]
    if not todo:
        return out
    try:
        texts = model.generate(
            [{"conversation": convs[i]} for i in todo], max_new_tokens=max_new_tokens, loop_guard=loop_guard
        )
        for i, t in zip(todo, texts, strict=True):
            out[i] = t
        return out
    except Exception as e:
        if len(todo) == 1:
            out[todo[0]] = e
            return out
        log.warning("generation failed on a batch of %d (%s); retrying one by one", len(todo), error_text(e))
    for i in todo:
        try:
            out[i] = model.generate(
                [{"conversation": convs[i]}], max_new_tokens=max_new_tokens, loop_guard=loop_guard
            )[0]
        except Exception as e:
            out[i] = e
    return out


def response_kl(
    model: Any, speech_convs: Sequence[Any], text_convs: Sequence[Any], responses: Sequence[str]
) -> list[tuple[float, int]]:
    """Per example ``(sum of token KL(text || speech), number of tokens)`` teacher-forced on ``responses``.

    Both conversations are scored on the same response tokens (its tokens and the end-of-turn
    token); the LLM's next-token distributions at those positions are compared.
    """
    import torch

    n = len(responses)
    examples = [{"conversation": c, "response": r} for c, r in zip(speech_convs, responses, strict=True)]
    examples += [{"conversation": c, "response": r} for c, r in zip(text_convs, responses, strict=True)]
    batch = model.collate(examples, padding_side="right")
    with torch.no_grad():
        logits = model(**batch).logits
    labels = batch["labels"].to(logits.device)
    out = []
    for i in range(n):
        ps = (labels[i, 1:] != -100).nonzero().squeeze(-1)
        pt = (labels[n + i, 1:] != -100).nonzero().squeeze(-1)
        if len(ps) != len(pt) or len(ps) == 0:
            raise RuntimeError(f"response positions differ between paths ({len(ps)} vs {len(pt)})")
        ls = torch.log_softmax(logits[i, ps].float(), -1)
        lt = torch.log_softmax(logits[n + i, pt].float(), -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        out.append((float(kl.sum()), int(len(ps))))
    return out


def response_nll(model: Any, examples: Sequence[dict[str, Any]]) -> list[tuple[float, int]]:
    """Per example ``(summed target-token cross-entropy in nats, number of target tokens)``.

    ``examples`` are ``{"conversation", "response"}``; the batch is laid out and scored as
    ``BlspLoss`` does its ``ce`` (``collate``, ``response_logits`` with the shared head).
    """
    import torch
    import torch.nn.functional as F

    from blsp.training.objectives import IGNORE_INDEX, response_logits

    batch = model.collate(list(examples))
    # response_logits returns the target tokens in batch-then-position order: split them by row
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
    with torch.no_grad():
        logits, targets = response_logits(model, batch, share_head=True)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
    if ce.numel() != sum(counts) or 0 in counts:
        raise RuntimeError(f"{ce.numel()} scored tokens for per-example target counts {counts}")
    return [(float(part.sum()), int(n)) for part, n in zip(ce.split(counts), counts, strict=True)]
