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


# Libraries slow enough to load that a command which may not need them imports them inside a function. A dotted name
# is a part of a library its top level does not load (torch.utils.tensorboard loads tensorboard).
HEAVY = {"ray", "optuna", "optuna_dashboard", "torch", "torch.utils.tensorboard", "transformers", "tokenizers",
         "safetensors", "sklearn", "scipy", "matplotlib", "tensorboard", "numpy", "pyarrow", "pyarrow.compute",
         "pandas", "onnx", "onnxruntime", "kiwipiepy", "pydantic", "yaml", "huggingface_hub"}
# The modules whose function-local imports are held to the rule below (issue 20 item 3).
LOCAL_IMPORT_SCOPE = ("trainable", "search_spaces", "sweep")


def _heavy(name: str) -> str | None:
    """The HEAVY library (its longest dotted name) that importing `name` loads, if any."""
    hits = [h for h in HEAVY if name == h or name.startswith(h + ".")]
    return max(hits, key=len) if hits else None


def light_local_imports(root: Path, scope: tuple[str, ...]) -> list[str]:
    """Function-local imports in `scope` that load nothing the module's top level does not already load: neither a
    HEAVY library nor a module of ours whose top level (transitively) loads one the importing module's does not.
    Such an import only hides the module's dependencies; it belongs at the top, unless it breaks an import cycle,
    which its line says with a `# (local: ...)` comment."""
    modules = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py") if (root / pkg).is_dir() else ():
            parts = list(path.relative_to(root).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def ours(n: str) -> str | None:
        while n and n not in modules:
            n = n.rpartition(".")[0]
        return n or None

    top, local, lines = {}, {}, {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        text = path.read_text(encoding="utf-8")
        lines[name] = text.splitlines()
        top[name], local[name] = set(), []

        def walk(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # never runs
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    if isinstance(child, ast.Import):
                        names = [a.name for a in child.names]
                    else:
                        base = ".".join(package[:len(package) - child.level + 1] + ([child.module] if child.module
                                                                                     else [])) \
                            if child.level else child.module
                        names = [base] + [f"{base}.{a.name}" for a in child.names]
                    if in_function:
                        local[name].append((child, names))
                    else:
                        top[name].update(names)
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        walk(ast.parse(text), False)

    loads: dict[str, set[str]] = {}

    def libraries(m: str, seen: tuple[str, ...] = ()) -> set[str]:
        """The HEAVY libraries importing module `m` loads (its top level, transitively)."""
        if m in loads:
            return loads[m]
        if m in seen:
            return set()
        out = set()
        for n in top[m]:
            o = ours(n)
            if o and o != m:
                out |= libraries(o, seen + (m,))
            elif not o and _heavy(n):
                out.add(_heavy(n))
        if not seen:
            loads[m] = out
        return out

    found = []
    for m in sorted(modules):
        if not m.startswith(scope):
            continue
        for node, names in local[m]:
            new = set()
            for n in names:
                o = ours(n)
                new |= libraries(o) if o else {_heavy(n)} - {None}
            text = " ".join(lines[m][node.lineno - 1:node.end_lineno])
            if not new - libraries(m) and "# (local:" not in text:
                found.append(f"{m}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_function_local_imports_keep_start_up_fast():
    """A function-local import in LOCAL_IMPORT_SCOPE loads a heavy library the module's top level does not (so a
    command that does not need it starts fast), or says why it is local; anything else is at the top."""
    assert light_local_imports(ROOT, LOCAL_IMPORT_SCOPE) == []


def test_the_local_import_scan_sees_a_light_local_import(tmp_path):
    (tmp_path / "trainable").mkdir()
    (tmp_path / "trainable" / "__init__.py").write_text("")
    (tmp_path / "trainable" / "heavy.py").write_text("import torch\n")
    (tmp_path / "trainable" / "light.py").write_text("import json\n")
    (tmp_path / "trainable" / "a.py").write_text(
        "import numpy as np\n\n\n"
        "def f():\n"
        "    import json\n"
        "    import numpy\n"
        "    import torch\n"
        "    import torch.utils.tensorboard\n"
        "    from . import light\n"
        "    from .heavy import x\n"
        "    from . import light as again  # (local: trainable.light imports this one)\n")
    assert light_local_imports(tmp_path, ("trainable",)) == [
        "trainable.a:5: import json", "trainable.a:6: import numpy", "trainable.a:9: from . import light"]
