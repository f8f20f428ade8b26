"""The shape of the house, read from the source (ast): no import cycle among our modules (function-local imports
count: a cycle hidden inside a function is still a cycle), the config schema imports nothing of ours, Ray is
imported only in sweep/ and the trainable's adapter, and sweep/ never names a task (the task seam)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sweep", "trainable", "search_spaces")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports, anywhere in the file."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_our_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 20 and any(graph.values())  # the graph was really read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_config_schema_imports_nothing_of_ours():
    modules = _modules()
    assert _imports("trainable.config", modules["trainable.config"], modules) == set()


def test_ray_is_imported_only_in_sweep_and_the_adapter():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("sweep") or name == "trainable.adapter":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {m}" for m in mods if m == "ray" or m.startswith("ray.")]
    assert offenders == []


def task_names_in_sweep(root: Path) -> list[str]:
    """Where sweep/ names a built-in task: a string other than a docstring that is a task's name or says "classify"
    (the default task is `trainable.tasks.DEFAULT_TASK`), or an import of a task's own module. Each is a place
    where the sweep would know which task it runs."""
    import re

    from trainable.tasks import BUILTIN

    found = []
    for path in sorted((root / "sweep").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in BUILTIN or re.search(r"\bclassify\b", node.value):
                    found.append((rel, node.lineno, repr(node.value)))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names])
                found += [(rel, node.lineno, f"import {m}") for m in mods
                          if m.split(".")[:3] in (["trainable", "tasks", t] for t in BUILTIN)]
    return [f"{rel}:{line}: {what}" for rel, line, what in sorted(found)]


def test_sweep_never_names_a_task():
    """The task seam (issue 20): the sweep takes everything task-specific from the `Task` it loaded, so nothing in
    sweep/ compares with a task's name, defaults to one, or imports a task's module."""
    assert task_names_in_sweep(ROOT) == []


def test_the_task_name_scan_sees_a_branch_and_an_import(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "a.py").write_text(
        '"""Exports: the classify task\'s student (a docstring may say so)."""\n'
        "from trainable.tasks.classify import load_runtime\n"
        "from trainable.tasks import DEFAULT_TASK\n\n\n"
        "def f(cfg):\n"
        '    """For classify: more."""\n'
        '    if cfg.task != "classify":\n'
        '        raise ValueError(f"auto sizes the classify task\'s students, not {cfg.task}")\n'
        '    return cfg.get("task", "lm")\n')
    assert task_names_in_sweep(tmp_path) == [
        "sweep/a.py:2: import trainable.tasks.classify", "sweep/a.py:2: import trainable.tasks.classify.load_runtime",
        "sweep/a.py:8: 'classify'", "sweep/a.py:9: \"auto sizes the classify task's students, not \"",
        "sweep/a.py:10: 'lm'"]
