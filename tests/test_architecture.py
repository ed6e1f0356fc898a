"""The package's layering, checked from the source with `ast` (nothing is imported):
imports point down the rank table only, no module-level import cycles, and test modules
stay independent of each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "internvl_tools"
TESTS = Path(__file__).resolve().parent

# The layers of internvl_tools, lowest first (the README describes the same order).
# A module may import from its own package and from packages of strictly LOWER rank only;
# two different packages of the same rank must not import each other. Keys are the top-level
# subpackages (or top-level modules) of internvl_tools. The package root, internvl_tools/__init__.py,
# holds the version only and may be imported by anyone; __main__ is the top. A new top-level
# package or module must be given a rank here.
RANKS = {
    "errors": -1,     # the exception types: below everything
    "io": 0,          # safetensors reading and writing
    "models": 1,      # facts about the models: families, key layouts, dialects, templates
    "formats": 2,     # on-disk tensor formats: int8, GPTQ, dequantized views
    "transforms": 3,  # streamed checkpoint rewrites: convert, shard, merge-lora, int8
    "planners": 3,    # device maps and GPU layouts
    "tiny": 4,        # tiny checkpoints for tests and demos
    "runtime": 5,     # native torch modules built from the stream
    "calibrate": 6,   # calibration data and GPTQ
    "export": 7,      # ONNX / TensorRT export
    "evaluate": 8,    # inspect, verify, benchmark slices
    "cli": 9,         # the click commands
    "__main__": 10,   # python -m internvl_tools
}
ROOT_UNIT = ""  # internvl_tools/__init__.py: importable by anyone


def _modules() -> dict[str, Path]:
    """dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    """The top-level subpackage (or top-level module) of internvl_tools that `module` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_UNIT


def _imports(module: str, path: Path, top_level_only: bool):
    """(line, imported module) for each import of internvl_tools in the file, absolute names;
    `from X import a` names X.a when that is a module of the package, else X."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def executed_at_import(body):
        """Import statements run when the module is imported: not in functions, not under TYPE_CHECKING."""
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from executed_at_import(node.orelse)
            else:  # class bodies, if / try / with / for blocks
                for field in ("body", "orelse", "finalbody", "handlers"):
                    yield from executed_at_import(getattr(node, field, None) or [])
                for case in getattr(node, "cases", None) or []:
                    yield from executed_at_import(case.body)

    found = []
    if top_level_only:
        candidates = executed_at_import(tree.body)
    else:  # every import anywhere: module level, functions, methods
        candidates = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in candidates:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{stem}.{alias.name}"
                targets.append(sub if sub in MODULES else stem)
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.append((node.lineno, target))
    return found


def _rank(unit: str):
    return -1 if unit == ROOT_UNIT else RANKS.get(unit)


def test_imports_point_down_the_layers():
    unknown = sorted({_unit(m) for m in MODULES} - set(RANKS) - {ROOT_UNIT})
    offending = [f"{PACKAGE}/{unit}: not in RANKS (give it a rank)" for unit in unknown]
    for module, path in MODULES.items():
        here = _unit(module)
        for line, target in _imports(module, path, top_level_only=False):
            there = _unit(target)
            if there == here or there == ROOT_UNIT:
                continue
            if there not in RANKS or _rank(there) >= _rank(here):
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {target} (rank {_rank(here)} -> rank {_rank(there)})")
    assert not offending, ("imports must point to the own package or to a strictly lower rank:\n"
                           + "\n".join(sorted(set(offending), key=_sort_key)))


def _sort_key(message: str):
    file, _, rest = message.partition(":")
    line = rest.split(" ", 1)[0]
    return file, int(line) if line.isdigit() else 0, rest


def test_no_module_level_import_cycles():
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for _, target in _imports(module, path, top_level_only=True):
            if target not in MODULES:
                continue  # a name that is not a module (a typo fails in its own test)
            edges.add(target)
            # importing a.b.c runs a.b's __init__ first when coming from outside a.b
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if not module.startswith(parent + ".") and module != parent:
                    edges.add(parent)
        edges.discard(module)
        graph[module] = sorted(edges)
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a path."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:
        start = min(component)
        # shortest path back to start inside the component (breadth first)
        previous, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in graph[v]:
                    if w == start:
                        found = v
                        break
                    if w in component and w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [], found
        while v is not None:
            path.append(v)
            v = previous[v]
        cycles.append(path[::-1])
    return sorted(cycles)


def test_test_modules_do_not_import_each_other():
    """Shared test code lives in support modules (support.py, reference_internvl.py, conftest.py),
    so each test module imports, collects and skips on its own."""
    test_modules = {p.stem for p in TESTS.glob("test_*.py")}
    offending = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):  # import tests.test_x / import test_x
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # from .test_x import y / from . import test_x / from tests.test_x import y
                if not node.level and not (node.module or "").split(".")[0] in ("tests", *test_modules):
                    continue
                stem = "tests." * bool(node.level) + (node.module or "")
                names = [stem.rstrip(".") + "." + alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = [part for part in name.split(".") if part]
                if parts and parts[0] == "tests":
                    parts = parts[1:]
                if parts and parts[0] in test_modules:
                    offending.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name} ({ast.unparse(node)})")
                    break
    assert not offending, ("test modules import other test modules (move shared code to tests/support.py):\n"
                           + "\n".join(sorted(offending, key=_sort_key)))
