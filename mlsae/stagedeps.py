"""The ``mlsae/`` files each DVC stage depends on, derived from what its notebook imports.

DVC reruns a stage when a declared dependency changes, so a stage must declare every module it
imports and nothing more: a missing one hides a change, an extra one reruns the stage for
changes it never sees. This module reads each stage's notebook (the ``.ipynb`` in its ``cmd``),
collects the ``mlsae`` modules its code cells import, closes that set over the modules' own
imports (function-local ones included), and adds the package ``__init__`` files and any data
file a module names (``explorer_page.html``). ``python -m mlsae deps`` prints the lists, and
``--write`` puts them into ``dvc.yaml`` (other dependencies, comments and order kept).
`tests/test_stage_deps.py` holds ``dvc.yaml`` equal to them and the import graph acyclic.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """``mlsae.a.b`` -> ``mlsae/a/b.py`` or ``mlsae/a/b/__init__.py`` (None if neither)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imported_modules(tree: ast.AST, root: Path = ROOT) -> set[str]:
    """``mlsae`` modules an AST imports anywhere, function-local imports included.

    ``from mlsae import x`` counts ``mlsae.x`` when ``x`` is a module, and ``mlsae`` itself.
    """
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            names += [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "mlsae" and module_file(name, root) is not None:
                found.add(name)
    return found


def module_imports(name: str, root: Path = ROOT) -> set[str]:
    """The ``mlsae`` modules that module ``name`` imports, its parent packages included."""
    path = module_file(name, root)
    found = imported_modules(ast.parse(path.read_text()), root)
    parts = name.split(".")
    found |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return found - {name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every module of the package."""
    names = []
    for path in sorted((root / "mlsae").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return {name: module_imports(name, root) for name in names}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None.

    A module's parent package is loaded before it, not imported by it: that edge is skipped.
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if node.startswith(dep + "."):
                continue  # a module's parent package is loaded first, not imported by it
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def closure(names: set[str], root: Path = ROOT) -> set[str]:
    """``names`` and every ``mlsae`` module they import, directly or not."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += module_imports(name, root) - seen
    return seen


def data_files(path: Path) -> set[Path]:
    """Files beside module ``path`` that its source names in a string literal."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        value = node.value if isinstance(node, ast.Constant) else None
        if isinstance(value, str) and re.fullmatch(r"[\w.-]+\.\w+", value):
            candidate = path.parent / value
            if candidate.suffix != ".py" and candidate.is_file():
                out.add(candidate)
    return out


def notebook_deps(notebook: str | Path, root: Path = ROOT) -> list[str]:
    """The ``mlsae/`` files (relative to ``root``) that running ``notebook`` imports or reads."""
    cells = json.loads((root / notebook).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    modules = closure(imported_modules(ast.parse(code), root), root)
    files = {module_file(m, root) for m in modules}
    files |= {f for path in list(files) for f in data_files(path)}
    return sorted(f.relative_to(root).as_posix() for f in files)


def stage_notebook(cmd: str) -> str | None:
    """The source notebook a stage runs: the first ``.ipynb`` argument of its ``cmd``."""
    found = [w for w in cmd.split() if w.endswith(".ipynb")]
    return found[0] if found else None


def expected_deps(root: Path = ROOT) -> dict[str, list[str]]:
    """``{stage name in dvc.yaml: its mlsae/ files}`` for every stage that runs a notebook."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        notebook = stage_notebook(body["cmd"])
        if notebook:
            out[name] = notebook_deps(notebook, root)
    return out


def write_dvc_yaml(root: Path = ROOT) -> list[str]:
    """Replace each stage's ``mlsae/`` deps in dvc.yaml by `expected_deps`.

    Returns the stages whose lists changed.
    """
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never wrap a line (the papermill command)
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    doc = yaml.load(path.read_text())
    changed = []
    for name, files in expected_deps(root).items():
        body = doc["stages"][name].get("do", doc["stages"][name])
        deps = body["deps"]
        old = [d for d in deps if isinstance(d, str) and d.startswith("mlsae/")]
        if old != files:
            changed.append(name)
        keep = [d for d in deps if not (isinstance(d, str) and d.startswith("mlsae/"))]
        deps.clear()
        deps.extend(keep + files)
    with path.open("w") as f:
        yaml.dump(doc, f)
    return changed
