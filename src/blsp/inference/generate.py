"""Generation on top of ``BlspModel``: per-request limits inside one batch, stop strings, streaming.

``BlspModel.generate`` runs one set of generation settings for a whole batch. A server batches
requests that each ask for their own ``max_tokens`` and ``stop`` strings, some streamed and some
not, and must stop a row whose client went away. Here every row carries its own
``GenerationParams``; a ``RowStopper`` (a ``transformers`` ``StoppingCriteria``) ends each row on
its end-of-turn token, its stop strings, its token budget or its cancel event, and a
``RowStreamer`` (a ``transformers`` ``BaseStreamer``) hands each streamed row its text as it grows.
Rows that sample must share temperature and top_p (``GenerationParams.batch_key``). Both decide
through the same per-row helpers (``row_finish_reason``, ``RowText``, ``row_result``), which
``DecodeRow`` also uses for a row decoded step by step outside ``generate`` (the server's
continuous batching), so its answer is the one ``generate`` gives.

The batch job of ``blsp generate`` (manifest in, JSON Lines out, resumable) is here too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blsp.errors import AudioError, BlspError

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
SAMPLING_TOP_K = 50  # transformers' generate() default, applied when sampling


@dataclass(frozen=True)
class GenerationParams:
    """Settings of one request. ``temperature == 0`` is greedy decoding (the paper's setting)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise BlspError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise BlspError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BlspError(f"top_p must be in (0, 1], not {self.top_p}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def batch_key(self) -> tuple[bool, float, float]:
        """Rows with the same key can share one ``generate`` call."""
        return (True, self.temperature, self.top_p) if self.do_sample else (False, 0.0, 1.0)


@dataclass
class GenerationResult:
    """One row's answer: ``text`` (stripped, cut at a stop string), its ``token_ids`` and counts."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


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


# --------------------------------------------------------------------------- text post-processing
def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def finalize_text(raw: str, stops: Iterable[str]) -> tuple[str, bool]:
    """The answer text as returned to users: stripped and cut at the first stop string."""
    text, hit = cut_at_stop(raw.lstrip(), stops)
    return text.strip(), hit


class StreamTextFilter:
    """Turns a growing decoded text into deltas whose concatenation equals ``finalize_text``.

    Holds back trailing whitespace, a possible start of a stop string and a partial UTF-8
    character until what follows shows them to be part of the answer.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.emitted = ""
        self.stopped = False

    def _safe(self, raw: str) -> str:
        text = raw.lstrip()
        text, hit = cut_at_stop(text, self.stops)
        if hit:
            self.stopped = True
            return text.rstrip()

        def held(t: str) -> str:  # ``t`` less a tail that may start a stop string
            hold = 0
            for s in self.stops:
                for k in range(min(len(s) - 1, len(t)), 0, -1):
                    if t.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            return t[: len(t) - hold]

        # A partial character at the end hides a stop string's start ("a" + half of "é" for "aé").
        safe = min(held(text.rstrip("\ufffd")), held(text).rstrip("\ufffd"), key=len)
        return safe.rstrip()

    def feed(self, raw: str) -> str:
        """Give the whole text decoded so far; returns the new part that is safe to show."""
        if self.stopped:
            return ""
        safe = self._safe(raw)
        if len(safe) > len(self.emitted) and safe.startswith(self.emitted):
            delta, self.emitted = safe[len(self.emitted) :], safe
            return delta
        return ""

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` not yet emitted."""
        if final_text.startswith(self.emitted):
            delta = final_text[len(self.emitted) :]
        else:  # decoding a prefix changed earlier text (rare tokenizer clean-up): send what is missing
            logger.debug("streamed text %r is not a prefix of the final %r", self.emitted, final_text)
            delta = ""
        self.emitted = final_text if final_text.startswith(self.emitted) else self.emitted
        self.stopped = True
        return delta


# --------------------------------------------------------------------------- per-row decisions
def stop_tail(params: GenerationParams) -> int:
    """How many trailing tokens to decode when looking for ``params.stop`` strings."""
    return max((len(s) for s in params.stop), default=0) + 4


def row_finish_reason(
    tokenizer: Any,
    row: Sequence[int],
    params: GenerationParams,
    stop_ids: set[int] | frozenset[int],
    cancel: threading.Event | None = None,
    tail: int | None = None,
) -> str | None:
    """Why a row whose generated tokens are ``row`` ends now (``FINISH_*``), or None to go on.

    In this order: its last token ends the turn or a stop string appeared, its token budget is
    spent, its cancel event is set.
    """
    ended = bool(row) and row[-1] in stop_ids
    if not ended and params.stop:
        text = tokenizer.decode(list(row[-(tail or stop_tail(params)) :]), skip_special_tokens=True)
        ended = cut_at_stop(text, params.stop)[1]
    if ended:
        return FINISH_STOP
    if len(row) >= params.max_new_tokens:
        return FINISH_LENGTH
    if cancel is not None and cancel.is_set():
        return FINISH_CANCELLED
    return None


def row_result(
    tokenizer: Any,
    tokens: Sequence[int],
    reason: str | None,
    params: GenerationParams,
    stop_ids: set[int] | frozenset[int],
    prompt_tokens: int,
) -> GenerationResult:
    """A finished row's ``GenerationResult``: tokens cut at the first end-of-turn token, text at a stop string."""
    tokens = list(tokens)
    reason = reason or FINISH_LENGTH
    cut = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
    if cut is not None:
        tokens, reason = tokens[:cut], FINISH_STOP
    raw = tokenizer.decode(tokens, skip_special_tokens=True)
    text, hit = finalize_text(raw, params.stop)
    if hit:
        reason = FINISH_STOP
    return GenerationResult(text=text, token_ids=tokens, finish_reason=reason, prompt_tokens=prompt_tokens)


class RowText:
    """One streamed row: decodes its tokens as they come and hands each safe new piece to ``sink``."""

    def __init__(
        self, tokenizer: Any, stops: Iterable[str], sink: Callable[[str], None], stop_ids: Iterable[int] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.sink = sink
        self.stop_ids = set(stop_ids)
        self.filter = StreamTextFilter(stops)
        self.tokens: list[int] = []

    def put(self, token: int) -> None:
        """One new token of the row (end-of-turn tokens are not text)."""
        if token in self.stop_ids:
            return
        self.tokens.append(token)
        delta = self.filter.feed(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if delta:
            self.sink(delta)

    def finish(self, final_text: str) -> None:
        """Send what the filter held back, so that the pieces add up to ``final_text``."""
        if rest := self.filter.finish(final_text):
            self.sink(rest)


class DecodeRow:
    """One row decoded step by step outside ``generate`` (continuous batching).

    ``push`` each new token: it is streamed (``sink``), then the row's end is decided exactly as
    ``RowStopper`` decides it inside ``generate``; ``result`` is the same ``GenerationResult``.
    """

    def __init__(
        self,
        tokenizer: Any,
        params: GenerationParams,
        stop_token_ids: Iterable[int],
        prompt_tokens: int,
        sink: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = set(stop_token_ids)
        self.prompt_tokens = prompt_tokens
        self.cancel = cancel
        self.text = RowText(tokenizer, params.stop, sink, self.stop_ids) if sink is not None else None
        self.tokens: list[int] = []
        self.reason: str | None = None
        self._tail = stop_tail(params)

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, token: int) -> bool:
        """Add the row's next token; True when the row has ended."""
        self.tokens.append(token)
        if self.text is not None:
            self.text.put(token)
        self.reason = row_finish_reason(
            self.tokenizer, self.tokens, self.params, self.stop_ids, self.cancel, self._tail
        )
        return self.done

    def check_cancel(self) -> bool:
        """End the row now if its cancel event is set (before spending a step on it)."""
        if self.reason is None and self.cancel is not None and self.cancel.is_set():
            self.reason = FINISH_CANCELLED
        return self.done

    def result(self) -> GenerationResult:
        """The row's answer; a streamed row also gets the rest of its text."""
        r = row_result(
            self.tokenizer, self.tokens, self.reason, self.params, self.stop_ids, self.prompt_tokens
        )
        if self.text is not None:
            self.text.finish(r.text)
        return r


def sampling_warpers(temperature: float, top_p: float) -> Any:
    """The logits warpers ``generate`` applies when sampling with these settings (its default top-k too)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    warpers.append(TopKLogitsWarper(SAMPLING_TOP_K))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def next_tokens(logits: Any, params: Sequence[GenerationParams]) -> list[int]:
    """Each row's next token from its last-position logits ``[rows, vocab]``: greedy or sampled per row."""
    import torch

    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.do_sample:
            scores = sampling_warpers(p.temperature, p.top_p)(None, logits[i : i + 1])
            out[i] = int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
    return out


def embed_prompts(model: Any, examples: Sequence[PreparedExample]) -> tuple[Any, Any]:
    """Left-padded input embeddings ``[rows, length, dim]`` and attention mask of prepared examples."""
    batch = model.collate([{"conversation": ex.conversation} for ex in examples], padding_side="left")
    return model.embed_batch(batch), batch["attention_mask"].to(model.device)


# --------------------------------------------------------------------------- criteria and streamer
def _stopper_class():
    from transformers import StoppingCriteria

    class RowStopper(StoppingCriteria):
        """Per-row stopping inside ``generate``: ``row_finish_reason`` for each row still running."""

        def __init__(
            self,
            tokenizer: Any,
            start: int,
            params: Sequence[GenerationParams],
            stop_token_ids: Iterable[int],
            cancels: Sequence[threading.Event | None] | None = None,
        ) -> None:
            self.tokenizer = tokenizer
            self.start = start
            self.params = list(params)
            self.stop_ids = set(stop_token_ids)
            self.cancels = list(cancels) if cancels else [None] * len(self.params)
            self.step = 0
            self.finish_step: list[int | None] = [None] * len(self.params)
            self.reason: list[str | None] = [None] * len(self.params)
            self._tail = [stop_tail(p) for p in self.params]

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            self.step += 1
            new = input_ids[:, self.start :]
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for i, row in enumerate(new.tolist()):
                if self.finish_step[i] is None:
                    reason = row_finish_reason(
                        self.tokenizer, row, self.params[i], self.stop_ids, self.cancels[i], self._tail[i]
                    )
                    if reason is not None:
                        self.finish_step[i], self.reason[i] = self.step, reason
                done[i] = self.finish_step[i] is not None
            return done

    return RowStopper


def _streamer_class():
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        """Streams each row's growing text to its sink (a ``RowText`` per streamed row).

        ``sinks[i]`` is called with each new text piece of row ``i`` (None: row not streamed).
        Tokens a row receives after it finished (padding) are ignored.
        """

        def __init__(
            self, tokenizer: Any, stopper: Any, sinks: Sequence[Callable[[str], None] | None]
        ) -> None:
            self.stopper = stopper
            self.rows = [
                RowText(tokenizer, p.stop, sink, stopper.stop_ids) if sink is not None else None
                for p, sink in zip(stopper.params, sinks, strict=True)
            ]
            self.filters = [r.filter if r is not None else StreamTextFilter(()) for r in self.rows]
            self.prompt_seen = False
            self.step = 0

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            self.step += 1
            for i, tok in enumerate(value.reshape(-1).tolist()):
                fs = self.stopper.finish_step[i]
                if self.rows[i] is not None and (fs is None or fs >= self.step):
                    self.rows[i].put(tok)

        def end(self) -> None:
            pass

    return RowStreamer


def generate_prepared(
    model: Any,
    examples: Sequence[PreparedExample],
    params: GenerationParams | Sequence[GenerationParams],
    *,
    sinks: Sequence[Callable[[str], None] | None] | None = None,
    cancels: Sequence[threading.Event | None] | None = None,
    streamer: Any = None,
) -> list[GenerationResult]:
    """Generate for prepared examples in one batch (left padded), each row with its own params.

    ``sinks`` streams text pieces per row (what a streaming API sends); ``streamer`` is any
    ``transformers`` streamer for a one-row batch (e.g. ``TextIteratorStreamer``). When both are
    given, ``sinks`` wins. The final texts equal the concatenated streamed pieces.
    """
    import torch

    if not examples:
        return []
    if isinstance(params, GenerationParams):
        params = [params] * len(examples)
    params = list(params)
    if len(params) != len(examples):
        raise BlspError(f"{len(examples)} examples but {len(params)} generation settings")
    keys = {p.batch_key for p in params}
    if len(keys) != 1:
        raise BlspError("rows of one batch must share temperature and top_p (group them by batch_key)")
    do_sample, temperature, top_p = keys.pop()
    if streamer is not None and sinks is None and len(examples) != 1:
        raise BlspError("a transformers streamer supports one example at a time")

    stopper = _stopper_class()(model.tokenizer, 0, params, model.prompt.stop_token_ids, cancels)
    if sinks is not None:
        streamer = _streamer_class()(model.tokenizer, stopper, sinks)
    with torch.inference_mode():
        embeds, attention_mask = embed_prompts(model, examples)
        gen = model.generation_config(
            max(p.max_new_tokens for p in params),
            do_sample=do_sample,
            temperature=temperature or 1.0,
            top_p=top_p,
        )
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            generation_config=gen,
            stopping_criteria=[stopper],
            streamer=streamer,
        )
    results = [
        _finish_row(model, row, stopper, i, ex.prompt_tokens)
        for i, (row, ex) in enumerate(zip(out.tolist(), examples, strict=True))
    ]
    if sinks is not None:  # what the filters held back (a stop-string look-alike at the very end)
        for row, result in zip(streamer.rows, results, strict=True):
            if row is not None:
                row.finish(result.text)
    return results


def _finish_row(model: Any, row: list[int], stopper: Any, i: int, prompt_tokens: int) -> GenerationResult:
    fs = stopper.finish_step[i]
    tokens = row[: fs if fs is not None else len(row)]
    return row_result(
        model.tokenizer, tokens, stopper.reason[i], stopper.params[i], stopper.stop_ids, prompt_tokens
    )


def generate_grouped(
    model: Any,
    examples: Sequence[PreparedExample],
    params: Sequence[GenerationParams],
    **kwargs: Any,
) -> list[GenerationResult]:
    """``generate_prepared`` over rows with mixed sampling settings: one call per ``batch_key``."""
    results: list[GenerationResult | None] = [None] * len(examples)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.batch_key, []).append(i)
    for idx in groups.values():
        sub = {k: [v[i] for i in idx] for k, v in kwargs.items() if v is not None}
        outs = generate_prepared(model, [examples[i] for i in idx], [params[i] for i in idx], **sub)
        for i, r in zip(idx, outs, strict=True):
            results[i] = r
    return results  # type: ignore[return-value]


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

    ``generate``: the batch generator (``generate_prepared``'s signature), e.g. a
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
