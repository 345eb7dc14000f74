"""The code's structure: no import cycles between qvl's modules (lazy imports included), and every module
has its line in the map (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("qvl_data", "qvl_train")


def _modules() -> dict[str, set[str]]:
    """module -> the qvl modules it imports anywhere in its body (top level or inside functions)."""
    imports: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGES):
                    found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
                elif isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names if alias.name.startswith(PACKAGES)}
            imports[name] = found
    return {
        name: {d for d in deps if d in imports and d != name and not name.startswith(d + ".")}
        for name, deps in imports.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_through_others():
    graph = _modules()
    assert len(graph) > 40
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_has_its_line_in_the_map():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [
        name
        for name in _modules()
        if name not in PACKAGES
        and not name.endswith(".infer")
        and f"`{name.rsplit('.', 1)[1]}.py`" not in text
    ]
    assert not missing, missing
