"""The training recipes shipped with blsp: ``blsp/recipes/NAME.yaml`` and ``accelerate/NAME.yaml``.

A recipe is named by its file stem (``blsp train blsp_default``) or given as a path to any YAML
file (``blsp train path/to/x.yaml``). The accelerate configs (``accelerate/ddp`` ...) are passed to
``accelerate launch --config_file``, so they are reached by path: ``blsp train --path accelerate/ddp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blsp.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """One shipped YAML file: its name (``blsp``, ``accelerate/ddp``), path and first comment line."""

    name: str
    path: Path
    summary: str


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_recipes(accelerate: bool = False) -> list[Recipe]:
    """The shipped training recipes (or, with ``accelerate``, the accelerate configs), by name."""
    folder = RECIPES_DIR / "accelerate" if accelerate else RECIPES_DIR
    prefix = "accelerate/" if accelerate else ""
    return [Recipe(prefix + p.stem, p, _summary(p)) for p in sorted(folder.glob("*.yaml"))]


def recipe_path(ref: str | Path) -> Path:
    """A recipe reference as a file: an existing path as is, else the shipped recipe of that name.

    ``blsp``, ``blsp.yaml`` and ``accelerate/ddp`` name shipped files; anything else must exist.
    """
    path = Path(ref)
    if path.is_file():
        return path
    name = str(ref).removesuffix(".yaml")
    shipped = RECIPES_DIR / f"{name}.yaml"
    if name and ".." not in Path(name).parts and not path.is_absolute() and shipped.is_file():
        return shipped
    known = ", ".join(r.name for r in list_recipes())
    stem = Path(name).name
    hint = f" (the shipped recipe: {stem!r})" if (RECIPES_DIR / f"{stem}.yaml").is_file() else ""
    raise ConfigError(f"{ref}: config file not found, nor a shipped recipe{hint}; shipped: {known}")
