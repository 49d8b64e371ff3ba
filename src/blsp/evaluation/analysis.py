"""Representation analysis of paper section 2, 5.2 and appendices A and D.

For each utterance and each Table 6 instruction (CW, SA, SR, ST), the prompt is built twice: with
the speech span and with its transcript. The representation is the final-layer hidden state of
the last prompt token (right before the response), read from the LLM with
``output_hidden_states=True``. From them:

- Tables 7/12: average cosine of the same speech across two instructions;
- Tables 8/13: average cosine of paired speech/text under one instruction, and beside it that
  cosine less the average over unpaired speech/text (clip ``i``, transcript ``j != i``): the raw
  cosine is high for any speech vector near the text region, even one that is the same for every
  clip, while the corrected one is then about 0;
- Figures 1/3: t-SNE of all representations (colour = instruction, shape = modality).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blsp.evaluation import metrics
from blsp.instructions import TABLE6
from blsp.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Representations:
    """``speech[key]`` and ``text[key]`` are ``[N, D]``; row ``i`` is utterance ``ids[i]``."""

    ids: list[str]
    speech: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def last_prompt_states(model: Any, conversations: Sequence[Any]) -> np.ndarray:
    """Final-layer hidden state of the last prompt token of each conversation, ``[B, D]`` float32."""
    import torch

    batch = model.collate([{"conversation": c} for c in conversations], padding_side="left")
    with torch.no_grad():
        embeds = model.embed_batch(batch)
        out = model.llm(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"].to(model.device),
            position_ids=batch["position_ids"].to(model.device),
            output_hidden_states=True,
            use_cache=False,
        )
    return out.hidden_states[-1][:, -1].float().cpu().numpy()


def extract_representations(
    model: Any,
    items: Sequence[dict[str, Any]],
    instructions: Mapping[str, str] = TABLE6,
    batch_size: int = 8,
) -> Representations:
    """Representations of every item (``audio`` + ``text``) under every instruction, both modalities.

    Items whose audio cannot be read or that have no transcript are skipped and listed.
    """
    from blsp.data.audio import load_audio
    from blsp.models.prompt import make_conversation

    ok: list[tuple[str, np.ndarray, str]] = []
    skipped: list[tuple[str, str]] = []
    for it in items:
        iid = str(it.get("id"))
        text = it.get("text")
        if not isinstance(text, str) or not text.strip():
            skipped.append((iid, "no transcript"))
            continue
        try:
            audio = (
                np.asarray(it["audio_array"], np.float32) if "audio_array" in it else load_audio(it["audio"])
            )
        except Exception as e:
            skipped.append((iid, f"{type(e).__name__}: {e}"))
            continue
        ok.append((iid, audio, text))
    speech: dict[str, list[np.ndarray]] = {k: [] for k in instructions}
    text_: dict[str, list[np.ndarray]] = {k: [] for k in instructions}
    for s in range(0, len(ok), batch_size):
        chunk = ok[s : s + batch_size]
        for key, instr in instructions.items():
            speech[key].append(
                last_prompt_states(model, [make_conversation(instr, audio=a) for _, a, _ in chunk])
            )
            text_[key].append(
                last_prompt_states(model, [make_conversation(instr, transcript=t) for _, _, t in chunk])
            )
    dim = int(getattr(model.config, "llm_dim", 0) or 0)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, 0) if parts else np.zeros((0, dim), np.float32)

    return Representations(
        ids=[i for i, _, _ in ok],
        speech={k: cat(v) for k, v in speech.items()},
        text={k: cat(v) for k, v in text_.items()},
        skipped=skipped,
    )


def representation_tables(reps: Representations) -> dict[str, Any]:
    """Tables 7/12 (``speech_cross_instruction``), 8/13 (``paired_speech_text``), the text analogue,
    and the baseline: ``unpaired_speech_text`` and ``paired_speech_text_corrected`` (paired - unpaired)."""
    return {
        "n": len(reps.ids),
        "speech_cross_instruction": metrics.cross_instruction_table(reps.speech),
        "text_cross_instruction": metrics.cross_instruction_table(reps.text),
        "paired_speech_text": metrics.paired_modality_table(reps.speech, reps.text),
        "unpaired_speech_text": metrics.unpaired_modality_table(reps.speech, reps.text),
        "paired_speech_text_corrected": metrics.corrected_modality_table(reps.speech, reps.text),
    }


def tables_to_markdown(tables: Mapping[str, Any], title: str = "") -> str:
    """Markdown of :func:`representation_tables` in the paper's layout."""
    lines = [f"## {title}" if title else "## Representation analysis", ""]
    lines.append(
        f"{tables.get('n', '?')} utterances; last prompt token, final layer; average cosine similarity."
    )
    lines.append("")
    for key, cap, suffix in (
        ("speech_cross_instruction", "Same speech under different instructions (paper Tables 7 / 12)", "-S"),
        ("text_cross_instruction", "Same transcript under different instructions", "-T"),
    ):
        tab = tables[key]
        keys = list(tab)
        lines.append(f"**{cap}**")
        lines.append("")
        lines.append("| | " + " | ".join(k + suffix for k in keys) + " |")
        lines.append("|" + "---|" * (len(keys) + 1))
        for a in keys:
            lines.append(f"| {a}{suffix} | " + " | ".join(f"{tab[a][b]:.3f}" for b in keys) + " |")
        lines.append("")
    paired = tables["paired_speech_text"]
    lines.append("**Paired speech / text under the same instruction (paper Tables 8 / 13)**")
    lines.append("")
    lines.append("| | " + " | ".join(paired) + " |")
    lines.append("|" + "---|" * (len(paired) + 1))
    for key, label in (
        ("paired_speech_text", "paired"),
        ("unpaired_speech_text", "unpaired (clip i, transcript j ≠ i)"),
        ("paired_speech_text_corrected", "paired − unpaired"),
    ):
        row = tables.get(key)
        if row is not None:
            lines.append(
                f"| {label} | "
                + " | ".join("–" if row.get(k) is None else f"{row[k]:.3f}" for k in paired)
                + " |"
            )
    lines.append("")
    lines.append(
        "`paired − unpaired` is about 0 when the speech representation does not depend on the clip "
        "(the raw paired cosine can still be high then)."
    )
    lines.append("")
    return "\n".join(lines)


