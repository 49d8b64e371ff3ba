"""Atomic, resumable checkpoints with a keep-last-K retention rule.

A checkpoint is a folder ``<run>/checkpoints/step-00000120/`` holding

- ``weights/``: the trained weights (``BlspModel.save_pretrained``: adapter + config.json; plus
  LoRA / encoder weights when fine-tuning, or the LLM for stage 1),
- ``trainer_state.pt``: optimizer, scheduler, step, data position, RNG states of every rank; only
  tensors and plain Python values, so it loads with ``torch.load(weights_only=True)`` (no pickle),
- ``meta.json``: step, time, objective, the training data's fingerprint; written last.

It is written into ``.tmp-step-...`` (every file fsynced) and renamed into place, so a reader only
ever sees complete checkpoints; a checkpoint being deleted is first renamed to ``.trash-...``.
Leftover ``.tmp-*``/``.trash-*`` folders from a killed run are removed on the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blsp.errors import BlspError

log = logging.getLogger(__name__)

PREFIX = "step-"
META = "meta.json"
STATE = "trainer_state.pt"
WEIGHTS = "weights"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file():
            try:
                out.append((int(p.name[len(PREFIX) :]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def clean_partial(ckpt_dir: Path) -> int:
    """Remove ``.tmp-*`` / ``.trash-*`` leftovers of a killed run; returns how many."""
    n = 0
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def rng_state() -> dict[str, Any]:
    """The RNG states of this process as tensors and plain values (no pickle needed to load them)."""
    version, mt, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (or the pickled tuples of checkpoints written before it)."""
    py, nps = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    if isinstance(nps, dict):
        key = nps["key"].numpy().astype(np.uint32)
        nps = (nps["bit_generator"], key, nps["pos"], nps["has_gauss"], nps["gauss"])
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    save_weights: Callable[[Path], None],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically and apply retention; returns its folder."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_weights(tmp / WEIGHTS)
        torch.save(trainer_state, tmp / STATE)
        (tmp / META).write_text(json.dumps({**meta, "step": step, "time": time.time()}, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. final step == a periodic save)
            trash = ckpt_dir / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    apply_retention(ckpt_dir, keep_last)
    return final


def apply_retention(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (rename first, then remove)."""
    removed = []
    ckpts = list_checkpoints(ckpt_dir)
    for _step, path in ckpts[: max(0, len(ckpts) - keep_last)]:
        trash = ckpt_dir / f".trash-{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    if removed:
        _fsync_dir(ckpt_dir)
    return removed


def _legacy_numpy_globals() -> list[Any]:
    """What numpy's RNG state (an ``ndarray`` of uint32) needs to unpickle: checkpoints written
    before :func:`rng_state` stored it as tensors hold it as ``np.random.get_state()``'s tuple."""
    reconstruct = np.empty(0).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, loaded with ``weights_only=True`` (never arbitrary pickle).

    A checkpoint of an older version (numpy RNG state as an array) loads too; anything else that
    needs pickle, or a damaged file, is a :class:`~blsp.errors.BlspError` naming the file."""
    import pickle

    file = path / STATE
    if not file.is_file():
        raise BlspError(f"{file}: trainer state not found (incomplete checkpoint?)")
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
                allow = torch.serialization.safe_globals(_legacy_numpy_globals())
            else:
                torch.serialization.add_safe_globals(_legacy_numpy_globals())
                allow = contextlib.nullcontext()
            with allow:
                state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
        except Exception:  # the listing is only a hint
            found = ""
        raise BlspError(
            f"{file}: trainer state holds objects that only pickle can load ({found or 'unknown'}); "
            "it is not loaded, as unpickling runs code: resume from another checkpoint"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise BlspError(f"{file}: not a readable trainer state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise BlspError(f"{file}: not a trainer state (no 'step' entry)")
    return state


def publish_dir(src_writer: Callable[[Path], None], dest: Path) -> None:
    """Write a folder through ``src_writer`` into a temporary sibling and rename it to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        src_writer(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            trash = dest.parent / f".trash-{dest.name}-{os.getpid()}"
            os.replace(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
