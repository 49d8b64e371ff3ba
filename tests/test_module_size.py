"""A module under ``src/`` longer than 500 lines says why at its top (issue 13), or it is split."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LIMIT = 500
REASON = "Longer than 500 lines because"

ALLOWED: set[str] = set()  # modules exempt from the rule (none)


def test_long_modules_state_why():
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n") + 1
        rel = path.relative_to(SRC).as_posix()
        if lines <= LIMIT or rel in ALLOWED:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if REASON not in doc:
            missing.append(f"{rel}: {lines} lines")
    assert not missing, f"split these, or start a paragraph of the docstring with {REASON!r}:\n" + "\n".join(
        missing
    )
