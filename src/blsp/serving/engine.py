"""The batching engine: one worker thread owns the model; requests that arrive together share a batch.

A request handler (asyncio) decodes its audio, then ``submit``s a job. The worker takes the
first waiting job, keeps collecting for up to ``batch_wait_ms`` or until ``max_batch_size`` jobs,
prepares each (prompt layout, features, context-window check; a bad one fails alone), groups
them by sampling settings and runs one ``generate`` per group. Rows keep their own
``max_tokens`` and ``stop`` strings inside a batch (``blsp.inference.generate.RowStopper``).

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
from dataclasses import dataclass, field
from typing import Any

from blsp.errors import BlspError
from blsp.inference.generate import (
    GenerationParams,
    GenerationResult,
    PreparedExample,
    check_fits,
    generate_prepared,
    prepare_conversation,
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
    def _collect(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait
        while len(batch) < self.max_batch_size:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    job = self._q.get(timeout=left)
                except queue.Empty:
                    break
            if job is None:
                self._stopping.set()
                break
            self._take(job)
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
                results = generate_prepared(
                    self.model,
                    [j.prepared for j in group],  # type: ignore[misc]
                    [j.params for j in group],
                    sinks=sinks if any(s is not None for s in sinks) else None,
                    cancels=[j.cancel for j in group],
                )
            except Exception as e:  # inputs were checked in _prepare: this is rare (or a bug)
                if not isinstance(e, BlspError):
                    logger.exception("generation of a batch of %d failed", len(group))
                for j in group:
                    j.fail(e)
                continue
            for j, r in zip(group, results, strict=True):
                self.jobs_done += 1
                j.resolve(r)
