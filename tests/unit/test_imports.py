"""No import cycle among bistro/ modules (STYLE.md 6: layers point one way).

The graph is read from the source with `ast`: every `import` and `from … import` of a bistro module,
at module level and inside functions alike (a function-level import that closes a cycle only hides
it until the function runs). Imports under `if TYPE_CHECKING:` never run and name types only, so
they are left out. `from . import x` counts as importing the submodule `x` when there is one, else
the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bistro

ROOT = Path(bistro.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of the tree except those under `if TYPE_CHECKING:`."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the bistro modules it imports."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # `import bistro.x.y` names a module or a package above it
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, …, a], or None (iterative three-colour DFS)."""
    colour = dict.fromkeys(graph, 0)
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child) :] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "bistro.config" in graph["bistro.cli"]  # from .config import …
    assert "bistro.storage.base" in graph["bistro.node"]  # from .storage.base import …
    assert "bistro.data" in graph["bistro.node"]  # from .data import Dataset (a package)


def test_no_import_cycle_among_bistro_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# -- layers (STYLE.md 6): each module imports only its own layer or those under it ------------------

LAYERS: tuple[tuple[str, ...], ...] = (
    # 0: the contract and the settings every part reads
    ("bistro", "bistro.protocol", "bistro.config", "bistro.atomicfile", "bistro.statefile", "bistro.windowlog",
     "bistro.threads"),
    # 1: the parts
    ("bistro.delta", "bistro.data", "bistro.chain", "bistro.storage", "bistro.model", "bistro.training",
     "bistro.wallet"),
    # 2: the roles and the mechanism they run
    ("bistro.node", "bistro.miner", "bistro.validator", "bistro.master", "bistro.manifest", "bistro.evaluator",
     "bistro.scoring", "bistro.sample", "bistro.verdicts", "bistro.metrics", "bistro.distributed", "bistro.export",
     "bistro.doctor", "bistro.plan", "bistro.report", "bistro.lmeval", "bistro.chain.commands", "bistro.data.commands"),
    # 3: research and test tooling, and the entry point
    ("bistro.localnet", "bistro.bench", "bistro.cli"),
)  # fmt: skip


def layer_of(module: str) -> int:
    """The layer of the longest prefix of `module` that LAYERS names."""
    best, layer = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or (name != "bistro" and module.startswith(name + "."))) and len(name) > best:
                best, layer = len(name), i
    if layer < 0:
        raise KeyError(f"{module} is in no layer: add it to LAYERS")
    return layer


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )


def test_the_layer_check_sees_an_upward_import():
    assert layer_violations({"bistro.delta.apply": {"bistro.scoring"}, "bistro.scoring": set()}) == [
        "bistro.delta.apply (layer 1) imports bistro.scoring (layer 2)"
    ]
    assert layer_violations({"bistro.miner": {"bistro.delta.codec"}, "bistro.delta.codec": set()}) == []


def test_every_module_imports_only_its_layer_or_those_under_it():
    assert layer_violations(import_graph()) == []


def test_a_miner_and_a_validator_load_no_test_tooling():
    import subprocess
    import sys

    code = "import bistro.miner, bistro.validator, sys; print(' '.join(m for m in sys.modules if m.startswith('bistro')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "bistro.miner" in out and "bistro.validator" in out
    tooling = [
        m
        for m in out
        if any(w in m for w in ("localnet", "persona", "hostile", "faulty", "s3server", "bench"))
    ]
    assert tooling == []
