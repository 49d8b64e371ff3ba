"""``blsp export``: a run's adapter as a small, self-describing folder to ship or share.

The folder holds ``config.json``, ``adapter.safetensors`` (the adapter only, in fp16 by default: no
CTC head, never the frozen encoder or LLM) and a model card ``README.md`` written from the run
itself: the recipe, the command that continues it, the training log's held-out loss and the
matched/shuffled content gap, and any measured results handed in as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from blsp.errors import BlspError
from blsp.evaluation.scoring import SPEECH_GAP_NATS

CARD = "README.md"
STATE = "training_state.json"


def _weights_folder(source: Path) -> tuple[Path, Path, dict[str, Any]]:
    """``(weights folder, run folder, progress)`` of a run (its final weights, else its last
    checkpoint) or of one checkpoint folder; progress has ``step``, ``samples``, ``train_time_s``."""
    from blsp.training import checkpoint as ck

    if (source / ck.META).is_file():  # a checkpoint folder
        state = ck.load_trainer_state(source)
        hist = state.get("history") or {}
        progress = {
            "step": int(state["step"]),
            "samples": hist.get("samples"),
            "train_time_s": hist.get("train_time_s"),
        }
        return source / ck.WEIGHTS, source.parent.parent, progress
    if (source / "final" / "config.json").is_file() and (source / "summary.json").is_file():
        summary = json.loads((source / "summary.json").read_text(encoding="utf-8"))
        progress = {k: summary.get(k) for k in ("samples", "train_time_s")}
        return source / "final", source, {"step": summary.get("steps"), **progress}
    last = ck.latest_checkpoint(source / "checkpoints")
    if last is None:
        raise BlspError(f"{source}: neither a run folder with final weights or checkpoints, nor a checkpoint")
    return _weights_folder(last)


def _adapter_tensors(folder: Path, purpose: str) -> dict[str, torch.Tensor]:
    """The ``adapter.*`` tensors of ``folder``'s weights; the loader's error naming the file otherwise."""
    from blsp.models.hub import ADAPTER_WEIGHTS
    from blsp.models.modeling_blsp import read_weights

    state = read_weights(folder / ADAPTER_WEIGHTS, f" (to {purpose})")
    return {k: v for k, v in state.items() if k.startswith("adapter.")}


def _average(state: dict[str, torch.Tensor], where: Path, other: Path, t: float) -> dict[str, torch.Tensor]:
    """``(1 - t) * state + t * other``'s adapter tensors; a BlspError unless the shapes agree."""
    from blsp.models.hub import ADAPTER_WEIGHTS

    if not 0.0 <= t <= 1.0:
        raise BlspError(f"average weight must be in [0, 1], not {t}")
    folder = other if (other / ADAPTER_WEIGHTS).is_file() else _weights_folder(other)[0]
    theirs = _adapter_tensors(folder, "average with")
    if theirs.keys() != state.keys():
        raise BlspError(f"{folder} and {where}: adapters with different tensors, cannot average them")
    for k, v in state.items():
        if theirs[k].shape != v.shape:
            raise BlspError(
                f"{folder} and {where}: {k} is {tuple(theirs[k].shape)} against {tuple(v.shape)}, cannot average"
            )
    return {k: (1 - t) * v.float() + t * theirs[k].float() for k, v in state.items()}


