"""Importers from common speech corpus layouts to the blsp manifest (see :mod:`blsp.data.manifest`).

Longer than 500 lines because it holds one small importer per corpus layout behind one driver and
its FORMATS table; each importer is short and self-contained.

``import_corpus(fmt, src, out, normalize=..., paths=..., **options)`` writes ``out`` atomically and
returns an :class:`ImportResult`. Formats (``FORMATS``):

- ``librispeech``: a tree of ``*.trans.txt`` with ``<utt>.flac`` beside them.
- ``commonvoice``: a locale folder with ``<split>.tsv`` files and ``clips/``; ``tsv=`` picks the split
  (``test``, ``train``, ``validated``... or a path).
- ``gigaspeech``: the metadata JSON (``GigaSpeech.json``) whose audios hold segments of long files;
  each segment becomes a ``path:start:num`` reference; ``subset=`` keeps segments of e.g. ``XS``.
- ``kaldi``: a data folder with ``wav.scp`` (plain paths only: piped commands and ark offsets are
  rejected, line by line, with a message), ``text``, optional ``segments`` and ``utt2spk``.
- ``manifest``: an existing manifest (JSONL); audio paths are rewritten for the new location.
- ``hf``: a ``datasets`` dataset (a ``save_to_disk`` folder, a local data folder, or a name for
  ``load_dataset``) with an audio column; the audio is written as 16 kHz mono files in
  ``<out folder>/audio/`` next to the manifest.
- ``tsv`` / ``csv``: a table with ``audio_col``, ``text_col`` and optional ``id_col``.

Every format skips and counts a bad entry (missing or unreadable audio, no transcript,
duplicate id) and goes on. Audio paths are written relative to the manifest's folder when the
file lies under it, else absolute (``paths="auto"``); ``absolute`` or ``relative`` force one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blsp.data.audio import SAMPLE_RATE, audio_info, format_audio_ref, parse_audio_ref
from blsp.data.manifest import iter_manifest, relocate_audio, resolve_audio_path, write_manifest
from blsp.data.normalize import get_normalizer
from blsp.errors import AudioError, BlspError

log = logging.getLogger(__name__)

FORMATS = ("librispeech", "commonvoice", "gigaspeech", "kaldi", "manifest", "hf", "tsv", "csv")
_FIRST_KEYS = ("id", "audio", "text", "duration", "speaker", "lang")


@dataclass(frozen=True)
class Skip:
    """An entry an importer could not use: where (file:line or id) and why."""

    where: str
    reason: str


@dataclass
class ImportResult:
    out: Path
    written: int = 0
    hours: float = 0.0
    skipped: list[Skip] = field(default_factory=list)

    def skip_counts(self) -> Counter[str]:
        return Counter(s.reason.split(":")[0] for s in self.skipped)


Entry = dict[str, Any] | Skip


# ----------------------------------------------------------------------------------- driver


def import_corpus(
    fmt: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    normalize: str | None = "none",
    paths: str = "auto",
    progress: bool = False,
    **options: Any,
) -> ImportResult:
    """Import ``src`` in format ``fmt`` into the manifest ``out`` (written atomically).

    Items need an ``audio`` reference; their audio header is read for the duration unless the
    source gave one (then only the file's existence is checked). With ``normalize`` other than
    ``none``, ``text`` is normalised and the original kept in ``text_raw``.
    """
    if fmt not in IMPORTERS:
        raise BlspError(f"unknown import format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out).absolute()
    if fmt != "hf" and not src.exists():
        raise BlspError(f"{src}: not found")
    norm = get_normalizer(normalize)
    result = ImportResult(out=out)
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    entries = IMPORTERS[fmt](src, out_dir=out.parent, **options)
    if progress:
        from tqdm import tqdm

        entries = tqdm(entries, desc=f"import {fmt}", unit="utt", file=sys.stderr)
    for entry in entries:
        if isinstance(entry, Skip):
            result.skipped.append(entry)
            continue
        item = entry
        key = str(item["id"])
        if key in seen:
            result.skipped.append(Skip(key, "duplicate id"))
            continue
        try:
            item = _finish_item(item, out.parent, norm, normalize, paths)
        except AudioError as e:
            reason = "missing audio" if "not found" in str(e) else "unreadable audio"
            result.skipped.append(Skip(key, f"{reason}: {e}"))
            continue
        seen.add(key)
        items.append(item)
        result.hours += item["duration"] / 3600
    if not items and result.skipped:
        first = result.skipped[0]
        raise BlspError(
            f"{src}: no usable utterance ({len(result.skipped)} skipped; first: {first.where}: {first.reason})"
        )
    result.written = write_manifest(out, items)
    return result


def _finish_item(
    item: dict[str, Any], out_dir: Path, norm: Callable[[str], str], normalize: str | None, paths: str
) -> dict[str, Any]:
    audio = str(item["audio"])
    if item.get("duration") is None:
        item["duration"] = round(audio_info(audio).duration, 3)
    else:
        p, _, _ = parse_audio_ref(audio)
        if not p.is_file():
            raise AudioError(f"{p}: audio file not found")
    item["id"] = str(item["id"])
    item["audio"] = relocate_audio(audio, out_dir, out_dir, paths)
    if isinstance(item.get("text"), str):
        raw = item["text"]
        item["text"] = norm(raw)
        if normalize not in (None, "none"):
            item["text_raw"] = raw
    ordered = {k: item[k] for k in _FIRST_KEYS if k in item and item[k] is not None}
    ordered.update({k: v for k, v in item.items() if k not in ordered and v is not None})
    return ordered


# ---------------------------------------------------------------------------- formats


def import_librispeech(src: Path, **_: Any) -> Iterator[Entry]:
    """LibriSpeech layout: ``<spk>/<chapter>/<spk>-<chapter>.trans.txt`` and ``<utt>.flac`` beside it."""
    trans = sorted(src.rglob("*.trans.txt")) if src.is_dir() else [src]
    if not trans:
        raise BlspError(f"{src}: no *.trans.txt file found (not a LibriSpeech tree)")
    for tf in trans:
        for lineno, line in enumerate(tf.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) < 2:
                yield Skip(f"{tf}:{lineno}", "no transcript")
                continue
            utt, text = parts
            audio = next(
                (
                    tf.parent / f"{utt}{ext}"
                    for ext in (".flac", ".wav")
                    if (tf.parent / f"{utt}{ext}").exists()
                ),
                tf.parent / f"{utt}.flac",
            )
            yield {
                "id": utt,
                "audio": str(audio.absolute()),
                "text": text,
                "speaker": utt.split("-")[0],
                "lang": "en",
                "chapter": utt.split("-")[1] if utt.count("-") >= 2 else None,
            }


def _read_table(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        if not reader.fieldnames:
            raise BlspError(f"{path}: empty table (no header line)")
        for row in reader:
            yield reader.line_num, row


def import_commonvoice(src: Path, tsv: str | None = None, **_: Any) -> Iterator[Entry]:
    """Common Voice: ``<split>.tsv`` (columns path, sentence, client_id, locale...) and ``clips/``."""
    if src.is_file():
        table, root = src, src.parent
    else:
        root = src
        names = sorted(p.stem for p in src.glob("*.tsv"))
        if tsv is None:
            raise BlspError(
                f"{src}: choose the split with --tsv (one of: {', '.join(names) or 'none found'})"
            )
        table = Path(tsv) if Path(tsv).is_file() else src / (tsv if tsv.endswith(".tsv") else f"{tsv}.tsv")
        if not table.is_file():
            raise BlspError(f"{table}: not found (tsv files here: {', '.join(names) or 'none'})")
    clips = root / "clips"
    durations: dict[str, float] = {}
    if (root / "clip_durations.tsv").is_file():
        for _, row in _read_table(root / "clip_durations.tsv", "\t"):
            ms = row.get("duration[ms]") or row.get("duration")
            if row.get("clip") and ms and ms.replace(".", "", 1).isdigit():
                durations[row["clip"]] = float(ms) / 1000
    for lineno, row in _read_table(table, "\t"):
        name = (row.get("path") or "").strip()
        if not name:
            yield Skip(f"{table}:{lineno}", "no path column value")
            continue
        text = row.get("sentence")
        if text is None or not text.strip():
            yield Skip(f"{table}:{lineno}", "no transcript")
            continue
        item: dict[str, Any] = {
            "id": Path(name).stem,
            "audio": str((clips / name).absolute()),
            "text": text,
            "speaker": row.get("client_id") or None,
            "lang": row.get("locale") or None,
            "duration": durations.get(name),
        }
        for k in ("gender", "age", "accents", "accent", "variant"):
            if row.get(k):
                item[k] = row[k]
        yield item


_GIGA_PUNCT = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
_GIGA_GARBAGE = re.compile(r"<(SIL|MUSIC|NOISE|OTHER)>")


def gigaspeech_text(text_tn: str) -> str:
    """GigaSpeech ``text_tn`` to plain text: punctuation tags become marks, garbage tags go."""
    for tag, mark in _GIGA_PUNCT.items():
        text_tn = text_tn.replace(f" {tag}", mark).replace(tag, mark)
    text_tn = _GIGA_GARBAGE.sub(" ", text_tn)
    return re.sub(r"\s+", " ", text_tn).strip()


def import_gigaspeech(src: Path, subset: str | None = None, **_: Any) -> Iterator[Entry]:
    """GigaSpeech metadata JSON: ``audios[].path`` (relative to the JSON's folder) and ``segments``."""
    meta = src if src.is_file() else src / "GigaSpeech.json"
    if not meta.is_file():
        raise BlspError(f"{src}: no GigaSpeech.json (give the metadata JSON file)")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BlspError(f"{meta}: not valid JSON ({e})") from e
    audios = data.get("audios") if isinstance(data, dict) else None
    if not isinstance(audios, list):
        raise BlspError(f"{meta}: no 'audios' list")
    want = None if subset is None else "{" + subset.strip("{}") + "}"
    for n, rec in enumerate(audios):
        aid = str(rec.get("aid", n))
        path = meta.parent / str(rec.get("path", ""))
        try:
            info = audio_info(path)
        except AudioError as e:
            for seg in rec.get("segments", []):
                yield Skip(
                    str(seg.get("sid", aid)),
                    f"{'missing' if 'not found' in str(e) else 'unreadable'} audio: {e}",
                )
            continue
        for seg in rec.get("segments", []):
            sid = str(seg.get("sid", ""))
            if want is not None and want not in seg.get("subsets", []):
                continue
            try:
                begin, end = float(seg["begin_time"]), float(seg["end_time"])
            except (KeyError, TypeError, ValueError):
                yield Skip(sid or aid, "segment without begin_time/end_time")
                continue
            text = gigaspeech_text(str(seg.get("text_tn", "")))
            if not text:
                yield Skip(sid, "no transcript (only garbage tags)")
                continue
            start = int(round(begin * info.samplerate))
            num = min(int(round(end * info.samplerate)), info.frames) - start
            if num <= 0 or start >= info.frames:
                yield Skip(sid, f"segment {begin}-{end}s outside the audio ({info.duration:.2f}s)")
                continue
            yield {
                "id": sid,
                "audio": format_audio_ref(path.absolute(), start, num),
                "text": text,
                "duration": round(num / info.samplerate, 3),
                "lang": "en",
                "recording": aid,
                "speaker": rec.get("speaker") or None,
            }


def _kaldi_map(path: Path) -> Iterator[tuple[int, str, str]]:
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        key, _, rest = line.partition(" ")
        yield lineno, key, rest.strip()


_ARK = re.compile(r"(^ark:|\.ark:\d+$|^scp:)")


def import_kaldi(src: Path, audio_root: str | None = None, **_: Any) -> Iterator[Entry]:
    """Kaldi data folder: ``wav.scp``, ``text``, optional ``segments`` and ``utt2spk``.

    Relative paths in ``wav.scp`` are looked up under ``audio_root`` (default: the current folder,
    as Kaldi recipes run from their root), then under the data folder itself.
    """
    scp = src / "wav.scp"
    if not scp.is_file():
        raise BlspError(f"{src}: no wav.scp (not a Kaldi data folder)")
    roots = [Path(audio_root) if audio_root else Path.cwd(), src]
    recs: dict[str, Path | Skip] = {}
    for lineno, key, rest in _kaldi_map(scp):
        where = f"{scp}:{lineno}"
        if rest.endswith("|") or rest.startswith("|"):
            recs[key] = Skip(
                where,
                f"piped command, not a file: {rest[:80]!r} (blsp does not run wav.scp "
                "commands; write the audio to files and list their paths)",
            )
        elif _ARK.search(rest):
            recs[key] = Skip(where, f"Kaldi archive reference, not a plain audio file: {rest[:80]!r}")
        elif not rest:
            recs[key] = Skip(where, "no path")
        else:
            p = Path(rest)
            if not p.is_absolute():
                p = next((r / p for r in roots if (r / p).exists()), roots[-1] / p)
            recs[key] = p.absolute()
    texts = {k: v for _, k, v in _kaldi_map(src / "text")} if (src / "text").is_file() else None
    spk = {k: v for _, k, v in _kaldi_map(src / "utt2spk")} if (src / "utt2spk").is_file() else {}
    infos: dict[str, Any] = {}

    def entry(utt: str, rec: str, seg: tuple[float, float] | None, where: str) -> Entry:
        target = recs.get(rec)
        if target is None:
            return Skip(where, f"recording {rec!r} not in wav.scp")
        if isinstance(target, Skip):
            return Skip(utt, target.reason + f" ({target.where})")
        item: dict[str, Any] = {"id": utt, "audio": str(target), "speaker": spk.get(utt)}
        if texts is not None:
            if utt not in texts:
                return Skip(where, "no transcript in text")
            item["text"] = texts[utt]
        if seg is not None:
            if rec not in infos:
                try:
                    infos[rec] = audio_info(target)
                except AudioError as e:
                    infos[rec] = e
            info = infos[rec]
            if isinstance(info, AudioError):
                return Skip(utt, f"{'missing' if 'not found' in str(info) else 'unreadable'} audio: {info}")
            start = int(round(seg[0] * info.samplerate))
            end = info.frames if seg[1] < 0 else min(int(round(seg[1] * info.samplerate)), info.frames)
            if end <= start:
                return Skip(where, f"segment {seg[0]}-{seg[1]}s outside the audio ({info.duration:.2f}s)")
            item["audio"] = format_audio_ref(target, start, end - start)
            item["duration"] = round((end - start) / info.samplerate, 3)
            item["recording"] = rec
        return item

    seg_file = src / "segments"
    if seg_file.is_file():
        for lineno, utt, rest in _kaldi_map(seg_file):
            parts = rest.split()
            try:
                rec, t0, t1 = parts[0], float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                yield Skip(f"{seg_file}:{lineno}", "segments line must be 'utt recording start end'")
                continue
            yield entry(utt, rec, (t0, t1), f"{seg_file}:{lineno}")
    else:
        for rec in recs:
            yield entry(rec, rec, None, f"{scp}")


def import_manifest(src: Path, **_: Any) -> Iterator[Entry]:
    """An existing blsp manifest; audio paths are resolved against its folder for rewriting."""
    for lineno, item, _raw, err in iter_manifest(src):
        if err is not None or item is None:
            yield Skip(f"{src}:{lineno}", err or "bad line")
            continue
        item = dict(item)
        item["audio"] = resolve_audio_path(item["audio"], src.parent)
        yield item


def _table_importer(delimiter: str) -> Callable[..., Iterator[Entry]]:
    def run(
        src: Path,
        audio_col: str = "audio",
        text_col: str | None = "text",
        id_col: str | None = None,
        audio_root: str | None = None,
        **_: Any,
    ) -> Iterator[Entry]:
        root = Path(audio_root) if audio_root else src.parent
        for lineno, row in _read_table(src, delimiter):
            where = f"{src}:{lineno}"
            if audio_col not in row:
                raise BlspError(
                    f"{src}: no column {audio_col!r} (columns: {', '.join(row)}); use --audio-col"
                )
            if text_col and text_col not in row:
                raise BlspError(f"{src}: no column {text_col!r} (columns: {', '.join(row)}); use --text-col")
            if id_col and id_col not in row:
                raise BlspError(f"{src}: no column {id_col!r} (columns: {', '.join(row)}); use --id-col")
            ref = (row.get(audio_col) or "").strip()
            if not ref:
                yield Skip(where, "empty audio column")
                continue
            p, start, num = parse_audio_ref(ref)
            audio = format_audio_ref((p if p.is_absolute() else root / p).absolute(), start, num)
            key = row[id_col] if id_col else (row.get("id") or Path(str(p)).stem)
            item: dict[str, Any] = {"id": key, "audio": audio}
            if text_col:
                if not (row.get(text_col) or "").strip():
                    yield Skip(where, "no transcript")
                    continue
                item["text"] = row[text_col]
            for k, v in row.items():
                if k not in (audio_col, text_col, id_col) and k is not None and v not in (None, ""):
                    item.setdefault(k, v)
            if "duration" in item:
                try:
                    item["duration"] = float(item["duration"])
                except ValueError:
                    item["duration"] = None
            yield item

    return run


def import_hf(
    src: Path,
    out_dir: Path,
    split: str | None = None,
    hf_config: str | None = None,
    audio_col: str = "audio",
    text_col: str | None = "text",
    id_col: str | None = None,
    audio_format: str = "wav",
    **_: Any,
) -> Iterator[Entry]:
    """A ``datasets`` dataset; each audio cell is decoded with soundfile (never torchcodec) and written
    as 16 kHz mono ``<out_dir>/audio/<id>.<audio_format>``. Other simple columns are carried."""
    import datasets
    import numpy as np

    from blsp.data.audio import decode_audio_bytes, load_audio, to_mono_resampled, write_wav

    ds = _load_hf(src, split, hf_config)
    if audio_col not in ds.column_names:
        raise BlspError(
            f"{src}: no column {audio_col!r} (columns: {', '.join(ds.column_names)}); use --audio-col"
        )
    if text_col and text_col not in ds.column_names:
        raise BlspError(
            f"{src}: no column {text_col!r} (columns: {', '.join(ds.column_names)}); use --text-col"
        )
    if id_col and id_col not in ds.column_names:
        raise BlspError(f"{src}: no column {id_col!r} (columns: {', '.join(ds.column_names)}); use --id-col")
    if id_col is None and "id" in ds.column_names:
        id_col = "id"
    if isinstance(ds.features[audio_col], datasets.Audio):
        ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
    if audio_format not in ("wav", "flac"):
        raise BlspError(f"audio format must be wav or flac, not {audio_format!r}")
    audio_dir = out_dir / "audio"
    for i, row in enumerate(ds):
        key = str(row[id_col]) if id_col else f"{i:08d}"
        target = audio_dir / f"{_safe_name(key)}.{audio_format}"
        cell = row[audio_col]
        item: dict[str, Any] = {"id": key, "audio": str(target)}
        if text_col:
            text = row.get(text_col)
            if not isinstance(text, str) or not text.strip():
                yield Skip(key, "no transcript")
                continue
            item["text"] = text
        if not target.exists():
            try:
                if isinstance(cell, dict) and cell.get("bytes"):
                    wav = decode_audio_bytes(
                        cell["bytes"], source=f"{key} ({cell.get('path')})", strict=False
                    )
                elif isinstance(cell, dict) and cell.get("array") is not None:
                    wav = to_mono_resampled(
                        np.asarray(cell["array"], dtype=np.float32).T,
                        int(cell.get("sampling_rate") or SAMPLE_RATE),
                    )
                elif isinstance(cell, dict) and cell.get("path"):
                    wav = load_audio(cell["path"])
                elif isinstance(cell, str):
                    wav = load_audio(cell)
                else:
                    yield Skip(key, "empty audio cell")
                    continue
            except AudioError as e:
                yield Skip(key, f"unreadable audio: {e}")
                continue
            if target.suffix == ".flac":
                import soundfile as sf

                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                sf.write(str(tmp), wav, SAMPLE_RATE, format="FLAC")
                os.replace(tmp, target)
            else:
                write_wav(target, wav)
        for k, v in row.items():
            if k in (audio_col, text_col, id_col) or k in item:
                continue
            if isinstance(v, str | int | float | bool) or (isinstance(v, list | dict) and _jsonable(v)):
                item[k] = v
        yield item


def _load_hf(src: Path, split: str | None, hf_config: str | None) -> Any:
    import datasets

    if src.is_dir() and ((src / "dataset_dict.json").is_file() or (src / "state.json").is_file()):
        ds = datasets.load_from_disk(str(src))
    else:
        try:
            ds = datasets.load_dataset(str(src), hf_config, split=split)
        except Exception as e:  # offline, unknown name, bad config
            raise BlspError(f"{src}: cannot load dataset ({type(e).__name__}: {str(e)[:300]})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise BlspError(f"{src}: choose a split with --split (one of: {', '.join(ds)})")
            split = next(iter(ds))
        if split not in ds:
            raise BlspError(f"{src}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    if isinstance(ds, datasets.IterableDataset | datasets.IterableDatasetDict):
        raise BlspError(f"{src}: streaming datasets are not supported")
    return ds


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)[:150] or "item"


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


IMPORTERS: dict[str, Callable[..., Iterator[Entry]]] = {
    "librispeech": import_librispeech,
    "commonvoice": import_commonvoice,
    "gigaspeech": import_gigaspeech,
    "kaldi": import_kaldi,
    "manifest": import_manifest,
    "hf": import_hf,
    "tsv": _table_importer("\t"),
    "csv": _table_importer(","),
}
