"""Test sets: built here by TTS with voices held out from training, or loaded from real data.

Built sets (``build_testset``; text from ``blsp/resources/tasks/*.jsonl``, or from the shared
text data with ``source="shared"``), each ``<root>/<name>/test.jsonl``:

=================  ====================================  ===============================
name               text source                           tasks
=================  ====================================  ===============================
``tts-asr-en``     sentences/heldout.txt (not trained on) ``asr``, ``align``, ``content``
``tts-st-en``      st.jsonl: ``en`` with ``de``/``fr``     ``st:de``, ``st:fr``, ``asr``, ``align``
``tts-x2en-de``    x2en.jsonl German sentences, ``en``     ``x2en:de`` (paper Table 5)
``tts-x2en-fr``    x2en.jsonl French sentences, ``en``     ``x2en:fr``
``tts-x2en-zh``    x2en.jsonl Mandarin sentences, ``en``   ``x2en:zh``
``tts-intent``     intent.jsonl (``label``)               ``intent``
``tts-sentiment``  sentiment.jsonl (``label``)            ``sentiment``
``tts-qa``         qa.jsonl (``text`` + ``question``)     ``qa``
=================  ====================================  ===============================

Real speech (``load_testset`` with the shared data folder): ``speechocean762`` (non-native
English read speech: ASR), ``picovoice-coffee`` (spoken coffee orders: every intent is
``orderDrink``, so intent accuracy says nothing; the task is naming the ordered drink, the
``coffeeDrink`` slot, among the set's drinks: ``coffee``), ``commonvoice-zh`` (Mandarin:
ASR scored by CER, and ``align:x2en:zh``-style speech/text agreement since it has no English
reference).

Any manifest path (``.jsonl``) is a test set too.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blsp.errors import BlspError

log = logging.getLogger(__name__)

# Voices kept for evaluation: training data should be synthesised with these as ``holdout_voices``
# (they then land in heldout.jsonl, never in train.jsonl).
EVAL_VOICES: dict[str, tuple[str, ...]] = {
    "en": ("flite:slt", "espeak:en+f3"),  # whisper-base WER 0.08 and 0.24 (12 sentences, 145 wpm)
    "de": ("espeak:de+f2", "espeak:de+m3"),
    "fr": ("espeak:fr+f2", "espeak:fr+m3"),
    "zh": ("espeak:cmn", "espeak:cmn+f3"),
}


@dataclass(frozen=True)
class BuildSpec:
    """How a TTS test set is made: which resource file, how each row becomes an item."""

    name: str
    resource: (
        str  # resources/tasks/<resource>.jsonl, or a resources/ path to a text file (one sentence a line)
    )
    lang: str
    tasks: tuple[str, ...]
    shared: str | None = None  # shared/data/text/... alternative


BUILD_SPECS: dict[str, BuildSpec] = {
    "tts-asr-en": BuildSpec(
        "tts-asr-en", "sentences/heldout.txt", "en", ("asr", "align", "content"), "harvard/sentences.txt"
    ),
    "tts-st-en": BuildSpec(
        "tts-st-en", "st", "en", ("st:de", "st:fr", "asr", "align"), "multi30k/test_2016_flickr.jsonl"
    ),
    "tts-x2en-de": BuildSpec("tts-x2en-de", "x2en", "de", ("x2en:de",), "multi30k/test_2016_flickr.jsonl"),
    "tts-x2en-fr": BuildSpec("tts-x2en-fr", "x2en", "fr", ("x2en:fr",), "multi30k/test_2016_flickr.jsonl"),
    "tts-x2en-zh": BuildSpec("tts-x2en-zh", "x2en", "zh", ("x2en:zh",)),
    "tts-intent": BuildSpec("tts-intent", "intent", "en", ("intent",), "snips/test.jsonl"),
    "tts-sentiment": BuildSpec("tts-sentiment", "sentiment", "en", ("sentiment",), "sst2/dev.jsonl"),
    "tts-qa": BuildSpec("tts-qa", "qa", "en", ("qa",)),
}

REAL_SETS = {
    "speechocean762": "speech/speechocean762/test.jsonl",
    "picovoice-coffee": "speech/picovoice-coffee/test.jsonl",
    "commonvoice-zh": "speech/commonvoice-zh/test.jsonl",
}

# The test set a task runs on when the spec names none.
DEFAULT_TESTSET = {
    "asr": "tts-asr-en",
    "align": "tts-asr-en",
    "content": "tts-asr-en",
    "st": "tts-st-en",
    "x2en:de": "tts-x2en-de",
    "x2en:fr": "tts-x2en-fr",
    "x2en:zh": "tts-x2en-zh",
    "intent": "tts-intent",
    "snips": "tts-intent",
    "sentiment": "tts-sentiment",
    "qa": "tts-qa",
    "coffee": "picovoice-coffee",
}


def default_testset(task_name: str) -> str:
    """The test set a task runs on by default (``align:<task>``: that task's)."""
    inner = task_name.split(":", 1)[1] if task_name.startswith("align:") else ""
    if inner and inner not in ("continuation", "repetition"):
        return default_testset(inner)
    if task_name in DEFAULT_TESTSET:
        return DEFAULT_TESTSET[task_name]
    head = task_name.split(":", 1)[0]
    if head in DEFAULT_TESTSET:
        return DEFAULT_TESTSET[head]
    raise BlspError(f"task {task_name!r} has no default test set; write {task_name}@TESTSET")


def default_root() -> Path:
    """Where built test sets live: ``$BLSP_TESTSETS``, else ``<blsp cache>/testsets``."""
    env = os.environ.get("BLSP_TESTSETS")
    if env:
        return Path(env)
    try:
        from blsp.models.hub import cache_dir

        return Path(cache_dir()) / "testsets"
    except ImportError:
        return Path(os.environ.get("BLSP_CACHE", Path.home() / ".cache" / "blsp")) / "testsets"


def default_shared_data() -> Path | None:
    """The shared real data folder: ``$BLSP_SHARED_DATA``, else ``../shared/data`` from here, if present."""
    env = os.environ.get("BLSP_SHARED_DATA")
    cands = [Path(env)] if env else []
    cands += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[4] / "shared" / "data"]
    for c in cands:
        if c.is_dir():
            return c
    return None


