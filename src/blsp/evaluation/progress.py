"""Training progress (paper Figure 4): evaluate saved checkpoints and plot metrics against steps.

A checkpoint argument may be a training run folder (with ``checkpoints/``), its ``checkpoints/``
folder, one ``step-NNNNNNNN`` checkpoint (``weights/`` + ``meta.json``) or an adapter folder
itself (``config.json`` + ``adapter.safetensors``; its step read from its name, e.g.
``checkpoint-1000``, or from a ``meta.json``/``trainer_state.json`` beside it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blsp.errors import BlspError
from blsp.evaluation.tasks import PRIMARY, Task

_STEP = re.compile(r"(\d+)$")


def _is_adapter(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "adapter.safetensors").is_file()


def checkpoint_step(path: str | Path) -> int | None:
    """The training step of a checkpoint or adapter folder, if it can be told."""
    p = Path(path)
    for d in (p, p.parent):
        for meta_name, key in (("meta.json", "step"), ("trainer_state.json", "global_step")):
            f = d / meta_name
            if f.is_file():
                try:
                    v = json.loads(f.read_text("utf-8")).get(key)
                except (OSError, json.JSONDecodeError, AttributeError):
                    v = None
                if isinstance(v, int):
                    return v
        m = _STEP.search(d.name)
        if m:
            return int(m.group(1))
    return None


def expand_checkpoints(paths: Sequence[str | Path]) -> list[tuple[int, Path]]:
    """``[(step, adapter folder)]`` sorted by step, from run/checkpoint/adapter folders."""
    found: dict[Path, int] = {}
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise BlspError(f"{p}: checkpoint folder not found")
        cands: list[Path]
        if _is_adapter(p):
            cands = [p]
        elif _is_adapter(p / "weights"):
            cands = [p / "weights"]
        else:
            root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            cands = [
                c / "weights" if _is_adapter(c / "weights") else c
                for c in sorted(root.iterdir())
                if c.is_dir()
            ]
            cands = [c for c in cands if _is_adapter(c)]
            if (p / "final").is_dir() and _is_adapter(p / "final"):
                cands.append(p / "final")
        if not cands:
            raise BlspError(f"{p}: no adapter folder (config.json + adapter.safetensors) found in it")
        for c in cands:
            step = checkpoint_step(c)
            if step is None:
                raise BlspError(f"{c}: cannot tell its training step (name it step-N or add meta.json)")
            found[c.resolve()] = step
    return sorted(((s, p) for p, s in found.items()), key=lambda x: (x[0], str(x[1])))


def progress_curve(
    checkpoints: Sequence[str | Path],
    tasks: Sequence[Task],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str | None = None,
    judge: Any = None,
    loop_guard: bool = True,
) -> dict[str, Any]:
    """Evaluate each checkpoint on ``tasks`` and plot each task's primary metric vs step.

    Writes ``out_dir/results.{json,md}`` (one system per checkpoint) and ``out_dir/progress.png``.
    Returns ``{"png", "series": {label: [(step, value)]}, "results"}``.
    """
    from blsp.evaluation.plots import plot_progress
    from blsp.evaluation.runner import run_eval
    from blsp.evaluation.systems import BlspSystem
    from blsp.utils.io import atomic_write_json

    ckpts = expand_checkpoints(checkpoints)
    systems = [BlspSystem(p, name=f"step {s}", device=device) for s, p in ckpts]
    results = run_eval(
        systems,
        tasks,
        out_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        loop_guard=loop_guard,
        judge=judge,
    )
    series: dict[str, list[tuple[int, float | None]]] = {}
    lower: dict[str, bool] = {}
    for t in tasks:
        key, label, higher = PRIMARY[t.kind]
        name = f"{t.key} {label}"
        lower[name] = not higher
        series[name] = [(s, results["results"][f"step {s}"].get(t.key, {}).get(key)) for s, _ in ckpts]
    png = plot_progress(series, Path(out_dir) / "progress.png", lower_is_better=lower)
    atomic_write_json(
        Path(out_dir) / "progress.json", {"series": series, "checkpoints": [[s, str(p)] for s, p in ckpts]}
    )
    return {"png": str(png), "series": series, "results": results}


def learning_curve(runs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """The held-out matched/shuffled gap against samples seen and CPU hours, from training logs.

    ``runs`` are run folders in the order they were trained (e.g. the CTC warm start, then behavior
    alignment from it): samples and time add up across them, so a warm start's cost is counted. The
    gap is plotted for the LLM objectives only (a CTC run's eval loss is not an LLM loss).
    Writes ``learning_curve.png`` and ``learning_curve.json``; returns the points.
    """
    import yaml

    from blsp.evaluation.plots import pyplot, save_figure
    from blsp.training import checkpoint as ck
    from blsp.utils.io import atomic_write_json

    def progress_at(ckpt: Path) -> tuple[int, float] | None:
        """Samples and hours a checkpoint had seen (None if it is not a checkpoint)."""
        ckpt = ckpt.parent if ckpt.name == ck.WEIGHTS else ckpt
        if not (ckpt / ck.STATE).is_file():
            return None
        hist = ck.load_trainer_state(ckpt).get("history", {})
        return hist.get("samples", 0), hist.get("train_time_s", 0.0) / 3600

    points: list[dict[str, Any]] = []
    offset, prev_total, prev_run = (0, 0.0), (0, 0.0), None
    for run in map(Path, runs):
        log, config = run / "log.jsonl", run / "config.yaml"
        if not log.is_file() or not config.is_file():
            raise BlspError(f"{run}: not a training run folder (needs log.jsonl and config.yaml)")
        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        objective = cfg.get("train", {}).get("objective")
        if prev_run is not None:
            # a run started from a checkpoint of the one before counts that run up to that checkpoint
            init = (cfg.get("model") or {}).get("init_from")
            start = (
                progress_at(Path(init)) if init and Path(init).resolve().is_relative_to(prev_run) else None
            )
            done = start or prev_total
            offset = (offset[0] + done[0], offset[1] + done[1])
        rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
        last_samples, last_hours = 0, 0.0
        for r in rows:
            if "samples_seen" not in r:
                continue
            last_samples, last_hours = r["samples_seen"], r["train_time_s"] / 3600
            if (
                str(r.get("key", "")).startswith("eval")
                and objective != "ctc"
                and r.get("eval_gap") is not None
            ):
                points.append(
                    {
                        "run": run.name,
                        "step": r["step"],
                        "samples": offset[0] + last_samples,
                        "cpu_hours": offset[1] + last_hours,
                        "loss": r.get("eval_loss"),
                        "shuffled": r.get("eval_shuffled"),
                        "gap": r["eval_gap"],
                    }
                )
        if not any("samples_seen" in r for r in rows):  # a log of an older trainer: its last checkpoint
            last = ck.latest_checkpoint(run / "checkpoints")
            last_samples, last_hours = (progress_at(last) if last else None) or (0, 0.0)
        prev_total, prev_run = (last_samples, last_hours), run.resolve()
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=120)
    for ax, key, label in ((axes[0], "samples", "samples seen"), (axes[1], "cpu_hours", "training hours")):
        ax.plot([p[key] for p in points], [p["gap"] for p in points], "o-", ms=3)
        ax.axhline(0.1, color="tab:red", lw=0.8, ls="--", label="0.1 nats: not using the speech")
        ax.set_xlabel(label + " (warm start included)")
        ax.set_ylabel("held-out gap, nats/token")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    out = Path(out_dir)
    png = save_figure(fig, out / "learning_curve.png")
    atomic_write_json(out / "learning_curve.json", {"runs": [str(r) for r in runs], "points": points})
    return {"png": str(png), "points": points}
