"""vLLM as the decoder of blsp's request path: blsp embeds the prompt, vLLM runs the frozen LLM.

The speech encoder, the adapter and the splice of speech into the prompt stay in blsp
(``BlspModel.embed``); vLLM receives one ``{"prompt_embeds": tensor}`` prompt per request (its
prompt-embeds input, ``enable_prompt_embeds=True``) and decodes it with continuous batching and a
paged KV cache. vLLM is imported only when this backend is chosen; without it a
:class:`~blsp.errors.BlspError` says how to install it.

- :func:`build_requests` (pure, no vLLM needed): the prompt embeddings and ``SamplingParams``
  fields vLLM would receive for prepared examples and their ``GenerationParams``.
- :class:`VllmGenerator`: offline ``vllm.LLM`` (``blsp generate --backend vllm``).
- :func:`vllm_engine_class`: the server's engine on vLLM's ``AsyncLLM`` (``blsp serve --backend vllm``):
  blsp's worker thread prepares and embeds requests, vLLM's loop decodes them, each streamed and
  cancellable on its own.

Not run in blsp's tests (vLLM needs Linux and a CUDA GPU): what they check is what
:func:`build_requests` builds; docs/SCALING.md gives the commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blsp.errors import BlspError
from blsp.inference.generate import PreparedExample
from blsp.models.generation_blsp import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationParams,
    GenerationResult,
    StreamTextFilter,
    finalize_text,
    first_loop,
    per_row,
)
from blsp.utils.torch import torch_dtype

logger = logging.getLogger(__name__)


def import_vllm() -> Any:
    """The ``vllm`` package, or a clear error when it is not installed."""
    try:
        import vllm
    except ImportError as e:
        raise BlspError(
            "--backend vllm needs the vllm package (pip install vllm; Linux with a CUDA GPU, vLLM >= 0.9 "
            "for prompt-embeds input). Use --backend transformers (the default) otherwise."
        ) from e
    return vllm


# --------------------------------------------------------------------------- the requests
@dataclass
class VllmRequest:
    """What vLLM receives for one prepared example."""

    prompt_embeds: torch.Tensor  # [prompt positions, LLM hidden size], on the CPU, in vLLM's dtype
    sampling: dict[str, Any]  # keyword arguments of vllm.SamplingParams
    prompt_tokens: int

    @property
    def prompt(self) -> dict[str, torch.Tensor]:
        """vLLM's prompt-embeds input (``vllm.inputs.EmbedsPrompt``)."""
        return {"prompt_embeds": self.prompt_embeds}