def representation_analysis(
    model: Any,
    items: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    name: str = "model",
    instructions: Mapping[str, str] = TABLE6,
    highlight: int = 5,
    batch_size: int = 8,
    tsne: bool = True,
) -> dict[str, Any]:
    """Extract representations, write tables (JSON + Markdown), raw vectors (``.npz``) and a t-SNE PNG.

    Returns ``{"tables", "markdown", "png", "npz", "json", "skipped"}`` (paths as strings).
    """
    from blsp.evaluation.plots import plot_tsne

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reps = extract_representations(model, items, instructions, batch_size=batch_size)
    if not reps.ids:
        from blsp.errors import BlspError

        raise BlspError(f"representation analysis: no usable utterance (skipped: {reps.skipped[:3]})")
    tables = representation_tables(reps)
    stem = f"representations_{name}"
    npz = out_dir / f"{stem}.npz"
    np.savez_compressed(
        npz,
        ids=np.array(reps.ids),
        **{f"speech_{k}": v for k, v in reps.speech.items()},
        **{f"text_{k}": v for k, v in reps.text.items()},
    )
    md = tables_to_markdown(tables, title=f"Representation analysis: {name}")
    result: dict[str, Any] = {
        "name": name,
        "tables": tables,
        "markdown": md,
        "npz": str(npz),
        "skipped": reps.skipped,
        "png": None,
    }
    if tsne and len(reps.ids) >= 2:
        png = plot_tsne(
            reps.speech, reps.text, out_dir / f"tsne_{name}.png", title=f"t-SNE: {name}", highlight=highlight
        )
        result["png"] = str(png)
        md += f"\n![t-SNE of {name}]({png.name})\n"
        result["markdown"] = md
    atomic_write_json(out_dir / f"{stem}.json", {k: v for k, v in result.items() if k != "markdown"})
    atomic_write_text(out_dir / f"{stem}.md", md)
    result["json"] = str(out_dir / f"{stem}.json")
    return result


def item_cosines(npz: str | Path) -> dict[str, dict[str, float]]:
    """Per utterance, from a representation run's ``.npz``: ``paired`` (cosine of its speech and its
    transcript, mean over instructions) and ``cross`` (cosine of its speech under two different
    instructions, mean over pairs): the items that paired comparisons of two models resample."""
    from blsp.evaluation.metrics import unit_vectors

    with np.load(npz) as z:
        ids = [str(i) for i in z["ids"]]
        names = sorted(k[len("speech_") :] for k in z.files if k.startswith("speech_"))
        speech = {k: unit_vectors(z[f"speech_{k}"]) for k in names}
        text = {k: unit_vectors(z[f"text_{k}"]) for k in names if f"text_{k}" in z.files}
    paired = np.mean([(speech[k] * text[k]).sum(-1) for k in text], axis=0) if text else None
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    cross = np.mean([(speech[a] * speech[b]).sum(-1) for a, b in pairs], axis=0) if pairs else None
    return {
        "paired": {} if paired is None else dict(zip(ids, map(float, paired), strict=True)),
        "cross": {} if cross is None else dict(zip(ids, map(float, cross), strict=True)),
    }
