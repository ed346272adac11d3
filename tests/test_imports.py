"""The package shape, read from the source (ast, nothing imported): imports point down, no import cycle
between files, product code reaches benchmarks only through the `fitllm bench` registry, files stay short.

Every import counts, a function's lazy one included (it is a dependency all the same); only imports under
`if TYPE_CHECKING:` are left out. Findings outside the hard rules are printed (`pytest -s`) for the lead.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fitllm"

# Layers, lowest first: a file may import its own layer and the ones below it.
LAYERS = {
    "base": 0,  # fitllm/*.py below the CLI: config, units, device, distributed, triton_flags
    "memory": 1,
    "quant": 1,
    "model": 2,
    "loader": 3,
    "plan": 3,
    "engine": 4,
    "eval": 4,
    "server": 5,
    "studio": 5,
    "cli": 6,
    "args": 6,
}
FRONT = {"engine", "eval", "server", "studio", "cli", "args"}  # what memory, quant and model never import
BENCH_REGISTRY = "benchmarks.commands"  # the one door from fitllm/ into benchmarks/
MAX_LINES = 450
OWNED = ("fitllm/memory/", "fitllm/plan/")  # files held to MAX_LINES here; others are listed


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, mods: dict[str, str]) -> str | None:
    """The fitllm module `name` is, or is defined in (its nearest existing prefix); benchmarks modules as
    named; None outside both."""
    if name.startswith("benchmarks"):
        return name
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(tree: ast.AST, package: str, mods: dict[str, str]) -> set[str]:
    """The modules a file's import statements load: `from a import b` gives a.b when b is a module,
    else a."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for target in targets:
            if target.startswith(("fitllm", "benchmarks")):
                resolved = _resolve(target, mods)
                if resolved is not None:
                    out.add(resolved)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def dependencies() -> dict[str, set[str]]:
    """fitllm module -> the fitllm and benchmarks modules it imports."""
    mods = {name: str(path) for name, path in files().items()}
    graph: dict[str, set[str]] = {}
    for name, path in files().items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imports_of(ast.parse(path.read_text()), package, mods) - {name}
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    top = parts[1]
    return top if top in LAYERS else "base"


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one file (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def test_the_reader_sees_imports_and_cycles():
    """The checks below are not vacuous: lazy imports are seen, and a cycle is found."""
    graph = dependencies()
    assert "fitllm.memory.kv.storage" in graph["fitllm.memory.kv.setup"]
    assert (
        "fitllm.model.attention.triton_kernels" in graph["fitllm.model.attention.triton_backend"]
    )  # imported in a method
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def test_no_import_cycle_between_files():
    found = cycles(dependencies())
    assert not found, f"import cycles between files: {found}"


def imports_where(src: Callable[[str], bool], dst: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(file, module it imports) for every import from a file `src` accepts of a module `dst` accepts."""
    return sorted(
        (name, dep) for name, deps in dependencies().items() if src(name) for dep in deps if dst(dep)
    )


def in_fitllm(layers: set[str] | None = None, above: str | None = None) -> Callable[[str], bool]:
    """A fitllm module of one of `layers`, or of a layer above `above`."""

    def accept(module: str) -> bool:
        if not module.startswith("fitllm"):
            return False
        return (layers is None or layer(module) in layers) and (
            above is None or LAYERS[layer(module)] > LAYERS[above]
        )

    return accept


def test_memory_quant_and_model_never_import_the_layers_above():
    bad = imports_where(in_fitllm({"memory", "quant", "model"}), in_fitllm(FRONT))
    assert not bad, f"imports from engine/server/studio/cli below them: {bad}"


def test_memory_knows_no_model_class():
    bad = imports_where(in_fitllm({"memory"}), in_fitllm(above="memory"))
    assert not bad, f"memory/ imports above itself: {bad}"


def test_only_the_bench_registry_imports_benchmarks():
    bad = imports_where(in_fitllm(), lambda dep: dep.startswith("benchmarks") and dep != BENCH_REGISTRY)
    if bad:
        print("\nfitllm/ files importing benchmarks/ beyond the registry:", *bad, sep="\n  ")
    assert not bad, f"beyond {BENCH_REGISTRY}: {bad}"


def test_imports_point_down():
    """Every upward import, listed (`pytest -s`); none of them from memory/ (asserted above)."""
    up = [
        (name, dep)
        for name, dep in imports_where(in_fitllm(), in_fitllm())
        if LAYERS[layer(dep)] > LAYERS[layer(name)]
    ]
    if up:
        print("\nupward imports (file -> file above it):", *up, sep="\n  ")


def test_files_stay_short():
    long = sorted(
        (str(p.relative_to(ROOT)), n)
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    )
    if long:
        print(f"\nfiles over {MAX_LINES} lines:", *long, sep="\n  ")
    owned = [(p, n) for p, n in long if p.startswith(OWNED)]
    assert not owned, f"over {MAX_LINES} lines: {owned}"