def sampling_fields(
    params: GenerationParams, stop_token_ids: Iterable[int], seed: int | None = None
) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments equivalent to blsp's ``GenerationParams``.

    Greedy (``temperature == 0``, the paper's setting) is vLLM's temperature 0 (top_p and the seed
    then do not matter and are left at their neutral values). ``stop_token_ids`` are the prompt
    builder's end-of-turn and end-of-text tokens; stop strings are excluded from the text, as blsp
    does."""
    greedy = not params.do_sample
    return {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "stop": list(params.stop),
        "stop_token_ids": sorted({int(t) for t in stop_token_ids}),
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "seed": None if greedy else seed,
    }


def build_requests(
    model: Any,
    examples: Sequence[PreparedExample],
    params: GenerationParams | Sequence[GenerationParams],
    *,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> list[VllmRequest]:
    """The vLLM requests of prepared examples: one unpadded ``prompt_embeds`` each, and its sampling.

    The rows are embedded in one right-padded batch and cut to their own length (no padding goes to
    vLLM: it lays out its own batches). ``dtype``: vLLM's model dtype (default: the blsp LLM's).
    """
    params = per_row(params, len(examples))
    if not examples:
        return []
    batch = model.collate([{"conversation": ex.conversation} for ex in examples], padding_side="right")
    with torch.inference_mode():
        embeds = model.embed_batch(batch)
    lengths = batch["attention_mask"].sum(-1).tolist()
    stops = model.prompt.stop_token_ids
    out = []
    for i, (ex, p) in enumerate(zip(examples, params, strict=True)):
        n = int(lengths[i])
        if n != ex.prompt_tokens:
            raise BlspError(f"row {i}: the prompt takes {n} positions, but {ex.prompt_tokens} were counted")
        row = embeds[i, :n].detach().to("cpu", dtype or embeds.dtype).contiguous()
        out.append(VllmRequest(row, sampling_fields(p, stops, seed), n))
    return out


def result_from_completion(
    completion: Any,
    params: GenerationParams,
    stop_token_ids: Iterable[int],
    prompt_tokens: int,
    tokenizer: Any = None,
) -> GenerationResult:
    """blsp's result from a vLLM ``CompletionOutput`` (``text``, ``token_ids``, ``finish_reason``).

    With ``tokenizer`` and ``params.loop_guard``, an answer that fell into a loop is cut as the
    transformers path cuts it (vLLM itself decoded on to the end of the loop or the budget).
    """
    stops = set(stop_token_ids)
    tokens = list(completion.token_ids)
    while tokens and tokens[-1] in stops:  # vLLM keeps the stop token; blsp's answers do not
        tokens.pop()
    raw = completion.text or ""
    looped = False
    if tokenizer is not None and params.loop_guard and (keep := first_loop(tokens)) is not None:
        tokens, looped = tokens[:keep], True
        raw = tokenizer.decode(tokens, skip_special_tokens=True)
    text, hit = finalize_text(raw, params.stop)
    reason = FINISH_STOP if hit or looped or completion.finish_reason == "stop" else FINISH_LENGTH
    return GenerationResult(text=text, token_ids=tokens, finish_reason=reason, prompt_tokens=prompt_tokens)


# --------------------------------------------------------------------------- loading vLLM
def engine_kwargs(
    model: Any,
    *,
    adapter_dir: str | Path | None = None,
    llm: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    gpu_memory_utilization: float = 0.6,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` / ``AsyncEngineArgs`` for the frozen LLM of ``model``.

    ``llm``: the LLM folder or hub id vLLM loads (default: the one the adapter was trained on). A
    LoRA fine-tune's LLM differs from that one: merge it and pass the merged folder as ``llm``.
    ``gpu_memory_utilization`` is vLLM's share of the GPU (blsp's encoder and adapter use the rest).
    """
    from blsp.models.hub import LORA_DIR, resolve

    if llm is None:
        if adapter_dir is not None and (Path(adapter_dir) / LORA_DIR).is_dir():
            raise BlspError(
                f"{adapter_dir} is a LoRA fine-tune: vLLM needs its LLM with the LoRA merged. Save it "
                "(BlspModel.from_pretrained(dir).llm.save_pretrained(OUT) plus the tokenizer) and pass --vllm-llm OUT"
            )
        llm = str(resolve(model.config.llm, "llm"))
    dtype = dtype or model.llm.dtype
    kwargs: dict[str, Any] = {
        "model": llm,
        "tokenizer": llm,
        "enable_prompt_embeds": True,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": tensor_parallel_size,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


class VllmGenerator:
    """Offline generation: blsp embeds, ``vllm.LLM.generate`` decodes (one call per batch)."""

    def __init__(self, model: Any, kwargs: dict[str, Any] | None = None) -> None:
        """``kwargs``: ``vllm.LLM``'s arguments (:func:`engine_kwargs`; default: for ``model``)."""
        vllm = import_vllm()
        self.model = model
        self.kwargs = kwargs if kwargs is not None else engine_kwargs(model)
        self.dtype = torch_dtype(self.kwargs["dtype"])
        self.seed = self.kwargs["seed"]
        self.llm = vllm.LLM(**self.kwargs)
        self._sampling = vllm.SamplingParams

    def generate(
        self, examples: Sequence[PreparedExample], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[GenerationResult]:
        params = per_row(params, len(examples))
        reqs = build_requests(self.model, examples, params, dtype=self.dtype, seed=self.seed)
        if not reqs:
            return []
        outs = self.llm.generate(
            [r.prompt for r in reqs], [self._sampling(**r.sampling) for r in reqs], use_tqdm=False
        )
        stops = self.model.prompt.stop_token_ids
        return [
            result_from_completion(o.outputs[0], p, stops, r.prompt_tokens, self.model.tokenizer)
            for o, p, r in zip(outs, params, reqs, strict=True)
        ]

    def generate_prepared(
        self,
        model: Any,
        examples: Sequence[PreparedExample],
        params: GenerationParams | Sequence[GenerationParams],
        *,
        sinks: Sequence[Callable[[str], None] | None] | None = None,
        cancels: Any = None,
        streamer: Any = None,
    ) -> list[GenerationResult]:
        """``blsp.models.generation_blsp.generate``'s signature (streamed rows get one piece)."""
        results = self.generate(examples, params)
        for i, r in enumerate(results):
            if sinks is not None and sinks[i] is not None and r.text:
                sinks[i](r.text)
        return results


# --------------------------------------------------------------------------- serving
def _async_engine(kwargs: dict[str, Any]) -> Any:
    vllm = import_vllm()
    args = vllm.AsyncEngineArgs(**kwargs)
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:  # older layouts
        from vllm import AsyncLLMEngine as AsyncLLM
    return AsyncLLM.from_engine_args(args)


def vllm_engine_class() -> type:
    """:class:`VllmEngine`, built on the server's ``BatchEngine`` (imported on first use)."""
    from blsp.serving.engine import BatchEngine, EngineUnavailable, Job, fail_jobs

    class _VllmEngine(BatchEngine):
        """The server's engine with vLLM decoding: the worker thread prepares and embeds requests
        (``BlspModel.embed``); an asyncio loop thread hands each to vLLM's ``AsyncLLM``, which
        batches them continuously. Streamed rows get their text as vLLM produces it; a cancelled
        row is aborted in vLLM."""

        batching = "vllm"

        def __init__(self, pipeline: Any, vllm_kwargs: dict[str, Any], **kwargs: Any) -> None:
            super().__init__(pipeline, **kwargs)
            self.vllm_kwargs = vllm_kwargs
            self.dtype = torch_dtype(vllm_kwargs["dtype"])
            self.seed = vllm_kwargs.get("seed")
            self._aloop: asyncio.AbstractEventLoop | None = None
            self._athread: threading.Thread | None = None
            self._llm: Any = None
            self._sampling: Any = None
            self._ids = itertools.count()
            self._inflight: dict[int, Job] = {}

        def start(self) -> None:
            if self._athread is None:
                ready = threading.Event()
                failure: list[BaseException] = []

                def run() -> None:
                    loop = asyncio.new_event_loop()
                    asyncio.set_event_loop(loop)
                    try:
                        self._llm = _async_engine(self.vllm_kwargs)
                        self._sampling = import_vllm().SamplingParams
                    except BaseException as e:  # reported to start()
                        failure.append(e)
                        ready.set()
                        return
                    self._aloop = loop
                    ready.set()
                    loop.run_forever()

                self._athread = threading.Thread(target=run, name="blsp-vllm", daemon=True)
                self._athread.start()
                ready.wait()
                if failure:
                    raise failure[0]
            super().start()

        def stop(self, timeout: float = 10.0) -> None:
            super().stop(timeout)
            for job in list(self._inflight.values()):
                job.fail(EngineUnavailable("the server is shutting down"))
            if self._aloop is not None:
                if self._llm is not None and hasattr(self._llm, "shutdown"):
                    with contextlib.suppress(Exception):
                        self._llm.shutdown()
                self._aloop.call_soon_threadsafe(self._aloop.stop)
            if self._athread is not None:
                self._athread.join(timeout)
            self._athread = self._aloop = None

        def stats(self) -> dict[str, Any]:
            return {**super().stats(), "batching": self.batching, "in_vllm": len(self._inflight)}

        def _run_batch(self, batch: list[Job]) -> None:
            live = [j for j in batch if not j.cancel.is_set()]
            self.jobs_cancelled += len(batch) - len(live)
            jobs = [j for j in live if self._prepare(j)]
            if not jobs:
                return
            self.batch_sizes[len(jobs)] += 1
            try:
                reqs = build_requests(
                    self.model,
                    [j.prepared for j in jobs],  # type: ignore[misc]
                    [j.params for j in jobs],
                    dtype=self.dtype,
                    seed=self.seed,
                )
            except Exception as e:
                fail_jobs(jobs, e, "embedding")
                return
            for job, req in zip(jobs, reqs, strict=True):
                key = next(self._ids)
                self._inflight[key] = job
                asyncio.run_coroutine_threadsafe(self._decode(key, job, req), self._aloop)  # type: ignore[arg-type]

        async def _decode(self, key: int, job: Job, req: VllmRequest) -> None:
            rid = f"blsp-{key}"
            stops = self.model.prompt.stop_token_ids
            stream = StreamTextFilter(job.params.stop) if job.stream else None
            last = None
            try:
                async for out in self._llm.generate(
                    prompt=req.prompt, sampling_params=self._sampling(**req.sampling), request_id=rid
                ):
                    last = out.outputs[0]
                    if job.cancel.is_set():
                        await self._llm.abort(rid)
                        break
                    if stream is not None and (delta := stream.feed(last.text or "")):
                        job.emit("delta", delta)
                if last is None:
                    raise BlspError("vLLM returned no output")
                result = result_from_completion(
                    last, job.params, stops, req.prompt_tokens, self.model.tokenizer
                )
                if job.cancel.is_set():
                    result.finish_reason = FINISH_CANCELLED
                if stream is not None and (rest := stream.finish(result.text)):
                    job.emit("delta", rest)
                self.jobs_done += 1
                job.resolve(result)
            except Exception as e:
                logger.exception("vLLM request %s failed", rid)
                job.fail(e)
            finally:
                self._inflight.pop(key, None)

    return _VllmEngine


def vllm_engine_factory(vllm_kwargs: dict[str, Any]) -> Any:
    """An ``engine_factory`` for ``create_app``: the server's engine is vLLM's, fed blsp's embeddings."""
    cls = vllm_engine_class()

    def make_engine(pipeline: Any, batching: str = "continuous", **kwargs: Any) -> Any:
        if batching != "continuous":
            logger.info("--batching %s is ignored: vLLM batches continuously", batching)
        return cls(pipeline, vllm_kwargs, **kwargs)

    return make_engine
