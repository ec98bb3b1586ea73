"""The package's layers (issue 23): core -> mrml -> engine -> tasks -> panel / annotation -> doors.
Read statically from the source (every import, module-level or inside a function): no import runs
back up a layer, no task imports another task, and module-level imports have no cycle."""
import ast
from pathlib import Path

import SpineKneeSegLib

LIB = Path(SpineKneeSegLib.__file__).parent
LAYERS = {"core": 1, "mrml": 2, "engine": 3, "tasks": 4, "panel": 5, "annotation": 5}
DOOR = 6  # cli.py, annotate_cli.py, demo.py, __init__.py at the top of the package
PLUGIN_DISCOVERY = ("engine/cards.py", "SpineKneeSegLib.tasks")  # the one import by name (load_tasks)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], DOOR) if len(parts) > 1 else DOOR


def _imports(path: Path):
    """(imported package module, line, at module level) for every import of the package."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("SpineKneeSegLib"):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:  # "from SpineKneeSegLib.engine import pipeline" imports a module
                candidate = f"{node.module}.{alias.name}"
                target = candidate if (LIB.parent / candidate.replace(".", "/")).with_suffix(".py").exists() \
                    or (LIB.parent / candidate.replace(".", "/")).is_dir() else node.module
                yield target, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("SpineKneeSegLib"):
                    yield alias.name, node.lineno, id(node) in top


def _modules():
    return {_module_name(p): p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts}


def test_every_module_sits_in_a_layer_folder_or_is_a_door():
    doors = {m for m in _modules() if _layer(m) == DOOR}
    assert doors == {"SpineKneeSegLib", "SpineKneeSegLib.cli", "SpineKneeSegLib.annotate_cli",
                     "SpineKneeSegLib.demo"}, doors


def test_no_import_runs_back_up_a_layer():
    bad = []
    for module, path in _modules().items():
        for target, line, _ in _imports(path):
            if target == "SpineKneeSegLib":  # the package's __version__
                continue
            if _layer(target) > _layer(module):
                bad.append(f"{path.relative_to(LIB)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_task_imports_another_task():
    bad = []
    for module, path in _modules().items():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] != "tasks":
            continue
        for target, line, _ in _imports(path):
            t = target.split(".")
            if len(t) >= 3 and t[1] == "tasks" and t[2] != parts[2]:
                bad.append(f"{path.relative_to(LIB)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_engine_names_no_task_and_finds_them_only_through_the_plugin_package():
    for path in [*(LIB / "core").rglob("*.py"), *(LIB / "mrml").rglob("*.py"), *(LIB / "engine").rglob("*.py")]:
        source = path.read_text()
        rel = path.relative_to(LIB).as_posix()
        names = {n.value for n in ast.walk(ast.parse(source))
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("SpineKneeSegLib.")}
        allowed = {PLUGIN_DISCOVERY[1]} if rel == PLUGIN_DISCOVERY[0] else set()
        assert names <= allowed, f"{rel} names package modules {names - allowed} (importing them by name?)"
        if rel.startswith("engine/"):
            from SpineKneeSegLib.tasks import TASKS

            for name in TASKS:  # no task special-cased by name in the engine
                assert f'"{name}"' not in source, f"{rel} names task {name}"


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {m: {t for t, _, top in _imports(p) if top and t in modules and t != m} for m, p in modules.items()}
    # a package's __init__ importing its own sub-modules is how plug-ins register, not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
