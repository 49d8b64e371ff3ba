"""BLSP step 1: ask the LLM to respond to ``instruction + transcript`` for every line of a manifest.

Longer than 500 lines because BehaviorJob (resume, prompt-length batching, filtering, sidecars,
summary) is one stateful job; its inputs are in blsp.behaviors.inputs, its backends in
blsp.behaviors.backends.

The prompt is built by the same ``PromptBuilder`` as the training prompt (text path of
``make_conversation(instruction, transcript=text)``), so step 1 and step 2 cannot drift apart;
every output line carries ``prompt_sha1`` (:func:`prompt_fingerprint` of the prompt token ids) so
a later step can check that its text-path prompt is the one the response was generated from.

Output (``OUT.jsonl``, one line per kept response, appended per finished batch)::

    {"id", "audio", "text", ["duration", "speaker", "lang"], "behavior", "instruction", "response",
     "flags", "prompt_tokens", "prompt_sha1", "response_tokens", "generation": {...settings}}

Sidecars next to it: ``OUT.rejected.jsonl`` (filtered responses and skipped inputs, with
``reason``), ``OUT.failed.jsonl`` (backend errors; retried by a rerun) and ``OUT.summary.json``.
A rerun skips ids already kept or rejected, so a killed job loses at most the batch in flight and
never writes a line twice. With ``num_shards > 1`` (or under ``torchrun``) the output goes to
``OUT.shard-IIIII-of-NNNNN.jsonl``; ``blsp behave merge`` joins the shards.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blsp.behaviors.backends import Backend, Completion, behavior_params
from blsp.behaviors.filters import EMPTY_TRANSCRIPT, TOO_LONG, judge
from blsp.behaviors.inputs import (
    Item,
    Manifest,
    in_shard,
    read_inputs,
    resolve_behavior,
    shard_path,
    shard_spec,
    sidecar,
)
from blsp.errors import BlspError, ConfigError
from blsp.models.generation_blsp import GenerationParams
from blsp.models.hub import DEFAULT_LLM
from blsp.models.prompt import PromptBuilder, prompt_fingerprint
from blsp.utils.io import JsonlAppender, atomic_write_json, iter_jsonl

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = {"transformers": 32, "vllm": 512, "http": 64}
# Generation settings that may change between runs appending to one output (same prompt tokens,
# same decoding; only how they are computed differs).
VOLATILE_SETTINGS = frozenset({"backend", "batching", "served_model", "prompt_format"})


# --------------------------------------------------------------------------------------- prompts


def text_prompt(builder: Any, instruction: str, transcript: str) -> list[int]:
    """Token ids of the training-time text path for ``(instruction, transcript)``."""
    from blsp.models.prompt import make_conversation

    return builder.text_prompt(make_conversation(instruction, transcript=transcript))


def load_config(path: str | Path | None, model: str | None, prompt_template: str | None) -> Any:
    """A ``BlspConfig`` from ``--config`` (BLSP model folder or config.json) with overrides."""
    from blsp.models.configuration_blsp import BlspConfig

    if path:
        p = Path(path)
        try:
            config = BlspConfig.from_pretrained(str(p)) if p.is_dir() else BlspConfig.from_json_file(str(p))
        except Exception as e:
            raise ConfigError(f"{p}: cannot read a BLSP config ({type(e).__name__}: {e})") from e
    else:
        config = BlspConfig(llm=model or DEFAULT_LLM)
    if model:
        config.llm = model
    if prompt_template:
        config.prompt_template = prompt_template
    return config


def load_tokenizer(ref: str) -> Any:
    """The LLM's tokenizer only (resolves aliases/GGUF through ``blsp.models.hub``; no weights loaded)."""
    from transformers import AutoTokenizer

    from blsp.models.hub import ensure_pad_token, resolve

    folder = resolve(ref, "llm")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise BlspError(f"{folder}: cannot load the tokenizer ({e})") from e
    ensure_pad_token(tokenizer)
    return tokenizer


