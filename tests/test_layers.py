"""The house's one-way rule, checked on the source: cli → sweeps, claims → reports → engine → data → specs → models.

Every import counts, also one inside a function: a deferred import still ties the two modules together.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

# Lower rank = lower floor. A module may import its own floor and those below it, never one above.
# The sweep and claims reports are built from the reports stack, so sweeps and claims sit above reports (and
# beside each other). io is a leaf helper.
RANKS = {"models": 0, "pipeline.io": 1, "pipeline.specs": 2, "pipeline.data": 3, "pipeline.engine": 4,
         "pipeline.reports": 5, "pipeline.sweeps": 6, "pipeline.claims": 6, "pipeline.cli": 7, "pipeline.ui": 7}
PACKAGES = ("models", "pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> str | None:
    """The entry of RANKS that holds `module` (the longest matching prefix)."""
    best = None
    for name in RANKS:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project's modules that `path` imports, resolving `from pkg import submodule` to the submodule."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def test_every_module_has_a_floor():
    assert [m for m in import_graph() if floor(m) is None and m not in PACKAGES] == []


def test_models_import_nothing_from_pipeline():
    bad = {m: sorted(i for i in deps if i.startswith("pipeline")) for m, deps in import_graph().items()
           if m.startswith("models")}
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_imports_never_run_up_the_chain():
    upward = []
    for module, deps in import_graph().items():
        if module in PACKAGES:
            continue
        for dep in deps:
            if dep not in PACKAGES and RANKS[floor(dep)] > RANKS[floor(module)]:
                upward.append(f"{module} → {dep}")
    assert sorted(upward) == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop, as the list of modules along it, or None."""
    state: dict[str, int] = defaultdict(int)  # 0 unseen, 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if state[nxt] == 0 and (loop := visit(nxt)):
                return loop
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if state[start] == 0 and (loop := visit(start)):
            return loop
    return None


def test_no_import_loops():
    # A package's __init__ importing its own modules is how `models` fills its registry, not a loop.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in import_graph().items()}
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_a_loop_and_passes_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


MAX_FUNCTION_LINES = 60  # "small rooms": a function longer than this is split into named steps


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in (p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