def _log_rows(run: Path) -> list[dict[str, Any]]:
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def model_card(
    name: str,
    config: dict[str, Any],
    run: Path,
    progress: dict[str, Any],
    results: dict[str, Any],
    command: str,
    notes: str = "",
) -> str:
    """The model card text for an exported adapter."""
    recipe = (run / "config.yaml").read_text(encoding="utf-8") if (run / "config.yaml").is_file() else ""
    upto = progress.get("step")  # a checkpoint's card stops at its own step, not at the run's end

    def until(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if upto is None or r.get("step", 0) <= upto]

    rows = until(_log_rows(run))
    evals = [r for r in rows if str(r.get("key", "")).startswith("eval")]
    trains = [r for r in rows if str(r.get("key", "")).startswith("train")]
    last_gap = next((r["eval_gap"] for r in reversed(evals) if r.get("eval_gap") is not None), None)
    lines = [
        f"# {name}",
        "",
        f"A BLSP modality adapter for the frozen `{config.get('encoder')}` encoder and the frozen "
        f"`{config.get('llm')}` LLM (adapter weights only). Load it with "
        f"`BlspModel.from_pretrained({name!r})` or talk to it with `blsp chat`.",
        "",
        "## Intended use",
        "",
        "Research and demonstration of behavior alignment on a laptop CPU: English speech in, text out, "
        "following text instructions about the speech (repeat, continue, answer); the frozen LLM's "
        "abilities bound what it can answer.",
        "",
        "## Training",
        "",
        f"- optimizer steps: {progress.get('step')}; samples seen: {progress.get('samples')}; "
        f"training time: {(progress.get('train_time_s') or 0) / 3600:.2f} h",
    ]
    if trains:
        last = trains[-1]
        lines.append(
            f"- last logged training loss (step {last['step']}): {last['loss']:.3f}, "
            f"{last.get('samples_per_s', 0):.1f} samples/s"
        )
    if command:
        lines += ["", "Continue this run (or repeat it) with:", "", "```bash", command, "```"]
    if evals:
        lines += [
            "",
            "Held-out teacher-forced loss (nats a target token) with each clip's own speech and with "
            "another clip's speech; the gap is what the speech contributes:",
            "",
            "| step | matched | shuffled | gap |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['step']} | {_fmt(r.get('eval_loss'))} | {_fmt(r.get('eval_shuffled'))} | "
            f"{_fmt(r.get('eval_gap'))} |"
            for r in evals
        ]
    if last_gap is not None:
        verdict = "uses the speech" if last_gap >= SPEECH_GAP_NATS else "does NOT use the speech"
        lines += [
            "",
            f"Last held-out gap {last_gap:.3f} nats: the model {verdict} (threshold {SPEECH_GAP_NATS}).",
        ]
    if results:
        lines += ["", "## Measured results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results.items()]
    if notes:
        lines += ["", notes.strip()]
    if recipe:
        lines += ["", "## Recipe (the run's resolved config)", "", "```yaml", recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def export_adapter(
    source: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    results: dict[str, Any] | None = None,
    command: str = "",
    notes: str = "",
    average_with: str | Path | None = None,
    average_weight: float = 0.5,
) -> Path:
    """Write ``out`` (config.json, adapter.safetensors, README.md, training_state.json) from a run.

    ``average_with`` (a run, checkpoint or adapter folder of the same shapes) exports the weight
    average ``(1 - average_weight) * source + average_weight * other`` instead: a "model soup" of
    two stages trained from the same start, said so on the card."""
    from blsp.models.hub import ADAPTER_WEIGHTS
    from blsp.models.modeling_blsp import write_adapter_folder
    from blsp.utils.io import atomic_write_json, atomic_write_text

    source, out = Path(source), Path(out)
    weights, run, progress = _weights_folder(source)
    try:
        config = json.loads((weights / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BlspError(f"{weights}: cannot read the adapter to export ({e})") from e
    state = _adapter_tensors(weights, "export")
    if average_with is not None:
        state = _average(state, weights, Path(average_with), average_weight)
        notes = (
            f"## Weight average\n\nThese weights are (1 - {average_weight:g}) x `{source}` + "
            f"{average_weight:g} x `{average_with}`, averaged tensor by tensor in fp32; the training "
            f"log and recipe below are those of the first.\n\n{notes}"
        )
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    for key in [k for k in config if k.startswith("ctc_")]:  # the CTC head is not exported
        config[key] = None
    write_adapter_folder(out, state, config)
    atomic_write_text(out / CARD, model_card(out.name, config, run, progress, results or {}, command, notes))
    atomic_write_json(out / STATE, {**progress, "command": command})
    for f in (ADAPTER_WEIGHTS, "config.json", CARD, STATE):
        (out / f).chmod(0o644)  # readable like any installed package file (temp files start 0600)
    return out
