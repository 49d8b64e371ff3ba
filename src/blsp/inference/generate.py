"""Preparing BLSP input for generation, and the batch job of ``blsp generate``.

Generation itself lives in :mod:`blsp.models.generation_blsp` (settings, stop and stream helpers,
``generate``); here a conversation is checked and its audio featurised once
(``prepare_conversation``), so that a prepared example can be batched, cached or re-used across
chat turns, and a JSON Lines manifest is answered line by line (``run_generate_job``, resumable).
``generate_prepared`` is ``generation_blsp.generate`` under its older name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blsp.errors import AudioError, BlspError
from blsp.models.generation_blsp import (  # re-exported: their home before generation_blsp
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeRow,
    GenerationParams,
    GenerationResult,
    StreamTextFilter,
    finalize_text,
    generate_grouped,
    next_tokens,
)
from blsp.models.generation_blsp import generate as generate_prepared

logger = logging.getLogger(__name__)

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "DecodeRow",
    "GenerationParams",
    "GenerationResult",
    "JobStats",
    "PreparedExample",
    "StreamTextFilter",
    "check_fits",
    "context_window",
    "finalize_text",
    "generate_grouped",
    "generate_prepared",
    "next_tokens",
    "prepare_conversation",
    "run_generate_job",
]


@dataclass
class PreparedExample:
    """A conversation whose audio parts hold log-mel features, and its prompt length in positions."""

    conversation: list[dict[str, Any]]
    prompt_tokens: int
    audio_seconds: float = 0.0
    audio_keys: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- preparing input
def prepare_conversation(
    model: Any,
    conversation: Sequence[dict[str, Any]],
    *,
    limits: Any = None,
    source: str = "conversation",
) -> PreparedExample:
    """Check a conversation and replace each audio part by its log-mel features.

    Audio parts are ``{"type": "audio", "audio": <path | bytes | array | tensor | dict>}`` with an
    optional ``"sampling_rate"``; the audio is decoded (``limits`` apply) and featurised once here,
    so a prepared example can be batched, cached or re-used across chat turns cheaply.
    """
    import hashlib

    import torch

    from blsp.inference.audio_input import NO_LIMITS, as_waveform
    from blsp.models.prompt import AudioSpan, check_role

    limits = limits or NO_LIMITS
    if not isinstance(conversation, list | tuple) or not conversation:
        raise BlspError(f"{source}: a conversation is a non-empty list of messages")
    out: list[dict[str, Any]] = []
    seconds = 0.0
    keys: list[str] = []
    for i, msg in enumerate(conversation):
        where = f"{source}[{i}]"
        if not isinstance(msg, dict):
            raise BlspError(f"{where}: a message is a dict with 'role' and 'content'")
        role, content = check_role(msg.get("role"), where), msg.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list | tuple):
            raise BlspError(f"{where}: content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "transcript"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise BlspError(f"{pw}: a {kind} part needs a string 'text'")
                parts.append({"type": kind, "text": text})
            elif kind == "audio":
                audio = part.get("audio")
                if torch.is_tensor(audio) and audio.dim() == 2:
                    feats = audio  # already log-mel
                    key = part.get("key") or hashlib.sha1(feats.numpy().tobytes()).hexdigest()
                else:
                    wav = as_waveform(audio, part.get("sampling_rate"), source=pw, limits=limits)
                    seconds += len(wav) / 16000
                    try:
                        feats = model.encoder.features(wav)
                    except AudioError as e:
                        raise AudioError(f"{pw}: {e}") from e
                    key = hashlib.sha1(np.ascontiguousarray(wav).tobytes()).hexdigest()
                keys.append(key)
                parts.append({"type": "audio", "audio": feats, "key": key})
            else:
                raise BlspError(f"{pw}: unknown part type {kind!r} (expected text, audio or transcript)")
        out.append({"role": role, "content": parts})
    prompt = model.prompt.build(out, add_generation_prompt=True)
    n = 0
    for seg in prompt.segments:
        n += model.speech_length(seg.audio.shape[-1]) if isinstance(seg, AudioSpan) else len(seg)
    return PreparedExample(out, n, seconds, keys)


def context_window(model: Any) -> int:
    """The LLM's maximum number of positions (prompt + answer)."""
    cfg = model.llm.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def check_fits(model: Any, example: PreparedExample, max_new_tokens: int, limit: int | None = None) -> None:
    """Raise ``BlspError`` when the prompt plus ``max_new_tokens`` exceed the context window."""
    window = limit or context_window(model)
    if example.prompt_tokens + max_new_tokens > window:
        raise BlspError(
            f"the prompt takes {example.prompt_tokens} positions and max_tokens is {max_new_tokens}: "
            f"together over the model's context window of {window}"
        )


