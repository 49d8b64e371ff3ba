"""A run's folder: its layout, and the checks before a run starts or resumes there.

``<run>/config.yaml`` (the resolved recipe), ``log.jsonl``, ``summary.json``, ``checkpoints/step-N/``
(:mod:`blsp.training.checkpoint`) and ``final/``. A new run refuses a folder that holds one; a
resumed run must have the same config (``run.output_dir`` aside) and, unless accepted, the same
training data (``data_fingerprint``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from blsp.errors import BlspError
from blsp.training import checkpoint as ck
from blsp.training.config import Config, config_from_dict
from blsp.training.data import data_changes

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
LOG_FILE = "log.jsonl"
FINAL_DIR = "final"


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: {b!r} in the run, {a!r} now"]


def prepare_run_dir(cfg: Config, resume: bool | str) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint to resume from or None)``; checks a resumed run's config."""
    import yaml

    run_dir = cfg.output_dir
    ckpt: Path | None = None
    if isinstance(resume, str) and resume:
        p = Path(resume)
        if (p / ck.META).is_file():
            ckpt, run_dir = p, p.parent.parent
        else:
            run_dir = p
        if not run_dir.is_dir():
            raise BlspError(f"--resume {resume}: no such run folder")
    ckpt_dir = run_dir / "checkpoints"
    saved = run_dir / CONFIG_FILE
    if resume:
        if saved.is_file():
            try:
                old = config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")), source=str(saved))
            except BlspError as e:
                raise BlspError(f"--resume: {saved} is not a config of this version ({e})") from e
            now, then = cfg.identity(), old.identity()
            now["run"].pop("output_dir"), then["run"].pop("output_dir")
            diffs = _diff(now, then)
            if diffs:
                raise BlspError(
                    f"--resume: {run_dir} was trained with another config; differences: "
                    + "; ".join(diffs[:8])
                    + (f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else "")
                )
        elif ck.list_checkpoints(ckpt_dir):
            raise BlspError(f"--resume: {run_dir} has checkpoints but no {CONFIG_FILE}; cannot check it")
        if ckpt is None:
            ckpt = ck.latest_checkpoint(ckpt_dir)
        if ckpt is None:
            log.warning("--resume: no checkpoint in %s yet; starting from the beginning", ckpt_dir)
    elif ck.list_checkpoints(ckpt_dir) or (run_dir / FINAL_DIR).exists():
        raise BlspError(
            f"{run_dir} already holds a run (checkpoints or final weights): pass --resume to continue it, "
            "or set run.output_dir to a new folder"
        )
    return run_dir, ckpt


def check_resume_data(ckpt: Path, now: dict[str, Any], accept: bool) -> None:
    """Refuse to resume ``ckpt`` on training data other than its own (a warning with ``accept``)."""
    import json

    try:
        then = json.loads((ckpt / ck.META).read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError) as e:
        raise BlspError(f"--resume: {ckpt / ck.META} is not readable ({e})") from e
    if not isinstance(then, dict):
        log.warning("--resume: %s records no data fingerprint (an older version); data not checked", ckpt)
        return
    changes = data_changes(then, now)
    if not changes:
        return
    what = "; ".join(changes)
    if not accept:
        raise BlspError(
            f"--resume: the training data changed since {ckpt}: {what}. Restore it, or pass "
            "--resume-accept-data-change to continue on the new data (the batches from then on differ)"
        )
    log.warning("--resume: the training data changed since %s (accepted): %s", ckpt, what)
