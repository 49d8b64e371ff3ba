"""Training data: manifests -> examples -> a deterministic, length-grouped, rank-sharded batch plan.

A training line is a speech manifest item (``id``, ``audio``, ``text``, ``duration``; see
:mod:`blsp.data.manifest`) plus, for behavior data written by ``blsp behaviors``, its
``instruction`` (or ``behavior`` name) and ``response``. Each :class:`~blsp.training.config.SourceConfig`
says how a line becomes an :class:`Example` (behavior, repetition, ASR, a target field, Alpaca).

The :class:`BatchPlan` fixes the order of one epoch from ``(seed, epoch)`` alone: sources are mixed
by weight, shuffled, sorted by length inside mega-batches, cut into global batches (one optimizer
step each) whose order is shuffled again, and each global batch is cut into micro-batches of
similar length dealt round-robin to the ranks. The same global batches therefore come out whatever
the number of processes, and a run resumes at any step without replaying the data.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blsp.errors import BlspError, ConfigError
from blsp.training.config import DataConfig, SourceConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training example: speech (or text only), an instruction and the target response."""

    id: str
    instruction: str
    response: str
    audio: str | None = None  # absolute audio reference (path or path:start:num)
    duration: float = 0.0
    transcript: str | None = None
    source: int = 0
    # fingerprint of the text-path prompt the response was generated from (``blsp behaviors``)
    prompt_sha1: str | None = None

    @property
    def length(self) -> float:
        """A cost estimate used to group similar examples: ~LLM positions of speech + text."""
        return self.duration * 6.25 + (len(self.instruction) + len(self.response)) / 4.0


def shuffled_speech(examples: list[Example]) -> list[Example] | None:
    """The examples with each clip's speech swapped for another clip's (a derangement), targets kept.

    The held-out loss on these against the matched loss measures how much the model uses the speech.
    None when fewer than two examples have speech.
    """
    import dataclasses

    with_audio = [i for i, e in enumerate(examples) if e.audio]
    if len(with_audio) < 2:
        return None
    out = list(examples)
    for k, i in enumerate(with_audio):
        other = examples[with_audio[(k + 1) % len(with_audio)]]
        out[i] = dataclasses.replace(examples[i], audio=other.audio, duration=other.duration)
    return out


