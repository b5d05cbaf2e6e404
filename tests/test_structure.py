"""Structural contracts of the package, checked from its source so that they keep
holding while modules move between sub-packages:

* no import cycles among mpirefine's modules (function-level imports included);
* only the command line (``mpirefine/cli/``) imports ``mpirefine.cli``;
* only ``parallel.py`` imports mpi4py;
* the ``refine`` subcommand's defaults are RefineConfig's defaults.

Modules are discovered by walking the ``mpirefine/`` tree; imports are read with
:mod:`ast`, never by importing the modules (except for the CLI test).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mpirefine"
PACKAGE_DIR = REPO / PACKAGE
CLI = f"{PACKAGE}.cli"


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Module:
    name: str          # dotted name; a package's __init__.py is the package itself
    path: Path
    is_package: bool

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix()


@dataclass(frozen=True)
class ImportRef:
    line: int
    candidates: tuple[str, ...]  # absolute dotted names this statement may import
    targets: tuple[str, ...]     # what it imports: a submodule where one exists, else the module
    type_checking: bool          # under `if TYPE_CHECKING:` (never runs)
    in_function: bool


@lru_cache(maxsize=None)
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        found[name] = Module(name, path, is_package)
    return found


def _existing(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``a.b.func`` -> ``a.b``)."""
    known = modules()
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Every import statement in a file, plus importlib.import_module / __import__
    calls with a literal absolute name, with whether it sits under TYPE_CHECKING or in
    a function."""

    def __init__(self, module: Module):
        self.module = module
        self.found: list[tuple[int, list[tuple[str, str | None]], bool, bool]] = []
        self._type_checking = 0
        self._function = 0

    def _add(self, line, pairs):
        self.found.append((line, pairs, self._type_checking > 0, self._function > 0))

    def visit_If(self, node):
        if _is_type_checking(node.test):
            self._type_checking += 1
            for stmt in node.body:
                self.visit(stmt)
            self._type_checking -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def _visit_function(self, node):
        self._function += 1
        self.generic_visit(node)
        self._function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_Import(self, node):
        self._add(node.lineno, [(alias.name, None) for alias in node.names])

    def visit_ImportFrom(self, node):
        base = self._absolute(node.module or "", node.level)
        if base is not None:
            self._add(node.lineno, [(base, alias.name) for alias in node.names])

    def visit_Call(self, node):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if (name in ("import_module", "__import__") and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and not node.args[0].value.startswith(".")):
            self._add(node.lineno, [(node.args[0].value, None)])
        self.generic_visit(node)

    def _absolute(self, name: str, level: int) -> str | None:
        if level == 0:
            return name
        package = self.module.name.split(".")
        if not self.module.is_package:
            package.pop()
        if level - 1 > len(package):
            return None
        package = package[: len(package) - (level - 1)]
        return ".".join(package + ([name] if name else []))


@lru_cache(maxsize=None)
def imports_of(name: str) -> tuple[ImportRef, ...]:
    module = modules()[name]
    collector = _Collector(module)
    collector.visit(ast.parse(module.path.read_text(encoding="utf-8"), str(module.path)))
    refs = []
    for line, pairs, type_checking, in_function in collector.found:
        for base, imported in pairs:
            if imported is None:  # import a.b.c
                candidates, target = (base,), base
            elif imported == "*":
                candidates, target = (base,), base
            else:  # from base import imported: a submodule if there is one, else a name
                sub = f"{base}.{imported}"
                candidates = (base, sub)
                target = sub if sub in modules() else base
            resolved = _existing(target)
            refs.append(ImportRef(line, candidates, (resolved,) if resolved else (),
                                  type_checking, in_function))
    return tuple(refs)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _where(module: Module, ref: ImportRef) -> str:
    return f"{module.rel}:{ref.line}" + (" (in a function)" if ref.in_function else "")


# --------------------------------------------------------------------------- cycles


def import_graph() -> dict[str, dict[str, ImportRef]]:
    """module -> {imported module: first import of it}; TYPE_CHECKING imports excluded.

    ``import a.b.c`` / ``from a.b import c`` (c a submodule) is an edge to ``a.b.c``
    only: the parent packages are initialised first, but a package's ``__init__``
    importing its own submodules is not a cycle in practice.  ``from a.b import name``
    (a name, not a submodule) is an edge to the package ``a.b`` itself, since it needs
    ``a/b/__init__.py`` to have run (a package whose ``__init__`` imports nothing has no
    outgoing edges, so it can never be part of a cycle).
    """
    graph: dict[str, dict[str, ImportRef]] = {}
    for name in modules():
        edges: dict[str, ImportRef] = {}
        for ref in imports_of(name):
            if ref.type_checking:
                continue
            for target in ref.targets:
                if target != name and (target not in edges or ref.line < edges[target].line):
                    edges[target] = ref
        graph[name] = edges
    return graph


def strongly_connected_components(graph: dict[str, dict[str, object]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycles_covering(component: list[str], graph) -> list[list[str]]:
    """Elementary cycles inside one component that between them use every edge of it:
    for each edge u -> v not yet used, u -> v plus the shortest path from v back to u."""
    members = set(component)
    covered: set[tuple[str, str]] = set()
    cycles = []
    for u in component:
        for v in sorted(graph[u]):
            if v not in members or (u, v) in covered:
                continue
            previous = {v: None}
            queue = [v]
            while queue and u not in previous:
                nxt = []
                for node in queue:
                    for child in sorted(graph[node]):
                        if child in members and child not in previous:
                            previous[child] = node
                            nxt.append(child)
                queue = nxt
            path = [u]
            while path[-1] != v:
                path.append(previous[path[-1]])
            path.reverse()  # v ... u
            cycle = [u] + path  # u -> v -> ... -> u
            covered.update(zip(cycle, cycle[1:]))
            start = cycle.index(min(cycle[:-1]))  # rotate: same cycle, same text
            cycle = cycle[start:-1] + cycle[:start] + [cycle[start]]
            if cycle not in cycles:
                cycles.append(cycle)
    return cycles


def test_no_import_cycles():
    graph = import_graph()
    known = modules()
    lines = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        lines.append(f"cycle among {len(component)} modules: {', '.join(component)}")
        for cycle in _cycles_covering(component, graph):
            where = ", ".join(_where(known[a], graph[a][b]) for a, b in zip(cycle, cycle[1:]))
            lines.append(f"  {' -> '.join(cycle)}   [{where}]")
    assert not lines, ("import cycles (function-level imports included):\n" + "\n".join(lines))


# --------------------------------------------------------------------------- layering


def test_only_the_cli_imports_the_cli():
    offenders = []
    for name, module in modules().items():
        if _under(name, CLI) or module.path.name == "__main__.py":  # entry point: runs the CLI
            continue
        for ref in imports_of(name):
            hit = [c for c in ref.targets + ref.candidates if _under(c, CLI)]
            if hit:
                offenders.append(f"{_where(module, ref)}: imports {hit[0]}")
    assert not offenders, ("modules outside mpirefine/cli/ import mpirefine.cli (library code "
                           "must not depend on the command line):\n  " + "\n  ".join(offenders))


#: The pipeline's layers, lowest first (docs/architecture.md §2): a module imports
#: only from its own layer or lower ones.  Keys are the first name under mpirefine.
LAYERS = [
    {"errors", "backend"},
    {"fourier", "physics", "geometry", "io", "ranks", "logs"},
    {"config", "parallel", "search", "postprocess", "synthetic"},
    {"report"},
    {"refinement"},
    {"cli", "__main__"},
]


def _layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != PACKAGE:
        return None
    return next((i for i, group in enumerate(LAYERS) if parts[1] in group), None)


def test_imports_point_down_the_pipeline():
    """fourier/physics/geometry/io never import search, postprocess, refinement...;
    search and postprocess never import refinement; nothing but cli imports cli."""
    offenders, unplaced = [], set()
    for name, module in modules().items():
        here = _layer(name)
        if here is None:
            if name != PACKAGE:
                unplaced.add(name)
            continue
        for ref in imports_of(name):
            if ref.type_checking:
                continue
            for target in ref.targets:
                there = _layer(target)
                if there is not None and there > here:
                    offenders.append(f"{_where(module, ref)}: {name} (layer {here}) imports "
                                     f"{target} (layer {there})")
    assert not unplaced, f"modules in no layer of LAYERS: {sorted(unplaced)}"
    assert not offenders, "imports against the pipeline's direction:\n  " + "\n  ".join(offenders)


def test_only_parallel_imports_mpi4py():
    parallel = [m for m in modules().values() if m.path.name == "parallel.py"]
    assert len(parallel) == 1, f"expected exactly one parallel.py, found {[m.rel for m in parallel]}"
    offenders = []
    for name, module in modules().items():
        if module is parallel[0]:
            continue
        for ref in imports_of(name):
            if any(_under(c, "mpi4py") for c in ref.candidates):
                offenders.append(_where(module, ref))
    assert not offenders, (f"only {parallel[0].rel} may import mpi4py; also imported at:\n  "
                           + "\n  ".join(offenders))


# --------------------------------------------------------------------------- refine defaults

MINIMAL_REFINE = ["refine", "particles.star", "volume.mrc", "--out", "DIR"]


def _refine_cli():
    """(refine sub-parser, its module, parsed minimal command line), built as `mpirefine` does."""
    from mpirefine import cli

    parser, module = cli.build_parser("refine")
    assert module is not None, "mpirefine.cli.build_parser('refine') found no refine command"
    assert hasattr(module, "config_from_args"), (
        f"{module.__name__} has no config_from_args(args); update this test to build the "
        "configuration the way the CLI now does")
    subparsers = next(a for a in parser._actions if a.choices and "refine" in a.choices)
    return subparsers.choices["refine"], module, parser.parse_args(MINIMAL_REFINE)


def _option(subparser, dest: str) -> str:
    flags = [", ".join(a.option_strings) or a.dest for a in subparser._actions if a.dest == dest]
    return " / ".join(flags) if flags else f"(no option with dest {dest!r})"


def test_refine_cli_defaults_are_refine_config_defaults():
    subparser, module, args = _refine_cli()
    cfg = module.config_from_args(args)
    cls = type(cfg)
    assert dataclasses.is_dataclass(cls), f"config_from_args returned {cls!r}, not a dataclass"
    fields = dataclasses.fields(cls)
    required = {f.name: getattr(cfg, f.name) for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    reference = cls(**required)  # e.g. RefineConfig(particles=..., volume=..., out_dir=...)
    mismatches = [
        f"{f.name}: command line {_option(subparser, f.name)} gives {getattr(cfg, f.name)!r}, "
        f"{cls.__name__} default is {getattr(reference, f.name)!r}"
        for f in fields if getattr(cfg, f.name) != getattr(reference, f.name)]
    assert not mismatches, (f"`mpirefine {' '.join(MINIMAL_REFINE)}` does not give "
                            f"{cls.__name__}'s defaults:\n  " + "\n  ".join(mismatches))


def test_refine_cli_sets_every_refine_config_field(monkeypatch):
    """Without this, a field whose option was renamed (so config_from_args no longer
    passes it) would compare equal above while the option is silently ignored."""
    subparser, module, args = _refine_cli()
    cls = type(module.config_from_args(args))
    original = cls.__init__
    signature = inspect.signature(original)
    passed: set[str] = set()

    def recording_init(self, *a, **kw):
        passed.update(signature.bind(self, *a, **kw).arguments)
        original(self, *a, **kw)

    monkeypatch.setattr(cls, "__init__", recording_init)
    module.config_from_args(args)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in passed]
    assert not missing, (f"config_from_args never passes these {cls.__name__} fields, so the "
                         f"command line cannot set them: {', '.join(missing)}")