# ------------------------------------------------------------------------------------------- job


@dataclass
class BehaveOptions:
    """Everything ``blsp behave`` needs (see the CLI for the meaning of each)."""

    manifest: Path
    out: Path
    behavior: str = "continuation"
    name: str | None = None
    text_field: str = "text"
    model: str | None = None
    config: str | None = None
    prompt_template: str | None = None
    backend: str = "transformers"
    batching: str = "shrink"  # transformers backend: shrink (drop finished rows) or static (model.generate)
    batch_size: int | None = None
    settings: GenerationParams = field(default_factory=behavior_params)
    max_prompt_tokens: int = 192
    echo: str | None = None  # drop | flag (default: drop for continuation, flag for free instructions)
    num_shards: int | None = None
    shard_index: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None
    # http
    endpoint: str | None = None
    served_model: str | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    prompt_format: str = "ids"
    extra_body: dict[str, Any] = field(default_factory=dict)


def _batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _batch_seed(seed: int | None, first_id: str) -> int | None:
    """Per-batch seed: a resumed run samples its batches like the uninterrupted run would."""
    if seed is None:
        return None
    return (seed + zlib.crc32(first_id.encode())) % 2**31


class BehaviorJob:
    """One ``blsp behave`` run over one shard. ``run()`` returns the summary dict.

    ``llm=(model, tokenizer)`` reuses an already loaded LLM for the transformers backend;
    ``backend=`` injects any :class:`~blsp.behaviors.backends.Backend` (with ``tokenizer=``).
    """

    def __init__(
        self,
        opts: BehaveOptions,
        *,
        llm: tuple[Any, Any] | None = None,
        backend: Backend | None = None,
        tokenizer: Any = None,
    ) -> None:
        if opts.backend not in ("transformers", "vllm", "http"):
            raise ConfigError(f"--backend must be transformers, vllm or http, not {opts.backend!r}")
        if opts.max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens must be >= 1, not {opts.max_prompt_tokens}")
        self.opts = opts
        self.behavior = resolve_behavior(opts.behavior, opts.name)
        if opts.backend == "http" and not opts.endpoint and backend is None and self.behavior.generate:
            raise ConfigError("--backend http needs --endpoint URL")
        self.echo = opts.echo or ("drop" if self.behavior.name == "continuation" else "flag")
        if self.echo not in ("drop", "flag"):
            raise ConfigError(f"--echo must be drop or flag, not {self.echo!r}")
        self.num_shards, self.shard_index = shard_spec(opts.num_shards, opts.shard_index)
        self.out = shard_path(opts.out, self.shard_index, self.num_shards)
        self.batch_size = opts.batch_size or DEFAULT_BATCH_SIZE[opts.backend]
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, not {self.batch_size}")
        self.config = load_config(opts.config, opts.model, opts.prompt_template)
        self._llm = llm
        self._backend = backend
        self._owns_backend = backend is None  # close only what this job opened
        self._tokenizer = tokenizer if tokenizer is not None else (llm[1] if llm else None)
        self.builder: Any = None
        self._record: dict[str, Any] = {}

    # ----------------------------------------------------------------- settings record
    def generation_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "backend": self.opts.backend if self.behavior.generate else "copy",
            "model": self.config.llm,
            "prompt_template": self.config.prompt_template,
            "chat_template": bool(self.builder.use_chat) if self.builder is not None else None,
            "instruction_separator": self.config.instruction_separator,
            "system_prompt": self.config.system_prompt,
            "max_prompt_tokens": self.opts.max_prompt_tokens,
        }
        if self.behavior.generate:
            rec.update(self.opts.settings.record())
            if self.opts.backend == "transformers":
                rec["batching"] = self.opts.batching
            if self.opts.backend == "http":
                rec["served_model"] = self.opts.served_model or self.config.llm
                rec["prompt_format"] = self.opts.prompt_format
        return rec

    def _check_compatible(self, record: dict[str, Any]) -> None:
        """Refuse to append to an output written with another behavior or other settings."""
        for path in (self.out, sidecar(self.out, "rejected.jsonl")):
            if not path.is_file():
                continue
            for lineno, obj, _ in iter_jsonl(path):
                if obj is None or "generation" not in obj:
                    continue
                old = {k: v for k, v in obj["generation"].items() if k not in VOLATILE_SETTINGS}
                new = {k: v for k, v in record.items() if k not in VOLATILE_SETTINGS}
                diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
                if obj.get("behavior") != self.behavior.name:
                    diff.insert(0, "behavior")
                if obj.get("instruction") != self.behavior.instruction:
                    diff.insert(0, "instruction")
                if diff:
                    was = ", ".join(f"{k}={obj.get(k, obj['generation'].get(k))!r}" for k in diff)
                    raise ConfigError(
                        f"{path}:{lineno}: this output was written with other settings ({was}); "
                        "use another output file or delete it"
                    )
                return

    # ----------------------------------------------------------------- loading
    def _ensure_tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.opts.backend == "transformers" and self.behavior.generate:
                self._load_transformers()
            else:
                self._tokenizer = load_tokenizer(self.opts.tokenizer or self.config.llm)
        return self._tokenizer

    def _load_transformers(self) -> None:
        from blsp.models.hub import load_llm
        from blsp.utils.torch import auto_dtype, resolve_device, torch_dtype

        device = str(resolve_device(self.opts.device))
        t0 = time.perf_counter()
        dtype = torch_dtype(self.opts.dtype) or auto_dtype(device)
        model, tokenizer = load_llm(self.config.llm, dtype=dtype)
        model.to(device)
        log.info(
            "loaded %s on %s (%s) in %.1f s", self.config.llm, device, model.dtype, time.perf_counter() - t0
        )
        self._llm = (model, tokenizer)
        self._tokenizer = tokenizer

    def _make_backend(self) -> Backend:
        if self._backend is not None:
            return self._backend
        from blsp.behaviors.backends import HttpBackend, TransformersBackend, VllmBackend

        stops = self.builder.stop_token_ids
        o = self.opts
        if o.backend == "transformers":
            if self._llm is None:
                self._load_transformers()
            model, tokenizer = self._llm  # type: ignore[misc]
            self._backend = TransformersBackend(model, tokenizer, stops, batching=o.batching)
        elif o.backend == "vllm":
            self._backend = VllmBackend.load(self.config.llm, stops, dtype=o.dtype, seed=o.settings.seed or 0)
        else:
            self._backend = HttpBackend(
                o.endpoint or "",
                o.served_model or self.config.llm,
                self._tokenizer,
                concurrency=o.concurrency,
                timeout=o.timeout,
                retries=o.retries,
                backoff=o.backoff,
                prompt_format=o.prompt_format,
                api_key=o.api_key,
                extra_body=o.extra_body,
            )
        return self._backend

    # ----------------------------------------------------------------- rows
    def _row(
        self, item: Item, prompt: list[int], response: str, flags: list[str], tokens: int
    ) -> dict[str, Any]:
        row: dict[str, Any] = {"id": item.id}
        if item.audio is not None:
            row["audio"] = item.audio
        row["text"] = item.text
        row.update(item.extra)
        row.update(
            behavior=self.behavior.name,
            instruction=self.behavior.instruction,
            response=response,
            flags=flags,
            prompt_tokens=len(prompt),
            prompt_sha1=prompt_fingerprint(prompt),
            response_tokens=tokens,
            generation=self._record,
        )
        return row

    def _reject(self, item: Item, reason: str, **more: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"id": item.id, "reason": reason, "text": item.text}
        if item.audio is not None:
            row["audio"] = item.audio
        row.update(behavior=self.behavior.name, instruction=self.behavior.instruction, **more)
        row["generation"] = self._record
        return row

    # ----------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        o = self.opts
        manifest = read_inputs(o.manifest, o.text_field, out_dir=self.out.parent)
        for p in manifest.problems[:5]:
            log.warning("skipped %s", p)
        items = [it for it in manifest.items if in_shard(it, self.num_shards, self.shard_index)]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        failed_path = sidecar(self.out, "failed.jsonl")
        stats: dict[str, Any] = {"generated": 0, "seconds": 0.0}
        try:
            self._run_shard(items, failed_path, stats)
        finally:
            if self._backend is not None and self._owns_backend:
                self._backend.close()
        summary = self.summarize(manifest, items, stats)
        atomic_write_json(sidecar(self.out, "summary.json"), summary)
        return summary

    def _run_shard(self, items: list[Item], failed_path: Path, stats: dict[str, Any]) -> None:
        o = self.opts
        with (
            JsonlAppender(self.out) as kept,
            JsonlAppender(sidecar(self.out, "rejected.jsonl")) as rejected,
        ):
            todo = [it for it in items if it.id not in kept.done and it.id not in rejected.done]
            if o.limit is not None:
                todo = todo[: o.limit]
            log.info(
                "%s: %d items in shard %d/%d, %d already done, %d to do",
                self.out, len(items), self.shard_index, self.num_shards, len(items) - len(todo), len(todo),
            )  # fmt: skip
            if todo:
                self.builder = PromptBuilder.from_config(self._ensure_tokenizer(), self.config)
                self._record = self.generation_record()
                self._check_compatible(self._record)
                self._process(todo, kept, rejected, failed_path, stats)

    def _process(
        self,
        todo: list[Item],
        kept: JsonlAppender,
        rejected: JsonlAppender,
        failed_path: Path,
        stats: dict[str, Any],
    ) -> None:
        o = self.opts
        ready: list[tuple[Item, list[int]]] = []
        skipped: list[dict[str, Any]] = []
        for it in todo:
            if not it.text.strip():
                skipped.append(self._reject(it, EMPTY_TRANSCRIPT))
                continue
            prompt = text_prompt(self.builder, self.behavior.instruction, it.text)
            if len(prompt) > o.max_prompt_tokens:
                skipped.append(self._reject(it, TOO_LONG, prompt_tokens=len(prompt)))
                continue
            ready.append((it, prompt))
        rejected.append(skipped)
        if not ready:
            return
        if not self.behavior.generate:  # repetition: the response is the transcript itself
            for batch in _batches(ready, 1024):
                kept.append(
                    [
                        self._row(it, p, it.text, [], len(self.builder.response_ids(it.text)) - 1)
                        for it, p in batch
                    ]
                )
            return

        backend = self._make_backend()
        # Greedy decoding answers a prompt one way: a transcript spoken by several voices is
        # generated once, and its response is given to every clip of it.
        groups: dict[Any, list[tuple[Item, list[int]]]] = {}
        for it, prompt in ready:
            groups.setdefault(it.ordinal if o.settings.do_sample else tuple(prompt), []).append((it, prompt))
        # Longest prompts first: batches of similar lengths (little padding), and memory errors show early.
        unique = sorted(groups.values(), key=lambda g: (-len(g[0][1]), g[0][0].ordinal))
        failed: JsonlAppender | None = None
        progress = _progress(len(ready), f"behave {self.behavior.name}")
        try:
            for chunk in _batches(unique, self.batch_size):
                t0 = time.perf_counter()
                seed = _batch_seed(o.settings.seed, chunk[0][0][0].id) if o.settings.do_sample else None
                answers = backend.generate([g[0][1] for g in chunk], o.settings, seed)
                stats["seconds"] += time.perf_counter() - t0
                if len(answers) != len(chunk):
                    raise RuntimeError(
                        f"backend returned {len(answers)} completions for {len(chunk)} prompts"
                    )
                batch = [m for g in chunk for m in g]
                completions = [c for g, c in zip(chunk, answers, strict=True) for _ in g]
                good, bad, errors = self._judge_batch(batch, completions)
                stats["generated"] += len(batch) - len(errors)
                kept.append(good)
                rejected.append(bad)
                if errors:
                    failed = failed or JsonlAppender(failed_path)
                    failed.append(errors)
                progress.update(len(batch))
        finally:
            progress.close()
            if failed is not None:
                failed.close()

    def _judge_batch(
        self, batch: Sequence[tuple[Item, list[int]]], completions: list[Completion]
    ) -> tuple[list[dict], list[dict], list[dict]]:
        if len(completions) != len(batch):
            raise RuntimeError(f"backend returned {len(completions)} completions for {len(batch)} prompts")
        good, bad, errors = [], [], []
        for (it, prompt), c in zip(batch, completions, strict=True):
            if c.finish == "error":
                errors.append({"id": it.id, "error": c.error, "text": it.text, "time": time.time()})
                continue
            verdict = judge(c.text, it.text, truncated=c.finish == "length", echo=self.echo)
            if verdict.reject:
                bad.append(
                    self._reject(
                        it,
                        verdict.reject,
                        response=c.text,
                        response_tokens=c.tokens,
                        prompt_tokens=len(prompt),
                        prompt_sha1=prompt_fingerprint(prompt),
                    )
                )
            else:
                good.append(self._row(it, prompt, c.text, verdict.flags, c.tokens))
        return good, bad, errors

    # ----------------------------------------------------------------- summary
    def summarize(self, manifest: Manifest, items: list[Item], stats: dict[str, Any]) -> dict[str, Any]:
        shard_ids = {it.id for it in items}
        kept_ids: set[str] = set()
        flags: Counter = Counter()
        for _, obj, _ in iter_jsonl(self.out) if self.out.is_file() else []:
            if obj is None or "id" not in obj:
                continue
            kept_ids.add(str(obj["id"]))
            flags.update(obj.get("flags") or [])
        reasons: Counter = Counter()
        rejected_ids: set[str] = set()
        rpath = sidecar(self.out, "rejected.jsonl")
        for _, obj, _ in iter_jsonl(rpath) if rpath.is_file() else []:
            if obj is not None and "id" in obj and str(obj["id"]) not in kept_ids:
                rejected_ids.add(str(obj["id"]))
                reasons[obj.get("reason", "?")] += 1
        failed_ids: set[str] = set()
        fpath = sidecar(self.out, "failed.jsonl")
        for _, obj, _ in iter_jsonl(fpath) if fpath.is_file() else []:
            if obj is not None and "id" in obj:
                failed_ids.add(str(obj["id"]))
        failed_ids -= kept_ids | rejected_ids
        judged = len(kept_ids) + sum(v for k, v in reasons.items() if k not in (EMPTY_TRANSCRIPT, TOO_LONG))
        echoes = reasons.get("echo", 0) + flags.get("echo", 0)
        seconds = stats["seconds"]
        return {
            "output": str(self.out),
            "manifest": str(manifest.path),
            "behavior": self.behavior.name,
            "instruction": self.behavior.instruction,
            "shard": {"index": self.shard_index, "count": self.num_shards},
            "echo_policy": self.echo if self.behavior.generate else None,
            "input": {
                "lines": manifest.lines,
                "valid": len(manifest.items),
                "in_shard": len(items),
                "skipped": dict(manifest.skipped),
            },
            "kept": len(kept_ids),
            "flags": dict(flags),
            "rejected": dict(reasons),
            "failed": len(failed_ids),
            "remaining": len(shard_ids - kept_ids - rejected_ids - failed_ids),
            "echo_rate": round(echoes / judged, 4) if judged and self.behavior.generate else None,
            "this_run": {
                "generated": stats["generated"],
                "seconds": round(seconds, 2),
                "responses_per_s": round(stats["generated"] / seconds, 3) if seconds > 0 else None,
            },
        }


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="resp", disable=None, dynamic_ncols=True)


def run_behave(opts: BehaveOptions, **kwargs: Any) -> dict[str, Any]:
    """Run BLSP step 1 as described by ``opts``; returns the summary (also written to ``OUT.summary.json``)."""
    return BehaviorJob(opts, **kwargs).run()