def stable_int(*parts: Any) -> int:
    """A hash of ``parts`` that is the same in every process and Python run."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def _transcript(item: dict[str, Any], field: str | None) -> str | None:
    keys = [field] if field else ["transcript", "text"]
    for k in keys:
        v = item.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


def _instruction_for(item: dict[str, Any]) -> str | None:
    from blsp.instructions import BEHAVIORS

    inst = item.get("instruction")
    if isinstance(inst, str) and inst.strip():
        return inst
    beh = item.get("behavior")
    if isinstance(beh, str) and beh in BEHAVIORS:
        return BEHAVIORS[beh]
    return None


def _resolve_target_instruction(text: str) -> str:
    """A Table 11 task name (``asr``, ``st:German``, ``snips``...) becomes its instruction; else literal."""
    from blsp.instructions import TASK_INSTRUCTIONS, task_instruction

    return task_instruction(text) if text.partition(":")[0] in TASK_INSTRUCTIONS else text


def example_from_item(
    item: dict[str, Any], src: SourceConfig, index: int, manifest_dir: Path, seed: int
) -> tuple[Example | None, str | None]:
    """Turn one manifest line into an Example, or ``(None, reason)``."""
    from blsp.instructions import REPETITION, asr_instructions

    ex_id = str(item.get("id", "")).strip()
    if not ex_id:
        return None, "missing field 'id'"
    if src.task == "alpaca":
        inst = item.get("instruction")
        out = item.get("output", item.get("response"))
        if not isinstance(inst, str) or not inst.strip():
            return None, "missing field 'instruction'"
        if not isinstance(out, str) or not out.strip():
            return None, "missing field 'output'"
        extra = item.get("input")
        if isinstance(extra, str) and extra.strip():
            inst = f"{inst.strip()}\n{extra.strip()}"
        return Example(id=ex_id, instruction=inst.strip(), response=out.strip(), source=index), None

    audio = item.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        return None, "missing field 'audio'"
    from blsp.data.manifest import resolve_audio_path

    ref = resolve_audio_path(audio, manifest_dir)
    transcript = _transcript(item, src.transcript_field)
    if src.task == "behavior":
        instruction = _instruction_for(item)
        if instruction is None:
            return None, "no 'instruction' (or known 'behavior') field"
        response = item.get("response")
        if not isinstance(response, str) and item.get("behavior") == "repetition":
            response = transcript
        if not isinstance(response, str) or not response.strip():
            return None, "missing field 'response'"
    elif src.task == "repetition":
        instruction, response = REPETITION, transcript
    elif src.task == "asr":
        choices = asr_instructions()
        instruction, response = choices[stable_int(seed, "asr", ex_id) % len(choices)], transcript
    else:  # target
        instruction = _resolve_target_instruction(src.instruction or "")
        response = item.get(src.target_field)
    if not isinstance(response, str) or not response.strip():
        return None, (f"missing field {src.target_field!r}" if src.task == "target" else "no transcript")
    duration = item.get("duration")
    if not isinstance(duration, int | float) or isinstance(duration, bool):
        from blsp.data.audio import audio_info
        from blsp.errors import AudioError

        try:
            duration = audio_info(ref).duration
        except AudioError as e:
            return None, str(e)
    return (
        Example(
            id=ex_id,
            instruction=instruction,
            response=response.strip(),
            audio=ref,
            duration=float(duration),
            transcript=transcript,
            source=index,
            prompt_sha1=item.get("prompt_sha1") if src.task == "behavior" else None,
        ),
        None,
    )


def _too_long(
    ex: Example, needs_transcript: bool, limit: int, count_tokens: Callable[[str], int]
) -> str | None:
    """Why ``ex``'s response (or the transcript the objective feeds the LLM) is over ``limit`` tokens."""
    texts = [("response", ex.response)]
    if needs_transcript and ex.transcript is not None and ex.transcript != ex.response:
        texts.append(("transcript", ex.transcript))
    for what, text in texts:
        if count_tokens(text) > limit:
            return f"{what} longer than data.max_text_tokens={limit} tokens"
    return None


def load_source(
    src: SourceConfig,
    index: int,
    data_cfg: DataConfig,
    seed: int,
    needs_transcript: bool = False,
    count_tokens: Callable[[str], int] | None = None,
) -> list[Example]:
    """Examples of one manifest; bad lines are skipped and counted, zero usable lines is an error.

    ``count_tokens`` (the LLM tokenizer's length of a text) enables ``data.max_text_tokens``."""
    from blsp.data.manifest import iter_manifest

    path = Path(src.path)
    manifest_dir = path.resolve().parent
    out: list[Example] = []
    skipped: Counter[str] = Counter()
    first_bad: dict[str, int] = {}
    for lineno, obj, _raw, err in iter_manifest(path, required=(), text_field=None):
        reason = None
        ex = None
        if err is not None or obj is None:
            reason = "duplicate id" if err is not None and err.code == "duplicate_id" else str(err)
        else:
            ex, reason = example_from_item(obj, src, index, manifest_dir, seed)
        if ex is not None:
            if ex.audio is not None and not (data_cfg.min_duration <= ex.duration <= data_cfg.max_duration):
                ex, reason = None, f"duration outside [{data_cfg.min_duration}, {data_cfg.max_duration}] s"
            elif needs_transcript and ex.transcript is None:
                ex, reason = None, "no transcript (needed by this objective)"
            elif count_tokens is not None and data_cfg.max_text_tokens is not None:
                reason = _too_long(ex, needs_transcript, data_cfg.max_text_tokens, count_tokens)
                ex = None if reason else ex
        if ex is None:
            skipped[reason or "unusable"] += 1
            first_bad.setdefault(reason or "unusable", lineno)
            continue
        out.append(ex)
        if src.max_examples is not None and len(out) >= src.max_examples:
            break
    if skipped:
        detail = "; ".join(f"{n} x {r} (first on line {first_bad[r]})" for r, n in skipped.most_common())
        log.warning("%s: skipped %d lines: %s", path, sum(skipped.values()), detail)
    if not out:
        detail = "; ".join(f"{n} x {r} (first on line {first_bad[r]})" for r, n in skipped.most_common())
        raise BlspError(
            f"{path}: no usable lines for task {src.task!r}" + (f" ({detail})" if detail else " (empty file)")
        )
    return out