# ---------------------------------------------------------------------------------------------
# Source rows -> items to synthesise


def _text_rows(path: Path, prefix: str) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [{"id": f"{prefix}-{i:04d}", "text": t.strip()} for i, t in enumerate(lines, 1) if t.strip()]


def resource_rows(resource: str) -> list[dict[str, Any]]:
    """Rows of ``blsp/resources/tasks/<resource>.jsonl`` (the project's embedded task texts), or of a
    resource text file (``sentences/heldout.txt``: one sentence a line)."""
    from importlib import resources

    from blsp.utils.io import iter_jsonl

    rel = resource if resource.endswith(".txt") else f"tasks/{resource}.jsonl"
    ref = resources.files("blsp.resources").joinpath(*rel.split("/"))
    if not ref.is_file():
        raise BlspError(f"resource {rel} is missing from the blsp package")
    with resources.as_file(ref) as path:
        if rel.endswith(".txt"):
            return _text_rows(path, Path(rel).stem)
        rows = []
        for lineno, obj, _ in iter_jsonl(path):
            if obj is None:
                log.warning("%s:%d: malformed line skipped", rel, lineno)
                continue
            rows.append(obj)
    return rows


def _pick(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = row.get(k)
        if v not in (None, ""):
            return v
    tr = row.get("translation")
    if isinstance(tr, dict):
        for k in keys:
            if tr.get(k):
                return tr[k]
    return None


def items_for(spec: BuildSpec, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn source rows into items for ``synthesize`` (``text`` in the spoken language + references)."""
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        rid = str(row.get("id", i))
        lang = spec.lang
        if spec.resource == "x2en":
            row_lang = str(row.get("lang") or row.get("src_lang") or "")
            if row_lang and row_lang.split("-")[0] not in (lang, "cmn" if lang == "zh" else lang):
                continue
            text = _pick(row, lang, "text", "source", "src")
            en = _pick(row, "en", "reference", "target")
            if not text or not en or text == en:
                continue
            out.append({"id": rid, "text": text, "lang": lang, "en": en})
        elif spec.resource.endswith(".txt"):
            text = _pick(row, "text")
            if text:
                out.append({"id": rid, "text": text, "lang": "en"})
        elif spec.resource == "st":
            text = _pick(row, "en", "text", "source")
            if not text:
                continue
            item = {"id": rid, "text": text, "lang": "en"}
            for tgt in ("de", "fr", "zh"):
                ref = _pick(row, tgt)
                if ref:
                    item[tgt] = ref
            out.append(item)
        elif spec.resource in ("intent", "sentiment"):
            label = _pick(row, "label", "intent")
            text = _pick(row, "text")
            if not text or not label:
                continue
            out.append({"id": rid, "text": text, "lang": "en", "label": str(label)})
        elif spec.resource == "qa":
            text, q = _pick(row, "text", "transcript", "input"), _pick(row, "question")
            if not text or not q:
                continue
            item = {"id": rid, "text": text, "lang": "en", "question": q}
            if row.get("answer"):
                item["answer"] = row["answer"]
            out.append(item)
    return out


def _shared_rows(spec: BuildSpec, shared: Path) -> list[dict[str, Any]]:
    from blsp.utils.io import iter_jsonl

    if not spec.shared:
        raise BlspError(f"test set {spec.name} has no shared-data source; build it from the resources")
    path = shared / "text" / spec.shared
    if not path.is_file():
        raise BlspError(f"{path}: shared text source of {spec.name} not found")
    if path.suffix == ".txt":
        return _text_rows(path, path.parent.name)
    rows = [obj for _, obj, _ in iter_jsonl(path) if obj]
    if spec.resource == "x2en":  # multi30k rows: the spoken side is the source language
        rows = [
            {"id": r.get("id"), "lang": spec.lang, spec.lang: r.get(spec.lang), "en": r.get("en")}
            for r in rows
        ]
    return rows


def build_testset(
    name: str,
    root: str | Path | None = None,
    *,
    n: int | None = 50,
    voices: Sequence[str] | None = None,
    source: str = "resources",
    shared: str | Path | None = None,
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Synthesise test set ``name`` under ``root/name`` with held-out voices; returns its manifest.

    ``n`` sentences are drawn (seeded) from the source; each is spoken by one of ``voices``
    (default :data:`EVAL_VOICES` of the language). Resumable (the synthesiser skips done ids).
    """
    from blsp.data.synth import synthesize

    if name not in BUILD_SPECS:
        raise BlspError(f"unknown test set to build {name!r}; known: {', '.join(BUILD_SPECS)}")
    spec = BUILD_SPECS[name]
    if source == "shared":
        shared_dir = Path(shared) if shared else default_shared_data()
        if shared_dir is None:
            raise BlspError(
                "source='shared' needs the shared data folder (--shared-data or $BLSP_SHARED_DATA)"
            )
        rows = _shared_rows(spec, shared_dir)
    elif source == "resources":
        rows = resource_rows(spec.resource)
    else:
        raise BlspError(f"test set source must be resources or shared, not {source!r}")
    items = items_for(spec, rows)
    if not items:
        raise BlspError(f"test set {name}: the {source} source gave no usable rows")
    if n is not None and n < len(items):
        items = random.Random(f"{seed}:{name}").sample(items, n)
        items.sort(key=lambda it: it["id"])
    out = Path(root) if root else default_root()
    vs = list(voices) if voices else list(EVAL_VOICES.get(spec.lang, ()))
    manifest = synthesize(
        items,
        out / name,
        vs or None,
        lang=spec.lang,
        seed=seed,
        workers=workers,
        manifest_name="test.jsonl",
        progress=False,
    )
    return Path(manifest)


# ---------------------------------------------------------------------------------------------
# Loading


def _read(path: Path, limit: int | None) -> list[dict[str, Any]]:
    from blsp.data.manifest import load_manifest, resolve_audio_path

    items = load_manifest(path)
    out = []
    for it in items[: limit if limit is not None else None]:
        it = dict(it)
        it["id"] = str(it["id"])
        it["audio"] = resolve_audio_path(it["audio"], path.parent)
        out.append(it)
    return out


def load_testset(
    name: str,
    root: str | Path | None = None,
    shared: str | Path | None = None,
    limit: int | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """``(name, items)`` of a built test set, a real one from the shared data, or a manifest path.

    Items have absolute ``audio`` references; real sets are adapted to the task fields
    (``picovoice-coffee``: ``label`` = the ordered drink; ``commonvoice-zh``: ``lang`` = zh).
    """
    p = Path(name)
    if name.endswith(".jsonl") or p.is_file():
        if not p.is_file():
            raise BlspError(f"{p}: test-set manifest not found")
        return p.stem if p.stem not in ("test", "train", "heldout") else p.parent.name, _read(p, limit)
    if name in REAL_SETS:
        shared_dir = Path(shared) if shared else default_shared_data()
        if shared_dir is None or not (shared_dir / REAL_SETS[name]).is_file():
            raise BlspError(
                f"real test set {name!r} needs the shared data folder with {REAL_SETS[name]} "
                f"(--shared-data or $BLSP_SHARED_DATA; looked in {shared_dir})"
            )
        items = _read(shared_dir / REAL_SETS[name], limit)
        if name == "picovoice-coffee":
            for it in items:
                drink = (it.get("slots") or {}).get("coffeeDrink")
                if drink:
                    it["label"] = drink
        if name == "commonvoice-zh":
            for it in items:
                it["lang"] = it.get("lang") or "zh"
        if name == "speechocean762":
            for it in items:
                it.setdefault("lang", "en")
        return name, items
    base = Path(root) if root else default_root()
    manifest = base / name / "test.jsonl"
    if not manifest.is_file():
        hint = f"; build it with `blsp eval-sets build {name}`" if name in BUILD_SPECS else ""
        raise BlspError(f"test set {name!r} not found at {manifest}{hint}")
    return name, _read(manifest, limit)


def make_tasks(
    specs: Sequence[str],
    root: str | Path | None = None,
    shared: str | Path | None = None,
    limit: int | None = None,
) -> list[Any]:
    """Tasks from ``NAME[@TESTSET]`` specs, each bound to its (default) test set's items.

    With ``limit`` a task keeps the first ``limit`` items, but its label set (classification) is
    still that of the whole test set, so the instruction does not change with the sample.
    """
    from blsp.evaluation.tasks import make_task, parse_task_spec

    loaded: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    tasks = []
    for spec in specs:
        name, ts = parse_task_spec(spec)
        ts = ts or default_testset(name)
        if ts not in loaded:
            loaded[ts] = load_testset(ts, root=root, shared=shared)
        ts_name, items = loaded[ts]
        task = make_task(name, items, testset=ts_name)
        if limit is not None:
            task.items = task.items[:limit]
        tasks.append(task)
    return tasks
