"""Import hygiene of ``src/blsp``: no cycle among top-level imports, no private name imported across modules.

Read with ``ast`` (nothing is imported), so the test is cheap and says which line breaks a rule.
A top-level import is one in a module's body (also under a top-level ``if``/``try``, not under
``if TYPE_CHECKING:``); imports inside functions are deferred, and must not close a cycle either. A private name
is one with a single leading underscore (``_name``; ``__dunder__`` names are not private).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# (importing module, module imported from, name): private imports let through (none).
ALLOWED_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def modules() -> dict[str, tuple[Path, bool]]:
    """``blsp.x.y`` -> (its file, whether it is a package's ``__init__``)."""
    out = {}
    for path in sorted((SRC / "blsp").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def source_of(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` (relative ones resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def top_level_imports(stmts: list[ast.stmt]):
    for s in stmts:
        if isinstance(s, ast.Import | ast.ImportFrom):
            yield s
        elif isinstance(s, ast.If):
            if "TYPE_CHECKING" in ast.unparse(s.test):
                continue
            yield from top_level_imports(s.body)
            yield from top_level_imports(s.orelse)
        elif isinstance(s, ast.Try):
            yield from top_level_imports(s.body)
            for h in s.handlers:
                yield from top_level_imports(h.body)
            yield from top_level_imports(s.orelse)
            yield from top_level_imports(s.finalbody)


def private_imports() -> dict[tuple[str, str, str], str]:
    """Every ``from blsp.x import _name`` in another module than ``blsp.x`` -> ``file:line``."""
    mods = modules()
    found = {}
    for module, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            src = source_of(module, is_pkg, node)
            if src.split(".")[0] != "blsp" or src == module:
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__") and f"{src}.{name}" not in mods:
                    found[(module, src, name)] = f"{path.relative_to(SRC.parent)}:{node.lineno}"
    return found


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the blsp modules its top-level imports name (a submodule when one is imported);
    with ``deferred``, its imports inside functions too (``TYPE_CHECKING`` ones stay out)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = list(top_level_imports(tree.body))
        if deferred:
            nodes += [
                n
                for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                for n in ast.walk(f)
                if isinstance(n, ast.Import | ast.ImportFrom)
            ]
        for node in nodes:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                src = source_of(module, is_pkg, node)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            graph[module].update(t for t in targets if t in mods and t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_checks_see_the_package():
    graph = import_graph()
    assert "blsp.serving.server" in graph and "blsp.serving.openai_api" in graph["blsp.serving.server"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    pipe = "blsp.inference.transformers_pipeline"  # imported inside a function of blsp.models.auto
    assert pipe not in graph["blsp.models.auto"] and pipe in import_graph(deferred=True)["blsp.models.auto"]


def test_no_import_cycle_among_top_level_imports():
    found = cycles(import_graph())
    assert not found, (
        "top-level import cycles (defer one import into the function that needs it):\n"
        + "\n".join(" <-> ".join(c) for c in found)
    )


def test_no_import_cycle_even_through_deferred_imports():
    found = cycles(import_graph(deferred=True))
    assert not found, (
        "import cycles through imports inside functions (move the shared name to the lower module):\n"
        + "\n".join(" <-> ".join(c) for c in found)
    )


def test_no_private_name_is_imported_across_modules():
    found = {k: v for k, v in private_imports().items() if k not in ALLOWED_PRIVATE_IMPORTS}
    assert not found, (
        "private names imported from another module (make them public or keep them home):\n"
        + "\n".join(
            f"{where}: {imp} imports {name} from {src}" for (imp, src, name), where in sorted(found.items())
        )
    )


def test_cli_help_does_not_import_torch():
    """`blsp --help` builds every subcommand's parser; none of them may pull in torch (3 s on a laptop)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom blsp.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