def load_examples(
    sources: list[SourceConfig],
    data_cfg: DataConfig,
    seed: int,
    needs_transcript: bool = False,
    count_tokens: Callable[[str], int] | None = None,
) -> list[list[Example]]:
    """Examples of every source, in source order."""
    return [load_source(s, i, data_cfg, seed, needs_transcript, count_tokens) for i, s in enumerate(sources)]


def data_fingerprint(sources: list[SourceConfig]) -> dict[str, Any]:
    """What a run trains on: each train manifest's content hash (sha256, memoised by size and mtime)
    and source settings, with its resolved path and size for the messages, and ``sha1`` of them all.

    A checkpoint records it so that ``--resume`` notices a changed manifest (a moved or touched
    one with the same content is the same data)."""
    import dataclasses
    import json

    from blsp.models.hub import file_sha256

    items = []
    for src in sources:
        path = Path(src.path)
        if not path.is_file():
            raise BlspError(f"{path}: manifest not found")
        try:
            size, digest = path.stat().st_size, file_sha256(path)
        except OSError as e:
            raise BlspError(f"{path}: cannot read the manifest ({e.strerror or e})") from e
        spec = {k: v for k, v in dataclasses.asdict(src).items() if k != "path"}
        items.append({"path": str(path.resolve()), "size": size, "sha256": digest, "spec": spec})
    keyed = [[it["sha256"], it["spec"]] for it in items]
    return {"sha1": hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest(), "sources": items}


