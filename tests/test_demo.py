"""``blsp demo`` end to end on a really tiny run, its report checked against the JSON outputs.

Every step runs for real as the CLI subprocesses the demo launches (TTS with espeak-ng, behavior
generation, the four trainings, evaluation of every system, representation analysis, report) with
the ``tiny`` preset (8 sentences, 2 steps per recipe, 3 items per task). The models are the tiny
random Whisper + Llama of ``tests/conftest.py`` (``--encoder/--llm``): with the bundled whisper-base
+ SmolLM2-135M the same run takes ~12 minutes on 2 cores (evaluation of 6 systems dominates), too
slow for CI. The Whisper+LLM cascade cannot run on the random Whisper (it has no tokenizer), so the
report shows it as an error, which is checked too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blsp import demo

pytestmark = pytest.mark.slow

SECTIONS = (
    "## Machine",
    "## Steps",
    "## Data",
    "## Training",
    "## Evaluation",
    "## Representation analysis",
    "## The paper's findings, checked on this run",
)
NUM = re.compile(r"^-?\d+(?:\.\d+)?$")
CELL = re.compile(r"^-?\d+(?:\.\d+)?( \[-?\d+(?:\.\d+)?, -?\d+(?:\.\d+)?\])?$")


@pytest.fixture(scope="module")
def tiny_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    root = tmp_path_factory.mktemp("demo")
    models = ["--encoder", str(tiny_dirs["whisper"]), "--llm", str(tiny_dirs["llm"])]
    proc = subprocess.run(
        [sys.executable, "-m", "blsp.cli", "demo", "--preset", "tiny", "--out", "tiny", *models],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return root / "tiny", proc


def _numbers(obj: object, acc: list[float]) -> list[float]:
    if isinstance(obj, bool):
        return acc
    if isinstance(obj, (int, float)):
        acc.append(float(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            _numbers(v, acc)
    elif isinstance(obj, list):
        for v in obj:
            _numbers(v, acc)
    return acc


def _matches(token: str, values: list[float]) -> bool:
    d = len(token.split(".")[1]) if "." in token else 0
    return any(f"{v:.{d}f}" == token for v in values)


def _tables(md: str) -> dict[str, list[list[str]]]:
    """Body rows (header and separator dropped) of every table, keyed by its ``## `` section."""
    out: dict[str, list[list[str]]] = {}
    section, in_table, header_seen = "", False, 0
    for line in md.splitlines():
        if line.startswith("## "):
            section = line
        if line.startswith("|"):
            header_seen += 1
            if header_seen > 2:  # skip header + separator
                out.setdefault(section, []).append([c.strip() for c in line.strip().strip("|").split("|")])
            in_table = True
        elif in_table:
            in_table, header_seen = False, 0
    return out


def test_tiny_demo_report(tiny_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = tiny_run
    assert (out / "report.md").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads((out / "steps.json").read_text())
    assert proc.returncode == 0, json.dumps(
        {k: v.get("log_tail") for k, v in steps["steps"].items() if v.get("status") != "ok"}, indent=1
    )
    assert set(steps["steps"]) == {s.name for s in demo.build_steps(out, demo.PRESETS["tiny"])}
    assert steps["models"]["llm"].endswith("llm")
    assert all(s["status"] == "ok" and s["wall_s"] >= 0 for s in steps["steps"].values())
    md = (out / "report.md").read_text()
    for sec in SECTIONS:
        assert sec in md, sec
    assert "Not available" not in md and "**not checked**" not in md

    # every number in a table comes from the JSON outputs (or, for the data table, the manifests)
    sources = [out / "steps.json", out / "eval" / "results.json", *sorted((out / "repr").glob("*.json"))]
    sources += sorted((out / "runs").glob("*/summary.json"))
    values = [v for p in sources for v in _numbers(json.loads(p.read_text()), [])]
    counts = [
        float(sum(1 for ln in p.read_text().splitlines() if ln.strip()))
        for p in [*out.glob("data/**/*.jsonl"), *out.glob("testsets/*/test.jsonl")]
    ]
    tables = _tables(md)
    assert {"## Evaluation", "## Training", "## Data"} <= set(tables)
    checked = 0
    for section, rows in tables.items():
        pool = counts if section == "## Data" else values
        for row in rows:
            for cell in row:
                for token in cell.replace("[", " / ").replace("]", "").replace(",", " / ").split(" / "):
                    token = token.strip()
                    if NUM.match(token):
                        checked += 1
                        assert _matches(token, pool), f"{section}: {token!r} in {row} is not in the outputs"
    assert checked > 50
    # the evaluation table has a row per system and real numbers for the trained systems
    eval_rows = {r[0]: r for r in tables["## Evaluation"]}
    trained_here = {v for k, v in demo.SYSTEMS.items() if k != "shipped"}
    assert trained_here <= set(eval_rows)
    assert demo.SYSTEMS["shipped"] not in eval_rows  # the tiny models are not the shipped adapter's
    for name in ("BLSP", "BLSP+RP", "ASR pretraining", "BLSP (KL)", "Text+LLM"):
        # a value and its 95 % interval: "12.5 [0.0, 33.3]"
        assert all(CELL.match(c) for c in eval_rows[name][1:]), eval_rows[name]
    speech_rows = {r[0]: r for r in tables["## Does the model use the speech?"]}
    assert {demo.SYSTEMS[n] for n in (*demo.WARM, "blsp_scratch")} <= set(speech_rows)
    assert "Do the adapters this run trained from its own warm start use the speech" in md
    # the random Whisper has no tokenizer: every answer of the cascade fails, and the table says so
    assert all("error" in c or "3 of 3 failed" in c for c in eval_rows["Whisper+LLM"][1:])

    # the plots: relative links to valid PNG files
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    # loss curves, the repository's measured learning curve, two t-SNE pictures
    assert len(links) == 4 and {"training_loss.png", "learning_curve.png"} <= set(links)
    for link in links:
        data = (out / link).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 1000

    # a rerun skips every step (same models, so the same commands)
    models = ["--encoder", steps["models"]["encoder"], "--llm", steps["models"]["llm"]]  # done-markers
    rerun = subprocess.run(
        [sys.executable, "-m", "blsp.cli", "demo", "--preset", "tiny", "--out", str(out), *models],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("skipped") == len(steps["steps"])
    assert all(
        s.get("skipped_on_rerun") for s in json.loads((out / "steps.json").read_text())["steps"].values()
    )
