"""The batching engines: one worker thread owns the model; concurrent requests share a batch.

Longer than 500 lines because the two engines share one job queue, cancel and liveness protocol
(``BatchEngine``), and the continuous one's batch cache (``_ActiveRows``) only makes sense beside
it; what a row generates and how it ends is ``blsp.models.generation_blsp``'s.

A request handler (asyncio) decodes its audio, then ``submit``s a job. Two engines:

- ``BatchEngine`` (static): the worker takes the first waiting job, keeps collecting for up to
  ``batch_wait_ms`` or until ``max_batch_size`` jobs, prepares each (prompt layout, features,
  context-window check; a bad one fails alone), groups them by sampling settings and runs one
  ``generate`` per group until its longest row ends; jobs that arrive meanwhile wait. Rows keep
  their own ``max_tokens`` and ``stop`` strings (``blsp.models.generation_blsp.row_stopper``).
- ``ContinuousEngine``: rows join a running batch before any decode step and leave it as soon as
  they end; each new row's prompt is prefilled and its first token streamed at once (KV cache per
  row joined into one left-padded batch cache). Rows end exactly as inside ``generate``
  (``blsp.models.generation_blsp.DecodeRow``), so greedy answers are the static engine's.

Streaming jobs are batched like the others: each streamed row has its own sink that hands text
pieces to the request's asyncio queue (``loop.call_soon_threadsafe``). A client that goes away
sets the job's cancel event (``BatchEngine.cancel``): a queued job leaves the queue count at once
and is skipped, a running row stops at the next step.

Liveness: if the worker thread dies, every waiting and running job fails with
``EngineUnavailable`` and so does every later ``submit`` (the server answers 503 at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from blsp.errors import BlspError
from blsp.inference.generate import PreparedExample, check_fits, prepare_conversation
from blsp.models.generation_blsp import (
    DecodeRow,
    GenerationParams,
    GenerationResult,
    cache_kwargs,
    embed_conversations,
    generate,
    next_tokens,
)

logger = logging.getLogger(__name__)


class QueueFullError(BlspError):
    """The server has more waiting requests than it accepts."""


class EngineUnavailable(BlspError):
    """The model worker is not running (it stopped or died)."""


@dataclass
class Job:
    conversation: list[dict[str, Any]]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    events: asyncio.Queue | None = (
        None  # streaming: ("ready", n) ("delta", text) ("done", result) ("error", exc)
    )
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    prepared: PreparedExample | None = None

    def _call(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: the client is gone
            self.loop.call_soon_threadsafe(fn, *args)

    def emit(self, kind: str, value: Any) -> None:
        if self.events is not None:
            self._call(self.events.put_nowait, (kind, value))

    def resolve(self, result: GenerationResult) -> None:
        self._call(_set_result, self.future, result)
        self.emit("done", result)

    def fail(self, exc: BaseException) -> None:
        self._call(_set_exception, self.future, exc)
        self.emit("error", exc)


def fail_jobs(jobs: Iterable[Job], exc: BaseException, what: str) -> None:
    """Fail every job of a batch step that raised; log the traceback unless it is a known error."""
    jobs = list(jobs)
    if not isinstance(exc, BlspError):
        logger.error("%s of %d requests failed", what, len(jobs), exc_info=exc)
    for job in jobs:
        job.fail(exc)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # mark retrieved: a streaming handler reads the error from its events


class BatchEngine:
    """Runs generation jobs on one worker thread, batching those that arrive together.

    Args:
        pipeline: a ``SpeechPipeline`` (its model and audio limits are used).
        max_batch_size: most jobs in one ``generate`` (1 turns batching off).
        batch_wait_ms: how long the first job of a batch waits for company.
        max_queue: waiting jobs beyond this are refused (``QueueFullError``).
    """

    batching = "static"

    def __init__(
        self, pipeline: Any, max_batch_size: int = 8, batch_wait_ms: float = 10.0, max_queue: int = 256
    ):
        self.pipeline = pipeline
        self.model = pipeline.model
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait = max(0.0, batch_wait_ms / 1000.0)
        self.max_queue = max_queue
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.batch_sizes: Counter[int] = Counter()
        self.jobs_done = 0
        self.jobs_cancelled = 0
        self.busy = False
        self._lock = threading.Lock()
        self._waiting: set[int] = set()  # ids of queued jobs not yet taken nor cancelled
        self._current: list[Job] = []
        self.died: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="blsp-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def check_alive(self) -> None:
        """Raise ``EngineUnavailable`` unless the worker is running."""
        if not self.alive:
            raise EngineUnavailable(
                f"the model worker is not running ({self.died or 'stopped'}); the server cannot answer"
            )

    def stats(self) -> dict[str, Any]:
        n = sum(self.batch_sizes.values())
        rows = sum(k * v for k, v in self.batch_sizes.items())
        return {
            "batching": self.batching,
            "queued": len(self._waiting),
            "busy": self.busy,
            "alive": self.alive,
            "jobs_done": self.jobs_done,
            "jobs_cancelled": self.jobs_cancelled,
            "batches": n,
            "mean_batch_size": round(rows / n, 3) if n else 0.0,
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.batch_wait * 1000,
        }

    # ------------------------------------------------------------------ submit
    def submit(
        self, conversation: list[dict[str, Any]], params: GenerationParams, stream: bool = False
    ) -> Job:
        """Queue a job (call from the event loop); await ``job.future`` or read ``job.events``."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        job = Job(conversation, params, loop, stream=stream, future=loop.create_future())
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"the server has {self.max_queue} requests waiting (--max-queue); try again later"
                )
            self._waiting.add(id(job))
        if stream:
            job.events = asyncio.Queue()
        self._q.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a queued one frees its place in the queue now, a running row stops at its next step."""
        if not job.cancel.is_set():
            job.cancel.set()
            with self._lock:
                self._waiting.discard(id(job))

    def _take(self, job: Job) -> None:
        with self._lock:
            self._waiting.discard(id(job))

    def check_prompt(self, conversation: list[dict[str, Any]], max_new_tokens: int) -> int:
        """Positions the prompt will take, from sample counts only; raises ``BlspError`` if it will not fit.

        Audio parts are ``{"type": "audio", "samples": n}`` (16 kHz); nothing is featurised: each
        stands in as an empty ``[0, n // hop]`` feature tensor, which the prompt counts by frames.
        """
        import torch

        hop = int(self.model.encoder.feature_extractor.hop_length)

        def stand_in(part: dict[str, Any]) -> dict[str, Any]:
            if part.get("type") != "audio":
                return part
            return {"type": "audio", "audio": torch.empty((0, int(part["samples"]) // hop)), "key": "-"}

        conv = [
            m if isinstance(m["content"], str) else {**m, "content": [stand_in(p) for p in m["content"]]}
            for m in conversation
        ]
        example = prepare_conversation(self.model, conv, source="messages")
        check_fits(self.model, example, max_new_tokens)
        return example.prompt_tokens

    async def run(self, conversation: list[dict[str, Any]], params: GenerationParams) -> GenerationResult:
        job = self.submit(conversation, params)
        try:
            return await job.future
        finally:
            self.cancel(job)  # no-op when finished; stops the row when the request was cancelled

    # ------------------------------------------------------------------ worker
    def _pop(self, timeout: float = 0.0) -> Job | None:
        """The next waiting job, taken (None: none within ``timeout`` s, or the stop sentinel)."""
        try:
            job = self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return None
        if job is None:
            self._stopping.set()
            return None
        self._take(job)
        return job

    def _collect(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait
        while len(batch) < self.max_batch_size:
            job = self._pop(max(0.0, deadline - time.perf_counter()))
            if job is None:
                break
            batch.append(job)
        return batch

    def _prepare(self, job: Job) -> bool:
        try:
            job.prepared = prepare_conversation(
                self.model, job.conversation, limits=self.pipeline.limits, source="messages"
            )
            check_fits(self.model, job.prepared, job.params.max_new_tokens)
        except BlspError as e:
            job.fail(e)
            return False
        except Exception as e:  # a bug or an unexpected input: fail this job only
            logger.exception("preparing a request failed")
            job.fail(e)
            return False
        job.emit("ready", job.prepared.prompt_tokens)
        return True

    def _run(self) -> None:
        reason: BlspError = EngineUnavailable("the server is shutting down")
        try:
            self._loop()
        except BaseException as e:  # the worker itself failed: nothing can run any more
            logger.exception("the model worker died")
            self.died = f"it died: {type(e).__name__}: {e}"
            reason = EngineUnavailable(f"the model worker died ({type(e).__name__}); restart the server")
        finally:
            self._stopping.set()
            # Fail whatever was running or is still waiting.
            for job in self._current:
                job.fail(reason)
            while True:
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._take(job)
                    job.fail(reason)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            first = self._q.get()
            if first is None:
                break
            self._take(first)
            self._current = batch = self._collect(first)
            self.busy = True
            try:
                self._run_batch(batch)
            finally:
                self.busy = False
            self._current = []

    def _run_batch(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancel.is_set()]
        self.jobs_cancelled += len(batch) - len(live)  # their clients went away while they waited
        jobs = [j for j in live if self._prepare(j)]
        self._current = jobs
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            groups.setdefault(j.params.batch_key, []).append(j)
        for group in groups.values():
            self.batch_sizes[len(group)] += 1
            sinks = [(lambda text, j=j: j.emit("delta", text)) if j.stream else None for j in group]
            try:
                results = generate(
                    self.model,
                    [j.prepared for j in group],  # type: ignore[misc]
                    [j.params for j in group],
                    sinks=sinks if any(s is not None for s in sinks) else None,
                    cancels=[j.cancel for j in group],
                )
            except Exception as e:  # inputs were checked in _prepare: this is rare (or a bug)
                fail_jobs(group, e, "generation")
                continue
            for j, r in zip(group, results, strict=True):
                self.jobs_done += 1
                j.resolve(r)


# ---------------------------------------------------------------------------------- continuous
BATCHING_MODES = ("continuous", "static")


def supports_continuous(model: Any) -> bool:
    """Whether the LLM's KV cache is plain full-attention ``DynamicLayer``s (what rows can be joined in)."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=model.llm.config)
    except Exception:  # an older transformers or an unusual config: stay with static batches
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def make_engine(pipeline: Any, batching: str = "continuous", **kwargs: Any) -> BatchEngine:
    """A ``ContinuousEngine`` or a (static) ``BatchEngine``; continuous falls back to static when unsupported."""
    if batching not in BATCHING_MODES:
        raise BlspError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
    if batching == "continuous" and not supports_continuous(pipeline.model):
        logger.warning("this LLM's KV cache cannot be joined row by row: using static batching")
        batching = "static"
    return (ContinuousEngine if batching == "continuous" else BatchEngine)(pipeline, **kwargs)


@dataclass
class _Row:
    job: Job
    decode: DecodeRow


def _pad_left(x: Any, n: int, dim: int) -> Any:
    """``x`` with ``n`` zeros before its entries along ``dim`` (a negative index)."""
    import torch.nn.functional as F

    return x if n == 0 else F.pad(x, (0, 0) * (-dim - 1) + (n, 0))


class _ActiveRows:
    """The running rows of a continuous batch: one left-padded KV cache, its attention mask, next inputs.

    Row ``i`` holds its prompt and answer so far in ``cache`` (its padding on the left, masked out),
    and ``last[i]``, its newest token, not yet run through the LLM.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.rows: list[_Row] = []
        self.last: list[int] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, positions] long, 1 where a position is real

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def jobs(self) -> list[Job]:
        return [r.job for r in self.rows]

    def prefill(self, jobs: list[Job]) -> list[_Row]:
        """Run the prompts of prepared ``jobs`` as one left-padded batch and pick each one's first token
        (streamed now); the rows that did not end on it join the running batch. Returns all of them."""
        import torch
        from transformers import DynamicCache

        model = self.model
        rows = []
        for job in jobs:
            assert job.prepared is not None
            sink = (lambda text, job=job: job.emit("delta", text)) if job.stream else None
            decode = DecodeRow(
                model.tokenizer,
                job.params,
                model.prompt.stop_token_ids,
                job.prepared.prompt_tokens,
                sink,
                job.cancel,
            )
            rows.append(_Row(job, decode))
        with torch.inference_mode():
            embeds, mask = embed_conversations(model, [j.prepared for j in jobs])  # type: ignore[misc]
            cache = DynamicCache(config=model.llm.config)
            out = model.llm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(model.llm, cache),
            )
            tokens = next_tokens(out.logits[:, -1], [j.params for j in jobs])
        for row, token in zip(rows, tokens, strict=True):
            row.decode.push(token)
        joining = [i for i, r in enumerate(rows) if not r.decode.done]
        if joining:
            if len(joining) < len(rows):
                index = torch.tensor(joining, device=mask.device)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[index], layer.values[index]
                mask = mask[index]
            self._join(cache, mask)
            self.rows += [rows[i] for i in joining]
            self.last += [tokens[i] for i in joining]
        return rows

    def _join(self, cache: Any, mask: Any) -> None:
        import torch

        if not self.rows:
            self.cache, self.mask = cache, mask
            return
        have, new = self.mask.shape[1], mask.shape[1]
        width = max(have, new)

        def both(a: Any, b: Any, dim: int) -> Any:
            return torch.cat([_pad_left(a, width - have, dim), _pad_left(b, width - new, dim)])

        joined = [  # all built before any is set: a failure leaves the running batch as it was
            (both(mine.keys, theirs.keys, -2), both(mine.values, theirs.values, -2))
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True)
        ]
        for layer, (keys, values) in zip(self.cache.layers, joined, strict=True):
            layer.keys, layer.values = keys, values
        self.mask = both(self.mask, mask, -1)

    def step(self) -> None:
        """One batched decode step: every row's ``last`` token goes in, its next token is pushed."""
        import torch

        model = self.model
        with torch.inference_mode():
            ids = torch.tensor(self.last, dtype=torch.long, device=self.mask.device)[:, None]
            positions = self.mask.sum(-1, keepdim=True)
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            out = model.llm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **cache_kwargs(model.llm, self.cache),
            )
            self.mask = mask
            tokens = next_tokens(out.logits[:, -1], [r.decode.params for r in self.rows])
        for row, token in zip(self.rows, tokens, strict=True):
            row.decode.push(token)
        self.last = tokens

    def retire(self) -> list[_Row]:
        """Take the finished rows out of the batch (cache rows and all-padding columns dropped)."""
        import torch

        done = [r for r in self.rows if r.decode.done]
        if not done:
            return []
        keep = [i for i, r in enumerate(self.rows) if not r.decode.done]
        self.rows = [self.rows[i] for i in keep]
        self.last = [self.last[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return done
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        return done

    def clear(self) -> list[_Row]:
        rows, self.rows, self.last, self.cache, self.mask = self.rows, [], [], None, None
        return rows


class ContinuousEngine(BatchEngine):
    """A ``BatchEngine`` whose batch is never closed: requests join a running batch at the next step.

    Before each decode step the waiting jobs are admitted (up to ``max_batch_size`` rows in all):
    prepared, their prompts prefilled together, each first token streamed at once, and their KV
    joined to the running cache (left padded). Then one batched decode step runs for every row
    (rows may sample with different settings); each row applies its own end-of-turn token, stop
    strings, token budget and cancel event, and finished rows leave at once. An idle engine still
    waits ``batch_wait_ms`` for company before its first prefill. ``batches`` counts admission
    waves; ``decode_steps``, ``step_rows`` and ``mean_step_rows`` the decode steps and their rows.
    """

    batching = "continuous"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decode_steps = 0
        self.step_rows = 0

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["decode_steps"] = self.decode_steps
        out["step_rows"] = self.step_rows
        out["mean_step_rows"] = round(self.step_rows / self.decode_steps, 3) if self.decode_steps else 0.0
        return out

    def _drain(self, room: int) -> list[Job]:
        """Waiting jobs, without waiting, up to ``room``."""
        jobs: list[Job] = []
        while len(jobs) < room:
            job = self._pop()
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        rows = _ActiveRows(self.model)
        while not self._stopping.is_set():
            if rows:
                new = self._drain(self.max_batch_size - len(rows))
            else:
                first = self._q.get()
                if first is None:
                    break
                self._take(first)
                new = self._collect(first)
            self._current = rows.jobs + new  # failed with the worker, should it die now
            self.busy = True
            if new:
                self._admit(rows, new)
            self._current = rows.jobs
            if rows:
                self._step(rows)
            self._current = rows.jobs
            self.busy = bool(rows)
        self.busy = False

    def _finish(self, row: _Row) -> None:
        self.jobs_done += 1
        row.job.resolve(row.decode.result())

    def _admit(self, rows: _ActiveRows, jobs: list[Job]) -> None:
        live = [j for j in jobs if not j.cancel.is_set()]
        self.jobs_cancelled += len(jobs) - len(live)  # their clients went away while they waited
        ready = [j for j in live if self._prepare(j)]
        if not ready:
            return
        self.batch_sizes[len(ready)] += 1
        try:
            admitted = rows.prefill(ready)
        except Exception as e:  # inputs were checked in _prepare: this is rare (or a bug)
            fail_jobs(ready, e, "prefill")
            return
        for row in admitted:
            if row.decode.done:  # ended on its first token
                self._finish(row)

    def _step(self, rows: _ActiveRows) -> None:
        for row in rows.rows:
            row.decode.check_cancel()
        for row in rows.retire():
            self._finish(row)
        if not rows:
            return
        self.decode_steps += 1
        self.step_rows += len(rows)
        try:
            rows.step()
        except Exception as e:  # the batch's state is unknown now: fail its rows, keep serving
            fail_jobs([row.job for row in rows.clear()], e, "a decode step")
            return
        for row in rows.retire():
            self._finish(row)
