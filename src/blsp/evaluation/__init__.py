"""Evaluation of BLSP and its baselines (paper section 5, appendices A-D).

Python API (also used by ``blsp eval`` and the demo)::

    from blsp.evaluation import evaluate, run_eval, results_to_markdown
    results = evaluate(["blsp:runs/adapter", "text", "whisper"], ["asr", "st:de", "sentiment"], "runs/eval")

    from blsp.evaluation import representation_analysis, progress_curve

Heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "run_eval": "blsp.evaluation.runner",
    "results_to_markdown": "blsp.evaluation.markdown",
    "evaluate": "blsp.evaluation.api",
    "representation_analysis": "blsp.evaluation.analysis",
    "extract_representations": "blsp.evaluation.analysis",
    "progress_curve": "blsp.evaluation.progress",
    "make_task": "blsp.evaluation.tasks",
    "make_tasks": "blsp.evaluation.testsets",
    "load_testset": "blsp.evaluation.testsets",
    "build_testset": "blsp.evaluation.testsets",
    "parse_system_specs": "blsp.evaluation.system_specs",
    "BlspSystem": "blsp.evaluation.systems",
    "TextSystem": "blsp.evaluation.systems",
    "CascadeSystem": "blsp.evaluation.systems",
    "ModelHandle": "blsp.evaluation.systems",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blsp.evaluation' has no attribute {name!r}")


__all__ = sorted(_LAZY)
