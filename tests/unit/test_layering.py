"""The package's import graph: no cycles, and the lower rooms never reach up.

Read from the source with ``ast`` (every import statement, also those inside functions
or under ``TYPE_CHECKING``: a deferred import is still a dependency), so the test needs
no import side effects and names the offending module and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import lbsync

ROOT = Path(lbsync.__file__).parent

# What the drivers (leaves) and the stage must not import: the stages above them.
ABOVE_DRIVERS = (
    "lbsync.catalog",
    "lbsync.cli",
    "lbsync.daemon",
    "lbsync.guard",
    "lbsync.health",
    "lbsync.http",
    "lbsync.isolation",
    "lbsync.oneshot",
    "lbsync.outcome",
    "lbsync.pipeline",
    "lbsync.registrar",
    "lbsync.render",
    "lbsync.saved_catalog",
    "lbsync.scheduler",
    "lbsync.source",
    "lbsync.status",
)
RULES = {
    "lbsync.drivers": ABOVE_DRIVERS,
    "lbsync.stage": (*ABOVE_DRIVERS, "lbsync.drivers"),
    "lbsync.source": (
        "lbsync.catalog",
        "lbsync.daemon",
        "lbsync.drivers",
        "lbsync.pipeline",
        "lbsync.render",
        "lbsync.scheduler",
        "lbsync.stage",
    ),
}
ETCD_CLIENT = ("pyetcd", "grpc")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> Iterator[tuple[str, int]]:
    """Every module ``name`` imports, with the line: ``from a import b`` counts ``a.b``
    when that is a module of its own."""
    path = MODULES[name]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: lbsync imports absolutely"
            base = node.module or ""
            for alias in node.names:
                child = f"{base}.{alias.name}"
                yield (child if child in MODULES else base), node.lineno


def graph() -> dict[str, set[str]]:
    return {
        name: {target for target, _ in imports(name) if target in MODULES and target != name}
        for name in MODULES
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it; None when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(edges[node]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(edges):
        if cycle := visit(start):
            return cycle
    return None


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_known_imports() -> None:
    edges = graph()
    assert "lbsync.outcome" in edges["lbsync.metrics"]
    assert "lbsync.source.client" in edges["lbsync.source.grpc_session"]


def test_no_import_cycle_in_lbsync() -> None:
    assert find_cycle(graph()) is None


def test_lower_rooms_do_not_import_upward() -> None:
    offences = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        for lower, forbidden in RULES.items()
        if within(name, lower)
        for target, line in imports(name)
        if any(within(target, above) for above in forbidden)
    ]
    assert offences == []


def test_only_the_source_imports_the_etcd_client() -> None:
    offences = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if not within(name, "lbsync.source")
        for target, line in imports(name)
        if any(within(target, client) for client in ETCD_CLIENT)
    ]
    assert offences == []
