"""The house's import rules (docs/architecture.md, "Layers"), checked on the source.

The graph is built statically: every ``import`` and ``from ... import`` in every module of
``refresherd``, read with ``ast``, wherever it stands: at module level, inside a function (the
CLI imports each command's handler when the command runs, on purpose), or under
``if TYPE_CHECKING:``. All three count, for both rules:

- **No cycle.** A late import hides a cycle at run time; it is still there for the reader and
  for whoever moves the import to the top (issue #15: "Late imports hide it at run time").
- **Layers.** A module imports only modules of its own layer or of a layer below. A function-
  level import defers the *cost* of a dependency, not the dependency: the lazy CLI needs no
  exception because it is the entry, which may import everything. A type-only import is a
  dependency of the reader's and of the type checker's.

Each module's layer is data (:data:`LAYER_OF`); a module missing from it fails the test with a
message saying to place it. Exceptions are listed, with why, in :data:`KNOWN_UPWARD` and
:data:`KNOWN_CYCLE_EDGES`; a listed exception that no longer occurs fails too, so the lists
only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "refresherd"

# Bottom to top. "apart" stands outside: refresherd.testing (the fake IdP users run in their
# own tests) imports nothing else of refresherd, and only the entry (the demo) imports it.
LAYERS = ("foundation", "pure core", "adapters", "refresh", "orchestration", "composition", "entry")
APART = "apart"

LAYER_OF: dict[str, str] = {
    # foundation: nouns, time, configuration types, logs and metrics objects.
    "refresherd": "foundation",  # __init__: the version
    "refresherd.model": "foundation",
    "refresherd.errors": "foundation",  # the error tree's root and branches; imports nothing
    "refresherd.clock": "foundation",
    "refresherd.settings": "foundation",
    "refresherd.presets": "foundation",  # the known IdPs' settings, data only
    "refresherd.logs": "foundation",
    "refresherd.metrics": "foundation",
    "refresherd.deadlines": "foundation",
    # Where the database is (a SQLite path or a PostgreSQL URL): DaemonConfig.database's type.
    # Imports only the model, so the settings can name it.
    "refresherd.store.location": "foundation",
    # pure core: decisions and values, `now` and randomness as arguments, no I/O.
    "refresherd.policy": "pure core",
    "refresherd.throttle": "pure core",
    "refresherd.latency": "pure core",
    "refresherd.concurrency": "pure core",
    "refresherd.storage_health": "pure core",
    "refresherd.worker_metrics": "pure core",
    "refresherd.encryption": "pure core",  # AES-GCM on values; imports the model only
    "refresherd.connect": "pure core",  # connect links and callbacks, judged from values
    # adapters: the outside world (databases, the IdP, HTTP, files, env, systemd).
    "refresherd.store": "adapters",  # the package's surface and open_store
    "refresherd.store.contract": "adapters",  # TokenStore, its values and errors
    "refresherd.store.sql": "adapters",
    "refresherd.store.rows": "adapters",
    "refresherd.store.migrations": "adapters",
    "refresherd.store.sqlite": "adapters",
    "refresherd.store.postgres": "adapters",
    "refresherd.ownership": "adapters",
    "refresherd.config": "adapters",  # the TOML loader: files, env, credentials
    "refresherd.intake": "adapters",  # token responses from outside (CLI, token API)
    # The IdP's side (docs/architecture.md): the endpoint and what it stands on.
    "refresherd.idp": "adapters",
    "refresherd.idp.endpoint": "adapters",
    "refresherd.idp.transport": "adapters",
    "refresherd.idp.failures": "adapters",
    "refresherd.idp.token_response": "adapters",  # shared with intake
    "refresherd.idp.discovery": "adapters",
    # The HTTP surface (web/): the ASGI app and its listeners, the bearer check.
    "refresherd.web": "adapters",
    "refresherd.web.app": "adapters",
    "refresherd.web.auth": "adapters",
    "refresherd.web.token_cache": "adapters",  # GET's answers in memory, on the change feed
    "refresherd.events": "adapters",  # events queued in the database
    "refresherd.sdnotify": "adapters",
    # refresh: one refresh of one token set end to end, step by step (refresh/__init__.py).
    "refresherd.refresh": "refresh",
    "refresherd.refresh.outcome": "refresh",
    "refresherd.refresh.circuits": "refresh",
    "refresherd.refresh.providers": "refresh",
    "refresherd.refresh.storage": "refresh",
    "refresherd.refresh.leases": "refresh",
    "refresherd.refresh.flights": "refresh",
    "refresherd.refresh.record": "refresh",
    "refresherd.refresh.series": "refresh",
    "refresherd.refresh.grants": "refresh",
    "refresherd.refresh.refresher": "refresh",
    # orchestration: due claims, hooks, expiry, background loops; the token API.
    "refresherd.scheduler": "orchestration",
    "refresherd.expiry": "orchestration",
    "refresherd.hooks": "orchestration",
    "refresherd.supervisor": "orchestration",
    "refresherd.migrate": "orchestration",  # a whole database moved between two stores
    # The token API drives the refresher (Refresher.refresh, exclusive, detach): an inbound
    # adapter stands on what it drives. web.app and web.auth, the ASGI app and the bearer
    # check without routes that refresh, stay adapters.
    "refresherd.web.tokens": "orchestration",
    "refresherd.web.connect": "orchestration",  # connect links and the callback: as web.tokens
    # composition: the runtime built from settings.
    "refresherd.daemon": "composition",
    "refresherd.workers": "composition",
    # entry: the command line, which may import everything (lazily).
    "refresherd.__main__": "entry",
    "refresherd.cli": "entry",
    "refresherd.cli.__main__": "entry",
    "refresherd.cli.parser": "entry",
    "refresherd.cli.common": "entry",
    "refresherd.cli.check": "entry",
    "refresherd.cli.run": "entry",
    "refresherd.cli.tokens": "entry",
    "refresherd.cli.importing": "entry",
    "refresherd.cli.completion": "entry",
    "refresherd.cli.endings": "entry",
    "refresherd.cli.refresh": "entry",
    "refresherd.cli.connect": "entry",
    "refresherd.cli.rekey": "entry",
    "refresherd.cli.migrate": "entry",
    "refresherd.cli.demo": "entry",
    "refresherd.demo": "entry",  # the daemon against the fake IdP
    # apart
    "refresherd.testing": APART,
    "refresherd.testing.__main__": APART,
    "refresherd.testing.server": APART,
    "refresherd.testing.ledger": APART,
    "refresherd.testing.faults": APART,
    # The applications' client of the token API: httpx and anyio only, nothing of the daemon.
    "refresherd.client": APART,
    "refresherd.client.sidecar": APART,
    "refresherd.client.tokens": APART,
    "refresherd.client.httpx_auth": APART,
    "refresherd.client.requests_auth": APART,
}

# (importer, imported): imports against the layer rule, each with its reason. Keep it short.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Edges left out of the cycle check, each with its reason.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    where: str  # "module", "function" or "type-checking"
    path: str  # the importer's file, from the repository's root

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} -> {self.imported} ({self.where} import)"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    node: ast.AST, where: str, package: list[str]
) -> Iterator[tuple[str, tuple[str, ...], int, str]]:
    """(module, names imported from it or (), line, where) of every import under ``node``;
    relative imports resolved against ``package``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _imports(child, "function", package)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _imports(
                    ast.Module(body=[stmt], type_ignores=[]), "type-checking", package
                )
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), where, package)
        elif isinstance(child, ast.Import):
            for alias in child.names:
                yield alias.name, (), child.lineno, where
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                parts = package[: len(package) - (child.level - 1)]
                base = ".".join([*parts, *([base] if base else [])])
            yield base, tuple(a.name for a in child.names), child.lineno, where
        else:
            yield from _imports(child, where, package)


