"""Generation for BLSP: the one home of decoding, beside ``modeling_blsp`` (as ``transformers`` keeps
``generation_whisper.py`` beside ``modeling_whisper.py``).

Longer than 500 lines because it is the one home of generation: the settings, the per-row stop
and stream decisions and the decoders that apply them (``generate``/``decode``, the shrink fast
path, the step-by-step ``DecodeRow``) must agree token for token, so they are read together.

- :class:`GenerationParams`: the one settings type. ``temperature == 0`` is greedy decoding (the
  paper's setting and the default); ``temperature > 0`` samples. Every entry point and CLI flag
  uses this convention (``--do-sample`` of ``blsp behave`` maps onto it: :meth:`GenerationParams.from_flags`).
- :func:`generation_config`: the one ``transformers.GenerationConfig`` builder.
- Per-row stop and stream helpers: :func:`row_finish_reason` and :func:`row_result` decide how a
  row ends and what its answer is; :func:`row_stopper` (a ``StoppingCriteria``) and
  :func:`row_streamer` (a ``BaseStreamer``) apply them inside ``generate``; :class:`DecodeRow`
  applies them to a row decoded step by step outside it (the server's continuous batching).
- :func:`generate`: embed, generate, cut at stop tokens, for BLSP conversations (``BlspModel.generate``,
  ``SpeechPipeline``, the server's engine). :func:`decode` is its second half, on inputs that are
  already embedded or are token ids, optionally on a KV cache (``ChatSession``).
- :func:`decode_prompts`: text prompts as token ids (the behavior step), through :func:`decode`
  or its ``shrink`` fast path (:func:`decode_shrinking`).

Greedy answers are the same whichever way in (pinned by ``tests/models/test_greedy_pinned.py``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from blsp.errors import BlspError, ConfigError

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
SAMPLING_TOP_K = 50  # transformers' generate() default, applied when sampling
# The loop guard: a span of 1-16 tokens repeated back to back, at least 3 times and over at least
# 12 tokens (a one-token span 12 times, a two-token span 6 times, a four-token span 3 times).
LOOP_MAX_SPAN = 16
LOOP_MIN_REPEATS = 3
LOOP_MIN_TOKENS = 12


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GenerationParams:
    """How to decode one request (or every row of a job).

    ``temperature == 0`` is greedy decoding (the paper's setting, the default); above 0 the answer is
    sampled at that temperature, with ``top_p`` and ``top_k`` (``0``: no top-k cut; the default is
    ``generate``'s). ``stop``: strings that end the answer (left out of it). ``seed``: a base seed for
    sampling (None: unseeded); greedy decoding ignores it. ``loop_guard``: end the answer when it
    falls into a loop (a short span repeated back to back, :func:`loop_start`) and keep one copy of
    the span, as a small LLM decoding greedily often does ("long long long ...").
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    top_k: int = SAMPLING_TOP_K
    seed: int | None = None
    loop_guard: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, not {self.top_k}")
        stops = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(s for s in stops if s))

    @classmethod
    def from_flags(
        cls,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        **fields: Any,
    ) -> GenerationParams:
        """Settings from a ``do_sample`` switch and a temperature (``generate``'s convention).

        ``do_sample=None`` (not said): greedy unless ``temperature > 0``. ``do_sample=False``: greedy,
        whatever the temperature. ``do_sample=True``: sampling at ``temperature`` (1.0 when None;
        it must then be above 0).
        """
        if do_sample is None:
            t = float(temperature or 0.0)
        elif not do_sample:
            t = 0.0
        else:
            t = 1.0 if temperature is None else float(temperature)
            if t <= 0:
                raise ConfigError(f"temperature must be > 0 when sampling, not {t}")
        return cls(temperature=t, **fields)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def batch_key(self) -> tuple[bool, float, float, int]:
        """Rows with the same key can share one ``generate`` call."""
        if self.do_sample:
            return (True, self.temperature, self.top_p, self.top_k)
        return (False, 0.0, 1.0, 0)

    def updated(
        self,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> GenerationParams:
        """These settings with the given values replaced (None: keep); ``stop`` replaces the stop strings."""
        return replace(
            self,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            temperature=self.temperature if temperature is None else float(temperature),
            top_p=self.top_p if top_p is None else float(top_p),
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        )

    def record(self) -> dict[str, Any]:
        """The settings as the behavior step writes them into every output line.

        ``max_new_tokens`` and ``do_sample``, then (only when sampling) ``temperature``, ``top_p``
        and ``seed``; stop strings only when there are any. The format of files written before the
        settings types were merged, so those files can still be appended to.
        """
        d: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            d.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        if self.stop:
            d["stop"] = list(self.stop)
        if self.loop_guard:
            d["loop_guard"] = True
        return d


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


def per_row(params: GenerationParams | Sequence[GenerationParams], rows: int) -> list[GenerationParams]:
    """One ``GenerationParams`` per row (a single one is used for all)."""
    if isinstance(params, GenerationParams):
        return [params] * rows
    params = list(params)
    if len(params) != rows:
        raise BlspError(f"{rows} examples but {len(params)} generation settings")
    return params


def shared_key(params: Sequence[GenerationParams]) -> tuple[bool, float, float, int]:
    """The ``batch_key`` all rows share (an error when they differ)."""
    keys = {p.batch_key for p in params}
    if len(keys) != 1:
        raise BlspError("rows of one batch must share temperature and top_p (group them by batch_key)")
    return keys.pop()


def generation_config(
    params: GenerationParams | Sequence[GenerationParams], stop_token_ids: Iterable[int], pad_token_id: int
) -> Any:
    """The ``transformers.GenerationConfig`` of a batch: the longest budget of its rows, their shared
    sampling settings, the stop tokens as end-of-sequence and ``pad_token_id`` for finished rows."""
    from transformers import GenerationConfig

    params = [params] if isinstance(params, GenerationParams) else list(params)
    do_sample, temperature, top_p, top_k = shared_key(params)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max(p.max_new_tokens for p in params),
        do_sample=do_sample,
        eos_token_id=[int(t) for t in stop_token_ids],
        pad_token_id=int(pad_token_id),
        **sampling,
    )


def default_pad_token_id(tokenizer: Any, stop_token_ids: Sequence[int]) -> int:
    """The tokenizer's pad token, else the first stop token (finished rows are padded with it)."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else stop_token_ids[0])


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


# --------------------------------------------------------------------------- loops
def loop_start(tokens: Sequence[int], end: int | None = None) -> int | None:
    """If ``tokens[:end]`` ends in a loop, the length that keeps one copy of the repeated span, else None.

    A loop is a span of 1 to ``LOOP_MAX_SPAN`` tokens repeated back to back at the end, at least
    ``LOOP_MIN_REPEATS`` times and over at least ``LOOP_MIN_TOKENS`` tokens; the shortest span wins.
    Called on every decoding step of a guarded row, so it compares slices of ``tokens`` in place.
    """
    n = len(tokens) if end is None else end
    for span in range(1, LOOP_MAX_SPAN + 1):
        repeats = max(LOOP_MIN_REPEATS, -(-LOOP_MIN_TOKENS // span))
        if repeats * span > n:  # grows with span: no longer span fits either
            return None
        last = tokens[n - span : n]
        if all(tokens[n - (k + 1) * span : n - k * span] == last for k in range(1, repeats)):
            return n - (repeats - 1) * span
    return None


def first_loop(tokens: Sequence[int]) -> int | None:
    """:func:`loop_start` at the first point where ``tokens`` fall into a loop (None: they never do)."""
    for end in range(LOOP_MIN_TOKENS, len(tokens) + 1):
        if (keep := loop_start(tokens, end)) is not None:
            return keep
    return None


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

    In this order: its last token ends the turn, a stop string appeared or (``loop_guard``) it fell
    into a loop; its token budget is spent; its cancel event is set.
    """
    ended = bool(row) and row[-1] in stop_ids
    if not ended and params.stop:
        text = tokenizer.decode(list(row[-(tail or stop_tail(params)) :]), skip_special_tokens=True)
        ended = cut_at_stop(text, params.stop)[1]
    if not ended and params.loop_guard:
        ended = loop_start(row) is not None
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
    """A finished row's ``GenerationResult``: tokens cut at the first end-of-turn token or (``loop_guard``)
    after one copy of the span it first loops on, text at a stop string."""
    tokens = list(tokens)
    reason = reason or FINISH_LENGTH
    cut = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
    if cut is not None:
        tokens, reason = tokens[:cut], FINISH_STOP
    if params.loop_guard and (keep := first_loop(tokens)) is not None:
        tokens, reason = tokens[:keep], FINISH_STOP
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
    """One row decoded step by step outside ``generate`` (continuous batching, the shrink decoder).

    ``push`` each new token: it is streamed (``sink``), then the row's end is decided exactly as
    ``row_stopper`` decides it inside ``generate``; ``result`` is the same ``GenerationResult``.
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


# --------------------------------------------------------------------------- choosing tokens
def sampling_warpers(temperature: float, top_p: float, top_k: int = SAMPLING_TOP_K) -> Any:
    """The logits warpers ``generate`` applies when sampling with these settings (in its order)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
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
            scores = sampling_warpers(p.temperature, p.top_p, p.top_k)(None, logits[i : i + 1])
            out[i] = int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
    return out


# --------------------------------------------------------------------------- criteria and streamer
_CLASSES: dict[str, type] = {}


def _row_stopper_class() -> type:
    if "stopper" not in _CLASSES:
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

            def result(self, i: int, row: Sequence[int], prompt_tokens: int) -> GenerationResult:
                """Row ``i``'s answer from its generated tokens (those after it ended are padding)."""
                fs = self.finish_step[i]
                tokens = list(row[: fs if fs is not None else len(row)])
                return row_result(
                    self.tokenizer, tokens, self.reason[i], self.params[i], self.stop_ids, prompt_tokens
                )

        _CLASSES["stopper"] = RowStopper
    return _CLASSES["stopper"]


def _row_streamer_class() -> type:
    if "streamer" not in _CLASSES:
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

            def finish(self, results: Sequence[GenerationResult]) -> None:
                """Send what the filters held back (a stop-string look-alike at the very end)."""
                for row, result in zip(self.rows, results, strict=True):
                    if row is not None:
                        row.finish(result.text)

        _CLASSES["streamer"] = RowStreamer
    return _CLASSES["streamer"]


def row_stopper(
    tokenizer: Any,
    params: Sequence[GenerationParams],
    stop_token_ids: Iterable[int],
    *,
    start: int = 0,
    cancels: Sequence[threading.Event | None] | None = None,
) -> Any:
    """A ``StoppingCriteria`` that ends each row as ``row_finish_reason`` says; ``start``: where the
    generated tokens begin in the ids ``generate`` hands it. ``.result(i, row, n)`` is row ``i``'s answer."""
    return _row_stopper_class()(tokenizer, start, params, stop_token_ids, cancels)


def row_streamer(tokenizer: Any, stopper: Any, sinks: Sequence[Callable[[str], None] | None]) -> Any:
    """A ``transformers`` streamer handing each row's safe text pieces to ``sinks[i]`` (None: not
    streamed); call ``.finish(results)`` after ``generate`` so the pieces add up to each answer."""
    return _row_streamer_class()(tokenizer, stopper, sinks)


# --------------------------------------------------------------------------- generation
def decode(
    llm: Any,
    tokenizer: Any,
    stop_token_ids: Sequence[int],
    params: GenerationParams | Sequence[GenerationParams],
    *,
    inputs_embeds: Any = None,
    input_ids: Any = None,
    attention_mask: Any = None,
    cache: Any = None,
    prompt_tokens: Sequence[int] | None = None,
    sinks: Sequence[Callable[[str], None] | None] | None = None,
    cancels: Sequence[threading.Event | None] | None = None,
    streamer: Any = None,
    pad_token_id: int | None = None,
) -> list[GenerationResult]:
    """Generate with ``llm`` from a left-padded batch and cut each row at its end: the one call of
    ``llm.generate`` in blsp.

    Give ``inputs_embeds`` (the BLSP prompt, speech spliced in) or ``input_ids``; with ``cache`` (a
    KV cache holding all but the last prompt positions), ``input_ids`` are the whole prompt and only
    its uncached tail is run. Every row has its own ``params`` (sampling settings shared): it ends
    on a stop token or string, its token budget or its ``cancels`` event. ``sinks`` streams text
    pieces per row; ``streamer`` is any ``transformers`` streamer for a one-row batch (``sinks``
    wins when both are given). ``prompt_tokens``: each row's prompt length for the results
    (default: its attention mask's sum).
    """
    import torch

    rows = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
    params = per_row(params, rows)
    shared_key(params)
    if streamer is not None and sinks is None and rows != 1:
        raise BlspError("a transformers streamer supports one example at a time")
    pad = pad_token_id if pad_token_id is not None else default_pad_token_id(tokenizer, stop_token_ids)
    start = input_ids.shape[1] if input_ids is not None else 0
    stopper = row_stopper(tokenizer, params, stop_token_ids, start=start, cancels=cancels)
    if sinks is not None:
        streamer = row_streamer(tokenizer, stopper, sinks)
    inputs: dict[str, Any] = {}
    if inputs_embeds is not None:
        inputs["inputs_embeds"] = inputs_embeds
    if input_ids is not None:
        inputs["input_ids"] = input_ids
    if cache is not None:
        inputs.update(cache_kwargs(llm, cache))
    with torch.inference_mode():
        out = llm.generate(
            **inputs,
            attention_mask=attention_mask,
            generation_config=generation_config(params, stop_token_ids, pad),
            stopping_criteria=[stopper],
            streamer=streamer,
        )
    if prompt_tokens is None:
        prompt_tokens = attention_mask.sum(-1).tolist()
    results = [
        stopper.result(i, row, int(n))
        for i, (row, n) in enumerate(zip(out[:, start:].tolist(), prompt_tokens, strict=True))
    ]
    if sinks is not None:
        streamer.finish(results)
    return results


def embed_conversations(model: Any, conversations: Sequence[Any]) -> tuple[Any, Any]:
    """Left-padded input embeddings ``[rows, length, dim]`` of conversations and their attention mask.

    Each item is a conversation, a ``{"conversation": ...}`` example, or anything with a
    ``.conversation`` (a ``PreparedExample``)."""
    convs = [
        c["conversation"] if isinstance(c, dict) else getattr(c, "conversation", c) for c in conversations
    ]
    batch = model.collate([{"conversation": c} for c in convs], padding_side="left")
    return model.embed_batch(batch), batch["attention_mask"].to(model.device)


def model_pad_token_id(model: Any) -> int:
    """The id a BLSP model pads finished rows with: its tokenizer's pad token, else its end-of-turn token."""
    pad = model.tokenizer.pad_token_id
    return int(pad if pad is not None else model.prompt.end_token_id)


def generate(
    model: Any,
    examples: Sequence[Any],
    params: GenerationParams | Sequence[GenerationParams],
    *,
    sinks: Sequence[Callable[[str], None] | None] | None = None,
    cancels: Sequence[threading.Event | None] | None = None,
    streamer: Any = None,
) -> list[GenerationResult]:
    """Embed, generate, cut at stop tokens: BLSP's answers for a batch of conversations (left padded).

    ``examples``: ``PreparedExample``s, ``{"conversation": ...}`` dicts or conversations; every row
    has its own ``params`` (see :func:`decode` for ``sinks``, ``cancels`` and ``streamer``). The
    final texts equal the concatenated streamed pieces.
    """
    import torch

    if not examples:
        return []
    params = per_row(params, len(examples))
    shared_key(params)
    with torch.inference_mode():
        embeds, mask = embed_conversations(model, examples)
    return decode(
        model.llm,
        model.tokenizer,
        model.prompt.stop_token_ids,
        params,
        inputs_embeds=embeds,
        attention_mask=mask,
        sinks=sinks,
        cancels=cancels,
        streamer=streamer,
        pad_token_id=model_pad_token_id(model),
    )


def generate_grouped(
    model: Any,
    examples: Sequence[Any],
    params: Sequence[GenerationParams],
    **kwargs: Any,
) -> list[GenerationResult]:
    """``generate`` over rows with mixed sampling settings: one call per ``batch_key``."""
    results: list[GenerationResult | None] = [None] * len(examples)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.batch_key, []).append(i)
    for idx in groups.values():
        sub = {k: [v[i] for i in idx] for k, v in kwargs.items() if v is not None}
        outs = generate(model, [examples[i] for i in idx], [params[i] for i in idx], **sub)
        for i, r in zip(idx, outs, strict=True):
            results[i] = r
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- token-id prompts
def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """Token-id prompts as a left-padded ``[rows, width]`` batch and its attention mask."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: the last prompt token of every row is aligned
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def new_cache(llm: Any) -> Any:
    """An empty ``DynamicCache`` with the LLM's layer kinds (sliding window, ...) where this
    ``transformers`` knows them."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=llm.config)
    except TypeError:
        return DynamicCache()


