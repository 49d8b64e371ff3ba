"""docs/ARCHITECTURE.md's package map names every module of ``src/blsp`` under its package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_PACKAGES = {"blsp.recipes", "blsp.resources"}  # package data: described in one sentence


def package_sections() -> dict[str, str]:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    start = doc.index("## Package map")
    end = doc.index("\n## ", start + 1)
    parts = re.split(r"\n\*\*`(blsp(?:\.\w+)*)`\*\*", doc[start:end])
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_the_package_map_names_every_module():
    sections = package_sections()
    missing = []
    for path in sorted((ROOT / "src" / "blsp").rglob("*.py")):
        parts = path.relative_to(ROOT / "src").parts
        package, name = ".".join(parts[:-1]), parts[-1]
        if package in DATA_PACKAGES or (name == "__init__.py" and package != "blsp"):
            continue
        text = sections.get(package, "")
        if not re.search(r"`[^`\n]*\b" + re.escape(name) + r"\b[^`\n]*`", text):
            missing.append(f"{package}: {name}")
    assert not missing, "add a line to the package map of docs/ARCHITECTURE.md for:\n" + "\n".join(missing)