def import_graph(root: Path = PACKAGE) -> list[Import]:
    """Every import of one module of the package by another, once per (importer, imported,
    where). ``from a import b`` imports the module ``a.b`` when there is one, else ``a``;
    importing a module is not counted as importing the packages above it (their
    ``__init__`` runs first, but that is Python's doing, not a dependency)."""
    known = modules(root)
    found: dict[tuple[str, str, str], Import] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for base, names, line, where in _imports(tree, "module", package):
            targets = {f"{base}.{n}" if f"{base}.{n}" in known else base for n in names}
            for target in targets or {base}:
                if target in known and target != name:
                    found.setdefault(
                        (name, target, where),
                        Import(name, target, line, where, str(path.relative_to(root.parent))),
                    )
    return sorted(found.values(), key=lambda i: (i.importer, i.imported, i.where))


def layer_violations(
    graph: list[Import],
    layer_of: Mapping[str, str],
    known_upward: Mapping[tuple[str, str], str],
) -> list[str]:
    problems = []
    for imp in graph:
        if (imp.importer, imp.imported) in known_upward:
            continue
        src, dst = layer_of.get(imp.importer), layer_of.get(imp.imported)
        if src is None or dst is None:
            continue  # test_every_module_has_a_layer names it
        if src == APART or dst == APART:
            if src != dst and not (dst == APART and src == "entry"):
                problems.append(f"{imp}: {src} -> {dst}; refresherd.testing stands apart")
            continue
        if LAYERS.index(dst) > LAYERS.index(src):
            problems.append(f"{imp}: {src} imports {dst}, a layer above it")
    return problems


