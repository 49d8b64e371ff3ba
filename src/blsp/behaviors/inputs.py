"""What a behavior job reads and where it writes: behaviors, the input manifest, shards and sidecars."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blsp.data.manifest import iter_manifest, relocate_audio
from blsp.errors import BlspError, ConfigError
from blsp.instructions import CONTINUATION, REPETITION

EXTRA_FIELDS = ("duration", "speaker", "lang")


# ------------------------------------------------------------------------------------ behaviors


@dataclass(frozen=True)
class Behavior:
    """A behavior: its label, its instruction, and whether the LLM generates (repetition copies)."""

    name: str
    instruction: str
    generate: bool = True


def resolve_behavior(value: str, name: str | None = None) -> Behavior:
    """``continuation``, ``repetition`` (paper Table 1, verbatim) or a free instruction (a sentence)."""
    value = value.strip()
    if value == "continuation":
        return Behavior(name or "continuation", CONTINUATION)
    if value == "repetition":
        return Behavior(name or "repetition", REPETITION, generate=False)
    if not value:
        raise ConfigError("--behavior is empty; use continuation, repetition or an instruction sentence")
    if " " not in value:
        raise ConfigError(
            f"unknown behavior {value!r}: use continuation, repetition, or a free instruction sentence "
            '(e.g. --behavior "Summarize the following text in one sentence.")'
        )
    return Behavior(name or "custom", value)


# ------------------------------------------------------------------------------------- manifest


@dataclass
class Item:
    """One manifest line to process."""

    id: str
    text: str
    ordinal: int  # index among the manifest's non-blank lines: the sharding key
    lineno: int
    audio: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """Valid items of a manifest and the counts of lines that were skipped (with a few examples)."""

    path: Path
    items: list[Item]
    lines: int
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def read_inputs(path: str | Path, text_field: str = "text", out_dir: str | Path | None = None) -> Manifest:
    """Read the input lines of step 1: a manifest (``id``, ``text_field``, optional ``audio``) or a ``.txt``.

    A ``.txt`` manifest is one transcript a line; its ids are ``<file stem>-<line number>``.
    Lines :func:`blsp.data.manifest.iter_manifest` finds defective (malformed, no id, no string
    transcript, a repeated id...) are skipped and counted by their code. ``audio`` references are
    rewritten relative to ``out_dir`` when given (absolute ones are kept).
    """
    path = Path(path)
    if not path.is_file():
        raise BlspError(f"{path}: manifest not found")
    m = Manifest(path, [], 0)
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                m.items.append(Item(f"{path.stem}-{lineno}", raw.strip(), m.lines, lineno))
                m.lines += 1
        return m

    for lineno, obj, _raw, err in iter_manifest(path, required=("id", text_field), text_field=text_field):
        ordinal = m.lines
        m.lines += 1
        if err is not None or obj is None:
            m.skipped[err.code if err is not None else "bad_line"] += 1
            if len(m.problems) < 20:
                m.problems.append(f"{path}:{lineno}: {err}")
            continue
        audio = obj.get("audio")
        if audio and out_dir is not None:
            audio = relocate_audio(str(audio), path.parent, out_dir, mode="keep")
        extra = {k: obj[k] for k in EXTRA_FIELDS if k in obj}
        m.items.append(
            Item(str(obj["id"]), obj[text_field], ordinal, lineno, str(audio) if audio else None, extra)
        )
    return m


# ------------------------------------------------------------------------------------- sharding


def shard_spec(
    num_shards: int | None = None, shard_index: int | None = None, env: Any = None
) -> tuple[int, int]:
    """``(num_shards, shard_index)`` from the arguments, else from torchrun's ``WORLD_SIZE``/``RANK``."""
    env = os.environ if env is None else env
    if num_shards is None and shard_index is None:
        try:
            world, rank = int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0))
        except ValueError as e:
            raise ConfigError(f"WORLD_SIZE/RANK are not integers ({e})") from e
        num_shards, shard_index = world, rank
    num_shards = 1 if num_shards is None else num_shards
    shard_index = 0 if shard_index is None else shard_index
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1, not {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index must be in [0, {num_shards - 1}], not {shard_index}")
    return num_shards, shard_index


def shard_path(out: str | Path, shard_index: int, num_shards: int) -> Path:
    """``OUT.jsonl`` -> ``OUT.shard-00003-of-00008.jsonl`` (unchanged for a single shard)."""
    out = Path(out)
    if num_shards == 1:
        return out
    base, ext = (out.name[:-6], ".jsonl") if out.name.endswith(".jsonl") else (out.name, "")
    return out.with_name(f"{base}.shard-{shard_index:05d}-of-{num_shards:05d}{ext}")


def in_shard(item: Item, num_shards: int, shard_index: int) -> bool:
    return item.ordinal % num_shards == shard_index


def sidecar(out: str | Path, kind: str) -> Path:
    """``OUT.jsonl`` -> ``OUT.<kind>`` (``rejected.jsonl``, ``failed.jsonl``, ``summary.json``)."""
    out = Path(out)
    base = out.name[:-6] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{base}.{kind}")
