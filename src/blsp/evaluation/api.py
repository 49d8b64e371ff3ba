"""One-call evaluation from spec strings (what ``blsp eval`` and the demo use)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def evaluate(
    systems: Sequence[str],
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    testsets: str | Path | None = None,
    shared_data: str | Path | None = None,
    limit: int | None = None,
    base: str | None = None,
    encoder: str | None = None,
    llm: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    loop_guard: bool = True,
    judge: str | Any = None,
    judge_api_key: str | None = None,
    retry_failed: bool = False,
    share_models: bool = True,
) -> dict[str, Any]:
    """Evaluate ``systems`` (``[NAME=]KIND[:ARG]`` specs, see
    :func:`blsp.evaluation.system_specs.parse_system_specs`) on ``tasks`` (``NAME[@TESTSET]`` specs, see
    :mod:`blsp.evaluation.tasks`); writes ``results.json``, ``results.md`` and per-utterance outputs
    in ``out_dir`` and returns the results dict. ``judge`` is a judge spec or object (QA only).
    ``share_models=False`` loads the encoder and LLM again for every adapter folder (benchmarks).
    """
    from blsp.evaluation.judge import make_judge
    from blsp.evaluation.runner import run_eval
    from blsp.evaluation.system_specs import parse_system_specs
    from blsp.evaluation.testsets import make_tasks

    task_objs = make_tasks(tasks, root=testsets, shared=shared_data, limit=limit)
    system_objs = parse_system_specs(
        systems, base=base, encoder=encoder, llm=llm, device=device, share_models=share_models
    )
    judge_obj = make_judge(judge, api_key=judge_api_key) if isinstance(judge, str) or judge is None else judge
    return run_eval(
        system_objs,
        task_objs,
        out_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        loop_guard=loop_guard,
        judge=judge_obj,
        retry_failed=retry_failed,
    )
