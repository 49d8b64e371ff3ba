"""The demo's step graph: each step a ``blsp`` command line, its outputs and the steps it needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blsp.demo.presets import DEFAULT_ENCODER, DEFAULT_LLM, EVAL_TASKS, RECIPES, SYSTEMS, TESTSETS, WARM


@dataclass
class Step:
    """One pipeline step: a CLI command (or ``None`` for the in-process report) and its outputs."""

    name: str
    title: str
    argv: list[str] | None
    outputs: list[Path]
    needs: list[str] = field(default_factory=list)
    func: Callable[[], None] | None = None


def display_path(p: Path) -> str:
    """``p`` relative to the working folder when it is below it, else absolute (for commands and logs)."""
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(Path(p).resolve()) if rel.startswith("..") else rel


def build_steps(
    out: Path, p: dict[str, Any], encoder: str = DEFAULT_ENCODER, llm: str = DEFAULT_LLM
) -> list[Step]:
    """The pipeline for preset ``p`` writing under ``out`` (models: the recipes' default unless given)."""
    cli = ["blsp"]
    data, runs = out / "data", out / "runs"
    speech = data / "speech" / "train.jsonl"
    cont, rep, mix = (
        data / "behaviors" / f for f in ("continuation.jsonl", "repetition.jsonl", "mix_rp.jsonl")
    )
    ts = out / "testsets"
    cache = out / "cache" / "encoder"
    r = display_path
    steps = [
        Step(
            "synth",
            "Synthesise the training corpus (TTS of the embedded sentences)",
            cli
            + ["data", "synth", r(data / "sentences.txt"), r(data / "speech"), "--voices", *p["voices"]]
            + ["--voices-per-text", str(p["voices_per_text"]), "--workers", str(p["workers"]), "--seed", "0"],
            [speech],
        ),
        Step(
            "testsets",
            "Build the test sets (held-out voices)",
            cli
            + ["eval", "sets", "build", *TESTSETS, "--testsets", r(ts), "--n", str(p["eval_items"])]
            + ["--workers", str(p["workers"])],
            [ts / t / "test.jsonl" for t in TESTSETS],
        ),
        Step(
            "behave",
            "Step 1: continuation behaviors from the LLM given the transcripts",
            cli
            + ["behave", r(speech), r(cont), "--behavior", "continuation", "--echo", p["echo"]]
            + ([] if llm == DEFAULT_LLM else ["--model", llm])
            + ["--max-new-tokens", str(p["behavior_max_new_tokens"]), "--device", "cpu"],
            [cont],
            ["synth"],
        ),
        Step(
            "repetition",
            "Repetition behavior (response = transcript)",
            cli + ["behave", r(speech), r(rep), "--behavior", "repetition"],
            [rep],
            ["synth"],
        ),
        Step(
            "mix",
            "Mix repetition : continuation = 1 : 9 (BLSP+RP)",
            # absolute paths: `data mix` keeps cwd-relative audio paths of relative inputs as they are
            cli
            + [
                "data",
                "mix",
                "-o",
                str(mix.resolve()),
                f"{cont.resolve()}:9",
                f"{rep.resolve()}:1",
                "--seed",
                "0",
            ],
            [mix],
            ["behave", "repetition"],
        ),
    ]

    def budget(steps: int, batch: int, micro: int) -> list[str]:
        return [
            f"train.max_steps={steps}",
            "train.epochs=1000",
            f"train.global_batch_size={batch}",
            f"train.micro_batch_size={micro}",
            f"run.save_every={steps}",
            f"run.log_every={max(1, steps // 25)}",
        ]

    common = [
        "train.device=cpu",
        f"data.encoder_cache={r(cache)}",
        "run.eval_every=1000000",
        "run.tensorboard=false",
        "run.progress=false",
    ]
    behavior = [
        *budget(p["train_steps"], p["batch_size"], p["micro_batch_size"]),
        f"train.lr={p['lr']}",
        f"train.warmup_steps={p['warmup_steps']}",
    ]
    ctc = budget(p["ctc_steps"], p["ctc_batch_size"], p["ctc_batch_size"])
    ctc += p.get("ctc_sets", [])
    warm = f"model.init_from={r(runs / 'align_ctc' / 'final')}"
    train_data = {
        "align_ctc": [f"data.train.0.path={r(speech)}", *ctc],
        "blsp": [f"data.train.0.path={r(cont)}"],
        "blsp_kl": [f"data.train.0.path={r(cont)}"],
        "blsp_rp": [f"data.train=[{{path: {r(mix)}, task: behavior}}]"],
        "asr_pretrain": [f"data.train.0.path={r(speech)}"],
        "blsp_scratch": [f"data.train.0.path={r(cont)}", "model.init_from=null"],
    }
    for name in WARM:
        train_data[name] += [warm, *behavior]
    train_data["blsp_scratch"] += behavior
    needs = {
        "align_ctc": ["synth"],
        "blsp": ["behave", "train_align_ctc"],
        "blsp_kl": ["behave", "train_align_ctc"],
        "blsp_rp": ["mix", "train_align_ctc"],
        "asr_pretrain": ["train_align_ctc"],
        "blsp_scratch": ["behave"],
    }
    titles = {
        "align_ctc": "Alignment warm start: CTC against the LLM's token embeddings (no LLM forward)",
        "blsp": "Train BLSP (continuation, cross-entropy)",
        "blsp_rp": "Train BLSP+RP (repetition : continuation = 1 : 9)",
        "asr_pretrain": "Train the ASR-pretraining baseline",
        "blsp_kl": "Train BLSP with the KL objective (same steps as CE)",
        "blsp_scratch": "Train BLSP from scratch (no warm start; same steps as BLSP)",
    }
    for name, recipe in RECIPES.items():
        sets = [*train_data[name], f"run.output_dir={r(runs / name)}", *common]
        if encoder != DEFAULT_ENCODER:
            sets.append(f"model.encoder={encoder}")
        if llm != DEFAULT_LLM:
            sets.append(f"model.llm={llm}")
        argv = cli + ["train", recipe]
        for s in sets:
            argv += ["--set", s]
        steps.append(
            Step(
                f"train_{name}",
                titles[name],
                argv,
                [runs / name / "final", runs / name / "summary.json"],
                needs[name],
            )
        )
    ev = cli + ["eval"]
    for sname in SYSTEMS:
        if sname == "shipped":
            # the pretrained adapter beside what the demo trains, when the demo runs its models
            if (encoder, llm) == (DEFAULT_ENCODER, DEFAULT_LLM):
                ev += ["-s", "shipped=blsp:blsp-base"]
        elif sname == "text_llm":
            ev += ["-s", "text_llm=text"]
        elif sname == "whisper_llm":
            ev += ["-s", f"whisper_llm=whisper:{encoder}"]
        elif sname not in RECIPES:
            raise AssertionError(f"demo system {sname!r} has no recipe")
        else:
            kind = "asr-pretrain" if sname == "asr_pretrain" else "blsp"
            ev += ["-s", f"{sname}={kind}:{r(runs / sname / 'final')}"]
    ev += ["--base", r(runs / "blsp" / "final")]
    for t in EVAL_TASKS:
        ev += ["-t", t]
    ev += ["--testsets", r(ts), "--limit", str(p["eval_items"]), "--out", r(out / "eval")]
    ev += ["--max-new-tokens", str(p["eval_max_new_tokens"]), "--batch-size", "8", "--device", "cpu"]
    steps.append(
        Step(
            "eval",
            "Evaluate every system on every task",
            ev,
            [out / "eval" / "results.json"],
            ["testsets", *(f"train_{n}" for n in RECIPES if n in SYSTEMS)],
        )
    )
    rp = cli + ["eval", "repr"]
    for n in ("asr_pretrain", "blsp"):
        rp += ["-m", f"{n}={r(runs / n / 'final')}"]
    rp += ["--testset", "tts-asr-en", "--testsets", r(ts), "--limit", str(p["repr_items"])]
    rp += ["--out", r(out / "repr"), "--device", "cpu", "--highlight", str(min(5, p["repr_items"]))]
    steps.append(
        Step(
            "repr",
            "Representation analysis (ASR pretraining vs BLSP)",
            rp,
            [out / "repr" / "representations_asr_pretrain.json", out / "repr" / "representations_blsp.json"],
            ["testsets", "train_asr_pretrain", "train_blsp"],
        )
    )
    return steps


def write_sentences(path: Path, n: int) -> None:
    """The first ``n`` embedded training sentences, one a line."""
    from importlib import resources

    from blsp.utils.io import atomic_write_text

    text = resources.files("blsp.resources").joinpath("sentences/train.txt").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")][:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