def data_changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the training data ``now`` differs from ``then`` (two :func:`data_fingerprint`s), in words."""
    if then.get("sha1") == now.get("sha1"):
        return []
    old, new = then.get("sources") or [], now.get("sources") or []
    out = []
    if len(old) != len(new):
        out.append(f"{len(old)} train source(s) then, {len(new)} now")
    for i, (a, b) in enumerate(zip(old, new, strict=False)):
        where = f"data.train[{i}] {b.get('path')}"
        if a.get("sha256") != b.get("sha256"):
            was = f"; it was {a.get('path')}" if a.get("path") != b.get("path") else ""
            out.append(f"{where}: content changed ({a.get('size')} bytes then, {b.get('size')} now{was})")
        sa, sb = a.get("spec") or {}, b.get("spec") or {}
        if sa != sb:
            keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
            out.append(f"{where}: settings changed ({', '.join(keys)})")
    return out or ["the training data's fingerprint changed"]


# --------------------------------------------------------------------------- batch plan
class BatchPlan:
    """The deterministic order of training: global batches per epoch, micro-batches per rank.

    ``examples``: one list per source; ``weights``: one per source (None = use every example once
    per epoch). With weights, an epoch holds ``epoch_size`` examples split between the sources in
    proportion to their weights, drawn without replacement (cycling through a reshuffled source when
    it is exhausted).
    """

    def __init__(
        self,
        examples: list[list[Example]],
        weights: list[float | None],
        *,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        group_by_length: bool = True,
        megabatch_factor: int = 50,
        epoch_size: int | None = None,
    ) -> None:
        if global_batch_size % (micro_batch_size * world_size):
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} must be a multiple of "
                f"train.micro_batch_size={micro_batch_size} x {world_size} process(es)"
            )
        self.sources = examples
        self.flat: list[Example] = [e for src in examples for e in src]
        self.offsets = [0]
        for src in examples:
            self.offsets.append(self.offsets[-1] + len(src))
        self.weights = weights
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.accumulation = global_batch_size // (micro_batch_size * world_size)
        self.seed = seed
        self.group_by_length = group_by_length
        self.megabatch_factor = max(1, megabatch_factor)
        mixed = any(w is not None for w in weights)
        self.epoch_size = epoch_size or len(self.flat)
        self.mixed = mixed
        self.steps_per_epoch = self.epoch_size // global_batch_size
        if self.steps_per_epoch < 1:
            raise BlspError(
                f"only {self.epoch_size} training examples: fewer than one global batch "
                f"(train.global_batch_size={global_batch_size}); lower the batch size or add data"
            )
        self._cache: dict[int, list[list[int]]] = {}

    def _epoch_indices(self, epoch: int) -> list[int]:
        rng = random.Random(stable_int(self.seed, "epoch", epoch))
        if not self.mixed:
            order = list(range(len(self.flat)))
            rng.shuffle(order)
            return order
        ws = [w if w is not None else 0.0 for w in self.weights]
        total = sum(ws)
        if total <= 0:
            raise ConfigError("data.train: every source weight is zero")
        counts = [int(self.epoch_size * w / total) for w in ws]
        # hand out the rounding remainder to the largest fractional parts
        rest = self.epoch_size - sum(counts)
        fracs = sorted(range(len(ws)), key=lambda i: -(self.epoch_size * ws[i] / total - counts[i]))
        for i in fracs[:rest]:
            counts[i] += 1
        order: list[int] = []
        for s, n in enumerate(counts):
            size = len(self.sources[s])
            picks: list[int] = []
            cycle = 0
            while len(picks) < n:
                perm = list(range(size))
                random.Random(stable_int(self.seed, "source", s, epoch, cycle)).shuffle(perm)
                picks.extend(perm[: n - len(picks)])
                cycle += 1
            order.extend(self.offsets[s] + i for i in picks)
        rng.shuffle(order)
        return order

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global batches of an epoch (lists of example indices, sorted by length when grouping)."""
        if epoch in self._cache:
            return self._cache[epoch]
        order = self._epoch_indices(epoch)
        g = self.global_batch_size
        order = order[: self.steps_per_epoch * g]  # drop the last partial global batch
        if self.group_by_length:
            mega = max(g, (self.megabatch_factor * self.micro_batch_size) // g * g)
            sorted_order: list[int] = []
            for i in range(0, len(order), mega):
                chunk = order[i : i + mega]
                sorted_order.extend(sorted(chunk, key=lambda k: -self.flat[k].length))
            batches = [sorted_order[i : i + g] for i in range(0, len(sorted_order), g)]
            random.Random(stable_int(self.seed, "batches", epoch)).shuffle(batches)
        else:
            batches = [order[i : i + g] for i in range(0, len(order), g)]
        self._cache = {epoch: batches}
        return batches

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches (``accumulation`` of them) for one optimizer step."""
        batch = self.epoch_batches(epoch)[step_in_epoch]
        m = self.micro_batch_size
        micro = [batch[i : i + m] for i in range(0, len(batch), m)]
        return [micro[j] for j in range(rank, len(micro), self.world_size)]

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, step_in_epoch)`` of global step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)


def shard_eval(examples: list[Example], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Micro-batches (indices into ``examples``) of the held-out set for one rank, length-sorted."""
    order = sorted(range(len(examples)), key=lambda k: -examples[k].length)
    mine = order[rank::world_size]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def total_steps(plan: BatchPlan, epochs: float, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    return max(1, math.floor(epochs * plan.steps_per_epoch))


def worker_init(_worker_id: int) -> None:
    """DataLoader workers read audio and featurise; keep them to one thread each."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
