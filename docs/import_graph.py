"""The import drawing of the library: modules, the arrows between them, and their floors.

    python docs/import_graph.py            # one line per floor, top floor first
    python docs/import_graph.py --edges    # every arrow, importer -> imported

Every `import` statement counts, also those inside functions (a lazy import is still an
arrow). A room is a top-level module, or a whole subpackage (`evaluate/`, `filters/`,
`data/`: arrows inside one are not drawn); the root package `steer_heal` (re-exports) is a
room of its own. A room's floor is 1 + the highest floor it imports (1 for rooms that
import nothing of ours); with no cycle every arrow then points down.
`tests/test_architecture.py` asserts the house rules on this drawing.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("steer_heal", "runners")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (names as dotted paths)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
                # `from .pkg import module` imports the submodule; `from .module import name` the module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target and target not in files:  # `steer_heal.x.y` where y is an attribute
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def room(module: str) -> str:
    """`steer_heal.filters.text` -> `steer_heal.filters`; top-level modules are their own room."""
    parts = module.split(".")
    return ".".join(parts[:2])


def rooms(edges: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """The drawing: room -> rooms it imports (arrows inside a room dropped)."""
    edges = graph() if edges is None else edges
    out: dict[str, set[str]] = {}
    for v, targets in edges.items():
        out.setdefault(room(v), set()).update(room(w) for w in targets if room(w) != room(v))
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """1 + the highest floor imported; raises on a cycle."""
    found = cycles(edges)
    if found:
        raise ValueError(f"import cycles: {found}")
    memo: dict[str, int] = {}

    def floor(v: str) -> int:
        if v not in memo:
            memo[v] = 1 + max((floor(w) for w in edges[v]), default=0)
        return memo[v]

    return {v: floor(v) for v in edges}


def main() -> None:
    edges = rooms()
    if "--edges" in sys.argv:
        for v in sorted(edges):
            for w in sorted(edges[v]):
                print(f"{v} -> {w}")
        return
    found = cycles(edges)
    if found:
        print("cycles:", found)
        return
    levels = floors(edges)
    for level in range(max(levels.values()), 0, -1):
        names = sorted(v for v, f in levels.items() if f == level)
        print(f"floor {level}: {', '.join(names)}")


if __name__ == "__main__":
    main()