def cache_kwargs(llm: Any, cache: Any) -> dict[str, Any]:
    """The KV-cache keyword of ``llm``'s ``forward`` and ``generate``: ``cache=`` on ``transformers``
    that renamed ``past_key_values`` (5.2x), else the old name."""
    return {_cache_name(type(llm)): cache}


@functools.cache
def _cache_name(llm_class: type) -> str:  # a class's signature is fixed: looked up once
    import inspect

    params = inspect.signature(llm_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decode_prompts(
    llm: Any,
    tokenizer: Any,
    stop_token_ids: Sequence[int],
    prompts: Sequence[Sequence[int]],
    params: GenerationParams,
    *,
    shrink: bool = True,
    pad_token_id: int | None = None,
) -> list[GenerationResult]:
    """Answers to text prompts given as token ids (the behavior step), one ``params`` for all.

    ``shrink=False``: one left-padded :func:`decode` (every row runs until the batch's longest ends).
    ``shrink=True``: the fast path :func:`decode_shrinking`; the same greedy answers.
    """
    if not prompts:
        return []
    pad = pad_token_id if pad_token_id is not None else default_pad_token_id(tokenizer, stop_token_ids)
    if shrink:
        return decode_shrinking(llm, tokenizer, stop_token_ids, prompts, params, pad_token_id=pad)
    device = next(llm.parameters()).device
    ids, mask = left_pad(prompts, pad)
    return decode(
        llm,
        tokenizer,
        stop_token_ids,
        params,
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        pad_token_id=pad,
    )


def decode_shrinking(
    llm: Any,
    tokenizer: Any,
    stop_token_ids: Sequence[int],
    prompts: Sequence[Sequence[int]],
    params: GenerationParams,
    *,
    pad_token_id: int | None = None,
) -> list[GenerationResult]:
    """The shared-prefix "shrink" decoder: a fast path of :func:`decode_prompts` for many prompts
    that share a long head (system prompt, chat markup, instruction), as behavior prompts do.

    The head's KV is computed once and repeated for every row; the padding then sits between that
    head and each row's own tail, which the attention mask hides and the position ids skip. Then it
    decodes step by step and drops each finished row from the batch and its KV cache at once
    (``DynamicCache.batch_select_indices``): on a compute-bound CPU neither the repeated head nor
    a finished row costs anything more (3x the original BLSP loop in ``bench/behave_throughput.py``).
    Rows end as in ``generate`` (:class:`DecodeRow`); sampling draws the whole batch at once.
    """
    import torch

    from blsp.models.prompt import MIN_SHARED_PREFIX, shared_prefix_length

    pad = pad_token_id if pad_token_id is not None else default_pad_token_id(tokenizer, stop_token_ids)
    device = next(llm.parameters()).device
    cache = new_cache(llm)
    n = shared_prefix_length(prompts) if len(prompts) > 1 else 0
    if n >= MIN_SHARED_PREFIX:
        head = torch.tensor([list(prompts[0][:n])], dtype=torch.long, device=device)
        with torch.inference_mode():
            llm(input_ids=head, use_cache=True, logits_to_keep=1, **cache_kwargs(llm, cache))
        cache.batch_repeat_interleave(len(prompts))
    else:
        n = 0
    ids, mask = left_pad([p[n:] for p in prompts], pad)
    ids, mask = ids.to(device), mask.to(device)
    mask = torch.cat([mask.new_ones((mask.shape[0], n)), mask], dim=1)
    # what generate derives from the attention mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, n:]
    warpers = sampling_warpers(params.temperature, params.top_p, params.top_k) if params.do_sample else None
    rows = [DecodeRow(tokenizer, params, stop_token_ids, len(p)) for p in prompts]
    active = list(range(len(prompts)))  # prompt index of each batch row
    step_ids, step_pos, last_pos = ids, positions, positions[:, -1]
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            out = llm(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(llm, cache),
            )
            logits = out.logits[:, -1, :].float()
            if warpers is not None:
                probs = torch.softmax(warpers(None, logits), dim=-1)
                nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            keep = [row for row, token in enumerate(nxt.tolist()) if not rows[active[row]].push(token)]
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and the KV cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, nxt, last_pos = mask[index], nxt[index], last_pos[index]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last_pos = last_pos + 1
            step_ids, step_pos = nxt[:, None], last_pos[:, None]
    return [r.result() for r in rows]
