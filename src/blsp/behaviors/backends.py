"""Generation backends for BLSP step 1. Each takes prompts as token ids from the shared PromptBuilder.

- ``transformers`` (default): batched ``generate`` with left padding and the KV cache; bf16 on GPU.
- ``vllm``: offline ``vllm.LLM.generate`` on ``TokensPrompt`` inputs (imported only when chosen).
- ``http``: any OpenAI-compatible ``/v1/completions`` endpoint, concurrent requests with retries.
  The prompt is sent as a list of token ids by default (``prompt_format="ids"``): the OpenAI API,
  vLLM and llama.cpp accept ``prompt: [int, ...]``, and it is the only form that guarantees the
  server sees exactly the tokens of the training prompt (the PromptBuilder tokenizes the
  transcript span on its own, so re-tokenizing the rendered text may merge tokens across the span
  boundary). ``prompt_format="text"`` sends the rendered prompt for servers that only take text.

All backends return one :class:`Completion` per prompt, in order; the HTTP backend never raises
for a failing request: it retries, then returns ``finish="error"`` so the job records the line as
failed and goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from blsp.errors import BlspError, ConfigError
from blsp.models.generation_blsp import GenerationParams, decode_prompts

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm", "http")
BATCHING = ("shrink", "static")


BEHAVIOR_TOP_K = 0  # sampling draws from the whole vocabulary, as vLLM and OpenAI-compatible servers do


def behavior_params(
    max_new_tokens: int = 64,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
) -> GenerationParams:
    """The behavior step's ``GenerationParams`` from ``generate``'s flags (greedy unless ``do_sample``
    or ``temperature > 0``; see :meth:`GenerationParams.from_flags`).

    Sampling uses ``top_k=BEHAVIOR_TOP_K`` so that every backend samples from the same distribution.
    The loop guard is off: the vLLM and HTTP backends cannot apply it, and step 1's answers must not
    depend on the backend (its filters drop degenerate answers instead).
    """
    return GenerationParams.from_flags(
        do_sample=do_sample,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        top_p=top_p,
        top_k=BEHAVIOR_TOP_K,
        seed=seed,
        loop_guard=False,
    )


@dataclass
class Completion:
    """One generated response: ``finish`` is ``stop`` (end-of-turn), ``length`` (cut at the limit) or ``error``."""

    text: str
    finish: str
    tokens: int = 0
    error: str | None = None


class Backend(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[list[int]], settings: GenerationParams, seed: int | None = None
    ) -> list[Completion]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------- transformers


class TransformersBackend:
    """Batched generation with a transformers causal LM on token-id prompts (left padding, KV cache).

    Through ``blsp.models.generation_blsp.decode_prompts``: both modes stop on the PromptBuilder's
    stop tokens and decode greedily unless sampling, with the same greedy answers:

    - ``batching="shrink"`` (default): the shared-prefix fast path (``decode_shrinking``): the
      prompts' shared head (system prompt, instruction) is prefilled once, and each finished
      sequence leaves the batch and its KV cache at once.
    - ``batching="static"``: one ``generate`` call per batch; every row runs until the batch's
      longest response ends (what the original BLSP script does).
    """

    name = "transformers"

    def __init__(
        self, model: Any, tokenizer: Any, stop_token_ids: Sequence[int], batching: str = "shrink"
    ) -> None:
        if batching not in BATCHING:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING)}, not {batching!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batching = batching
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.stop_token_ids[0])

    def generate(
        self, prompts: Sequence[list[int]], settings: GenerationParams, seed: int | None = None
    ) -> list[Completion]:
        import torch

        if not prompts:
            return []
        if settings.do_sample and seed is not None:
            torch.manual_seed(seed)
        results = decode_prompts(
            self.model,
            self.tokenizer,
            self.stop_token_ids,
            prompts,
            settings,
            shrink=self.batching == "shrink",
            pad_token_id=self.pad_token_id,
        )
        return [Completion(r.text, r.finish_reason, r.completion_tokens) for r in results]

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ vllm


class VllmBackend:
    """Offline vLLM (``LLM.generate`` on token-id prompts). Requires ``pip install vllm`` and a GPU."""

    name = "vllm"

    def __init__(self, llm: Any, stop_token_ids: Sequence[int]) -> None:
        self.llm = llm
        self.stop_token_ids = [int(t) for t in stop_token_ids]

    @classmethod
    def load(cls, ref: str, stop_token_ids: Sequence[int], dtype: str = "auto", **engine_kwargs: Any):
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise BlspError(
                "--backend vllm does not run under torchrun (vLLM sets up its own distributed workers); "
                "start one process per GPU instead: CUDA_VISIBLE_DEVICES=I blsp behave ... --backend vllm "
                "--num-shards N --shard-index I"
            )
        try:
            from vllm import LLM
        except ImportError as e:
            raise BlspError(
                "--backend vllm needs the vllm package (pip install vllm; Linux with a CUDA GPU). "
                "Use --backend transformers, or serve the model with `vllm serve` and use --backend http."
            ) from e
        from blsp.models.hub import resolve

        folder = resolve(ref, "llm")  # an ordinary HF folder (GGUF and aliases are converted and cached)
        from blsp.utils.torch import torch_dtype

        resolved = torch_dtype(dtype)
        vdtype = "auto" if resolved is None else str(resolved).removeprefix("torch.")
        llm = LLM(model=str(folder), tokenizer=str(folder), dtype=vdtype, **engine_kwargs)
        return cls(llm, stop_token_ids)

    def sampling_params(self, settings: GenerationParams, seed: int | None) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=settings.temperature if settings.do_sample else 0.0,  # 0 = greedy in vLLM
            top_p=settings.top_p if settings.do_sample else 1.0,
            seed=seed if settings.do_sample else None,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=True,
        )

    def generate(
        self, prompts: Sequence[list[int]], settings: GenerationParams, seed: int | None = None
    ) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(inputs, self.sampling_params(settings, seed), use_tqdm=False)
        results = []
        stops = set(self.stop_token_ids)
        for out in outputs:  # vLLM returns outputs in the order of the inputs
            c = out.outputs[0]
            ids = list(c.token_ids)
            if ids and ids[-1] in stops:  # the stop token ends the turn; it is not part of the response
                ids.pop()
            finish = "length" if c.finish_reason == "length" else "stop"
            results.append(Completion(c.text.strip(), finish, len(ids)))
        return results

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ http


def completions_url(endpoint: str) -> str:
    """``http://host:8000``, ``.../v1`` or ``.../v1/completions`` -> the completions URL."""
    url = endpoint.rstrip("/")
    if url.endswith("/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/completions"
    return url + "/v1/completions"


_RETRY_STATUS = {408, 409, 425, 429}


class HttpBackend:
    """OpenAI-compatible ``/v1/completions`` client: concurrent requests, retries with backoff.

    Args:
        endpoint: server base URL (``http://host:8000``, ``.../v1`` or the full completions URL).
        model: the model name the server knows.
        tokenizer: decodes token ids to text for ``prompt_format="text"``.
        concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: extra attempts after a timeout, a connection error, HTTP 408/409/425/429 or 5xx.
        backoff: first retry delay in seconds; doubled at each retry (with 0-25% jitter).
        prompt_format: ``ids`` (token ids, exact) or ``text`` (the rendered prompt).
        api_key: sent as ``Authorization: Bearer``.
        extra_body: extra JSON fields merged into every request (e.g. vLLM's ``stop_token_ids``).
    """

    name = "http"

    def __init__(
        self,
        endpoint: str,
        model: str,
        tokenizer: Any = None,
        *,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        prompt_format: str = "ids",
        api_key: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError as e:  # pragma: no cover - httpx comes with the serve extra
            raise BlspError("--backend http needs httpx (pip install httpx)") from e
        if prompt_format not in ("ids", "text"):
            raise ConfigError(f"prompt format must be 'ids' or 'text', not {prompt_format!r}")
        if prompt_format == "text" and tokenizer is None:
            raise ConfigError("prompt format 'text' needs the tokenizer to render the prompt")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, not {concurrency}")
        self.url = completions_url(endpoint)
        self.model = model
        self.tokenizer = tokenizer
        self.concurrency = concurrency
        self.retries = max(0, retries)
        self.backoff = backoff
        self.prompt_format = prompt_format
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._httpx = httpx
        self.client = httpx.Client(timeout=timeout, headers=headers, limits=limits)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="blsp-http")

    def request_body(self, prompt: list[int], settings: GenerationParams, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(prompt)
            if self.prompt_format == "ids"
            else self.tokenizer.decode(prompt, skip_special_tokens=False),
            "max_tokens": settings.max_new_tokens,
            "n": 1,
            "stream": False,
        }
        if settings.do_sample:
            body.update(temperature=settings.temperature, top_p=settings.top_p)
            if seed is not None:
                body["seed"] = seed
        else:
            body.update(temperature=0.0, top_p=1.0)
        body.update(self.extra_body)
        return body

    def _delay(self, attempt: int, response: Any = None) -> float:
        delay = self.backoff * (2**attempt) * (1 + 0.25 * random.random())
        if response is not None:  # honour a short Retry-After
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(response.headers.get("retry-after", 0)), 60.0))
        return delay

    def _one(self, body: dict[str, Any]) -> Completion:
        httpx = self._httpx
        error = "no attempt made"
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TimeoutException as e:
                error = f"timeout ({type(e).__name__})"
            except httpx.TransportError as e:
                error = f"connection error ({type(e).__name__}: {e})"
            else:
                if response.status_code == 200:
                    try:
                        choice = response.json()["choices"][0]
                        text = choice.get("text")
                        if not isinstance(text, str):
                            raise TypeError("choices[0].text is not a string")
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        error = f"malformed response ({type(e).__name__}: {e}): {response.text[:200]!r}"
                    else:
                        finish = "length" if choice.get("finish_reason") == "length" else "stop"
                        usage = (response.json().get("usage") or {}).get("completion_tokens") or 0
                        return Completion(text.strip(), finish, int(usage))
                else:
                    error = f"HTTP {response.status_code}: {response.text[:200]!r}"
                    if response.status_code < 500 and response.status_code not in _RETRY_STATUS:
                        break  # a client error (bad model name, bad request): retrying will not help
            if attempt < self.retries:
                delay = self._delay(attempt, response)
                log.debug(
                    "request failed (%s); retry %d/%d in %.1f s", error, attempt + 1, self.retries, delay
                )
                time.sleep(delay)
        return Completion("", "error", 0, error)

    def generate(
        self, prompts: Sequence[list[int]], settings: GenerationParams, seed: int | None = None
    ) -> list[Completion]:
        bodies = [
            self.request_body(p, settings, None if seed is None else (seed + i) % 2**31)
            for i, p in enumerate(prompts)
        ]
        return list(self.pool.map(self._one, bodies))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


def parse_extra_body(text: str | None) -> dict[str, Any]:
    """``--extra-body`` JSON object -> dict (a user error names what is wrong)."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--extra-body is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ConfigError("--extra-body must be a JSON object")
    return obj
