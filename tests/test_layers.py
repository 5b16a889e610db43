"""The package's layering (docs/design.md §2), read from the code's own imports: every import of a
longctx module runs down the layers, the module graph has no circles, and no function imports a
longctx module (a deferred import is allowed only for a heavy optional third-party dependency)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "longctx"
# Bottom to top; a layer may import its own and any lower one. training, pretrain and lmeval share a
# floor and do not import each other; the front door (cli, demo, plots, reports) is above them all.
FLOORS = [{"core"}, {"tasks"}, {"engine"}, {"adapters"}, {"training", "pretrain", "lmeval"}, {"sweep"}, {"front"}]


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else "front"


def _floor(layer: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if layer in floor)


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("longctx"):
            found.append((node, node.module))
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name.startswith("longctx")]
    return found


MODULES = {_module(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_of_a_longctx_module_runs_down_the_layers():
    upward = []
    for module, tree in MODULES.items():
        here = _layer(module)
        if here == "package":
            continue
        for node, target in _imports(tree):
            there = _layer(target)
            if there == "package" or there == here:
                continue
            if _floor(there) >= _floor(here):
                upward.append(f"{module} imports {target} ({here} -> {there})")
    assert not upward, "\n".join(upward)


def test_no_function_or_conditional_block_imports_a_longctx_module():
    """Every arrow stands in the file's header: none in a function, none under `if TYPE_CHECKING:`."""
    local = []
    for module, tree in MODULES.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try)):
                local += [f"{module}.{getattr(fn, 'name', 'block')} imports {target}" for _, target in _imports(fn)]
    assert not local, "\n".join(sorted(set(local)))


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module, tree in MODULES.items():
        for node, target in _imports(tree):
            names = [target] + [f"{target}.{a.name}" for a in getattr(node, "names", [])]
            graph[module] |= {n for n in names if n in MODULES and n != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_module_graph_has_no_circles():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


@pytest.mark.parametrize("graph, circle", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
                                           ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False)])
def test_the_circle_finder_finds_a_circle_and_only_a_circle(graph, circle):
    assert (_cycle(graph) is not None) is circle


@pytest.mark.parametrize("package", ["longctx", "longctx.adapters"])
def test_every_lazily_re_exported_name_resolves(package):
    """The packages re-export names from their modules on first use (a fixed table, so importing
    them stays free of torch): a name whose module moved must fail here, not in a user's hands."""
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
