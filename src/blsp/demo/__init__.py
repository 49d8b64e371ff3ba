"""``blsp demo``: the whole BLSP pipeline on the embedded default, end to end, and a report.

Steps (each a subprocess of the ``blsp`` CLI, so the report's commands are exactly what ran):
synthesise the training corpus from the package's sentences, build the held-out-voice test sets,
generate continuation behaviors (step 1), build the repetition set and the 1:9 mix (BLSP+RP),
train the alignment warm start (CTC against the LLM's token embeddings, the ``align_ctc`` recipe),
train BLSP (CE), BLSP+RP, the ASR-pretraining baseline and BLSP with the KL objective from it and
BLSP once from scratch, evaluate every system on every task the bundled LLM can do (with the
matched/shuffled speech check), analyse representations, and write ``DIR/report.md`` (tables,
plots, machine, wall time and command of each step, the paper's four findings checked with the
numbers of this run).

Resumable: a step whose done-marker (``DIR/.done/<step>.json``) and outputs exist is skipped;
``--force STEP`` reruns it. ``DIR/steps.json`` records status, wall time and command of each step.

Modules: :mod:`~blsp.demo.presets` (settings as data), :mod:`~blsp.demo.steps` (the step graph),
:mod:`~blsp.demo.runner` (subprocesses, resuming, ``steps.json``), :mod:`~blsp.demo.report`
(``report.md``, machine info), :mod:`~blsp.demo.cli` (``blsp demo``).
"""

from __future__ import annotations

from blsp.demo.presets import (
    DEFAULT_ENCODER,
    DEFAULT_LLM,
    EVAL_PARAMS,
    EVAL_STEPS,
    EVAL_TASKS,
    PRESETS,
    RECIPES,
    SYSTEMS,
    TESTSETS,
    USES_SPEECH_NATS,
    WARM,
)
from blsp.demo.report import machine_info, speech_use_section, write_report
from blsp.demo.runner import run_pipeline
from blsp.demo.steps import Step, build_steps, display_path, write_sentences

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_LLM",
    "EVAL_PARAMS",
    "EVAL_STEPS",
    "PRESETS",
    "RECIPES",
    "SYSTEMS",
    "EVAL_TASKS",
    "TESTSETS",
    "USES_SPEECH_NATS",
    "WARM",
    "Step",
    "display_path",
    "speech_use_section",
    "build_steps",
    "machine_info",
    "run_pipeline",
    "write_report",
    "write_sentences",
]
