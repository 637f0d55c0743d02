"""One error tree (refresherd/errors.py): every exception class refresherd defines derives from
``RefresherdError``, and the tree drawn in errors.py's docstring names each one, with its module
and its base, so that the drawing cannot rot.

The classes are found by importing every module of the package and looking at what each
defines, not from a list kept here. Left out, as the docstring says: underscored classes (a
signal that never leaves its module) and the modules that stand apart (test_layers.py's
``APART``: ``refresherd.testing``, which imports nothing of refresherd, so cannot derive from
the tree).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

from test_layers import APART, LAYER_OF

import refresherd
from refresherd import errors
from refresherd.errors import RefresherdError

# Modules that run something when imported (python -m refresherd, python -m refresherd.cli).
RUN_WHEN_IMPORTED = ("refresherd.__main__", "refresherd.cli.__main__")


def package_modules() -> list[str]:
    walked = pkgutil.walk_packages(refresherd.__path__, prefix="refresherd.")
    names = ["refresherd", *(info.name for info in walked)]
    return sorted(n for n in names if n not in RUN_WHEN_IMPORTED and LAYER_OF.get(n) != APART)


def defined_exceptions() -> dict[str, type[BaseException]]:
    """Every public exception class the package defines: its name -> the class."""
    found: dict[str, type[BaseException]] = {}
    for name in package_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
            ):
                assert attr not in found, f"two exception classes named {attr}"
                found[attr] = value
    return found


@dataclass(frozen=True)
class Node:
    name: str
    module: str  # under refresherd.
    parent: str | None


_LINE = re.compile(r"^(?P<tree>[│├└─ ]*)(?P<name>[A-Z]\w+)\s+(?P<module>[a-z][\w.]*)\s+\S")


def drawn_tree(doc: str) -> list[Node]:
    """The tree in errors.py's docstring: a line per class, indented by four columns a level
    (``├── Name   module   what it means``)."""
    nodes: list[Node] = []
    stack: list[str] = []
    for line in doc.splitlines():
        match = _LINE.match(line[4:]) if line.startswith("    ") else None
        if match is None:
            continue
        depth = len(match["tree"]) // 4
        assert depth <= len(stack), f"a level skipped at {line!r}"
        del stack[depth:]
        nodes.append(Node(match["name"], match["module"], stack[-1] if stack else None))
        stack.append(match["name"])
    return nodes


def test_the_tree_is_read() -> None:
    nodes = {n.name: n for n in drawn_tree(errors.__doc__ or "")}
    assert nodes["RefresherdError"] == Node("RefresherdError", "errors", None)
    assert nodes["NotSent"] == Node("NotSent", "idp.failures", "EndpointError")
    assert nodes["DatabaseMisconfigured"].parent == "StoreError"
    assert nodes["DeliveryFailed"].parent == "RefresherdError"


def test_every_exception_derives_from_refresherd_error() -> None:
    strays = sorted(
        f"{cls.__module__}.{name}"
        for name, cls in defined_exceptions().items()
        if not issubclass(cls, RefresherdError)
    )
    assert not strays, (
        f"{', '.join(strays)}: derive from the branch of refresherd.errors.RefresherdError that "
        "says what went wrong, and draw it in the tree of errors.py's docstring"
    )


def test_the_drawn_tree_names_every_exception_its_module_and_base() -> None:
    defined = defined_exceptions()
    drawn = drawn_tree(errors.__doc__ or "")
    names = [n.name for n in drawn]
    assert len(names) == len(set(names)), "a class drawn twice"
    assert sorted(names) == sorted(defined), (
        f"not drawn: {sorted(set(defined) - set(names))}; "
        f"drawn but not defined: {sorted(set(names) - set(defined))}"
    )
    for node in drawn:
        cls = defined[node.name]
        assert cls.__module__ == f"refresherd.{node.module}", (node, cls.__module__)
        # The drawn parent is the class's one base in the tree (other bases, such as
        # InputError's ValueError, are outside it).
        in_tree = [b.__name__ for b in cls.__bases__ if issubclass(b, RefresherdError)]
        expected = [node.parent] if node.parent is not None else []
        assert in_tree == expected, f"{node.name}: drawn under {node.parent}, derives {in_tree}"


def test_errors_imports_nothing_of_refresherd() -> None:
    # So that the lowest module can derive from it (docs/architecture.md, "Errors").
    tree = ast.parse(Path(errors.__file__).read_text(encoding="utf-8"))
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
        elif isinstance(node, ast.Import):
            imported.extend(alias.name for alias in node.names)
    assert not [m for m in imported if m.split(".")[0] == "refresherd"]


def test_except_clauses_that_caught_them_before_still_do() -> None:
    # tokens add/import and the token API catch an InputError as a ValueError.
    assert issubclass(defined_exceptions()["InputError"], ValueError)


def test_the_architecture_document_draws_the_same_tree() -> None:
    """docs/architecture.md, "Errors", shows errors.py's drawing: the two must not drift."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
    drawn = doc.read_text(encoding="utf-8").split("## Errors", 1)[1].split("```", 2)[1].strip()
    assert errors.__doc__ is not None
    source = errors.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    assert drawn == "\n".join(line.removeprefix("    ") for line in source.splitlines())