# --------------------------------------------------------------------------- the batch job
@dataclass
class JobStats:
    total: int = 0
    done_before: int = 0
    written: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def run_generate_job(
    model: Any,
    manifest: str | Path,
    out_path: str | Path,
    *,
    instruction: str | None = None,
    params: GenerationParams | None = None,
    batch_size: int = 8,
    limits: Any = None,
    audio_key: str = "audio",
    progress: bool = True,
    generate: Any = None,
) -> JobStats:
    """Answer every line of a JSON Lines manifest and append the answers to ``out_path``.

    ``generate``: the batch generator (``generation_blsp.generate``'s signature), e.g. a
    ``VllmGenerator``'s; blsp's own by default.

    A line needs ``id`` and ``audio`` (a path, relative to the manifest's folder, optionally
    ``path:start:num``); its own ``instruction`` field wins over ``instruction``. Output rows are
    the input row plus ``instruction`` and ``response``. Ids already in ``out_path`` are skipped
    (rerun to resume); unreadable lines and audio are skipped, logged with the reason, counted.
    """
    from blsp.data.manifest import iter_manifest, resolve_audio_path
    from blsp.utils.io import JsonlAppender

    params = params or GenerationParams()
    manifest = Path(manifest)
    if not manifest.is_file():
        raise BlspError(f"{manifest}: manifest not found")
    stats = JobStats()

    def skip(msg: str) -> None:
        stats.skipped += 1
        stats.errors.append(msg)
        logger.warning("skipped %s", msg)

    with JsonlAppender(out_path, id_key="id") as out:
        todo: list[tuple[int, dict[str, Any], str]] = []
        for lineno, obj, _raw, err in iter_manifest(manifest, required=("id",), text_field=None):
            stats.total += 1
            where = f"{manifest}:{lineno}"
            if err is not None or obj is None:
                skip(f"{where}: {err}")
                continue
            if str(obj["id"]) in out.done:
                stats.done_before += 1
                continue
            instr = obj.get("instruction", instruction)
            if not isinstance(instr, str) or not instr.strip():
                skip(f"{where}: no instruction (give --instruction/--task or an 'instruction' field)")
                continue
            if not isinstance(obj.get(audio_key), str):
                skip(f"{where}: no '{audio_key}' path")
                continue
            todo.append((lineno, obj, instr))

        def duration(item: tuple[int, dict[str, Any], str]) -> float:
            d = item[1].get("duration")
            return float(d) if isinstance(d, int | float) else 0.0

        todo.sort(key=duration)  # similar lengths together: less padding per batch
        bar = _progress(len(todo), progress)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            prepared, rows = [], []
            for lineno, obj, instr in chunk:
                ref = obj[audio_key]
                path = resolve_audio_path(ref, manifest.parent)
                try:
                    ex = prepare_conversation(
                        model,
                        [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "text", "text": instr},
                                    {"type": "audio", "audio": path},
                                ],
                            }
                        ],
                        limits=limits,
                        source=f"{manifest}:{lineno}",
                    )
                except BlspError as e:
                    skip(
                        f"{manifest}:{lineno}: {path}: {e}"
                        if path not in str(e)
                        else f"{manifest}:{lineno}: {e}"
                    )
                    continue
                prepared.append(ex)
                rows.append({**obj, "instruction": instr})
            if prepared:
                results = (generate or generate_prepared)(model, prepared, params)
                for row, res in zip(rows, results, strict=True):
                    row["response"] = res.text
                stats.written += out.append(rows)
            bar.update(len(chunk))
        bar.close()
    return stats


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="utt", desc="generate", leave=False)