def cycles(graph: list[Import], ignored: Mapping[tuple[str, str], str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        if (imp.importer, imp.imported) not in ignored:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


# --------------------------------------------------------------------------- the rules


def test_every_module_has_a_layer() -> None:
    present = set(modules())
    unplaced = sorted(present - set(LAYER_OF))
    assert not unplaced, (
        f"{', '.join(unplaced)}: not placed in a layer. Add each to LAYER_OF in "
        f"tests/test_layers.py: one of {', '.join(LAYERS)} (or {APART!r} for refresherd.testing), "
        "the lowest layer whose modules are all it imports, and say where it stands in "
        "docs/architecture.md"
    )
    stale = sorted(set(LAYER_OF) - present)
    assert not stale, f"LAYER_OF names modules that no longer exist: {', '.join(stale)}"
    assert set(LAYER_OF.values()) <= {*LAYERS, APART}


def test_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph, KNOWN_CYCLE_EDGES)
    detail = [
        str(imp)
        for component in found
        for imp in graph
        if imp.importer in component and imp.imported in component
    ]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_layers_import_only_downwards() -> None:
    problems = layer_violations(import_graph(), LAYER_OF, KNOWN_UPWARD)
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_known_exceptions_still_occur() -> None:
    edges = {(i.importer, i.imported) for i in import_graph()}
    gone = sorted((set(KNOWN_UPWARD) | set(KNOWN_CYCLE_EDGES)) - edges)
    assert not gone, f"fixed: remove from the known exceptions: {gone}"


# --------------------------------------------------------------------------- the checker


def test_the_graph_sees_late_and_type_only_imports() -> None:
    graph = {(i.importer, i.imported, i.where) for i in import_graph()}
    assert ("refresherd.cli", "refresherd.cli.run", "function") in graph
    assert ("refresherd.cli.run", "refresherd.daemon", "module") in graph
    assert ("refresherd.settings", "refresherd.store.location", "type-checking") in graph
    assert ("refresherd.store", "refresherd.store.sqlite", "function") in graph
    assert (
        "refresherd.refresh.record",
        "refresherd.policy",
        "module",
    ) in graph  # from x import mod
    assert ("refresherd.cli", "refresherd.cli.parser", "module") in graph


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    root = tmp_path / "refresherd"
    (root / "cli").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "model.py").write_text("def f():\n    from refresherd import policy\n")
    (root / "policy.py").write_text("from refresherd.model import f\n")
    (root / "cli" / "__init__.py").write_text("from . import parser\n")
    (root / "cli" / "parser.py").write_text("import refresherd.daemon\n")
    (root / "daemon.py").write_text("")
    graph = import_graph(root)
    layer_of = {
        "refresherd": "foundation",
        "refresherd.model": "foundation",
        "refresherd.policy": "pure core",
        "refresherd.daemon": "composition",
        "refresherd.cli": "entry",
        "refresherd.cli.parser": "entry",
    }
    problems = layer_violations(graph, layer_of, {})
    assert len(problems) == 1
    assert "refresherd.model -> refresherd.policy (function import)" in problems[0]
    assert cycles(graph, {}) == [["refresherd.model", "refresherd.policy"]]
    assert ("refresherd.cli", "refresherd.cli.parser") in {(i.importer, i.imported) for i in graph}
