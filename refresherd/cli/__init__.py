"""The ``refresherd`` command. Subcommand spellings are a public contract (README).

Exit codes follow sysexits.h where one fits: 65 bad input data, 66 no such token set,
75 temporarily impossible (another process holds the lease), 78 configuration error.
No secret is ever taken from argv: token responses come on stdin or from a file.

A one-shot command pays only for what it uses. This module and :mod:`.parser` (the argparse
tree) import nothing of refresherd beyond them; each command's handler is a module of its own,
imported when that command runs: ``tokens list`` opens the store and never loads the daemon,
aiohttp, Starlette, uvicorn or prometheus-client; ``--help`` loads argparse alone
(tests/test_cli.py checks both with ``python -X importtime``).

| command | handler |
| --- | --- |
| ``run`` | :mod:`.run` (the daemon) |
| ``check-config`` | :mod:`.check` |
| ``tokens add/import/list/show/remove`` | :mod:`.tokens` |
| ``refresh`` | :mod:`.refresh` (the daemon's runtime, for one refresh) |
| ``rekey`` | :mod:`.rekey` |
| ``migrate`` | :mod:`.migrate` |
| ``demo`` | :mod:`.demo` |
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from refresherd.cli.parser import build_parser

__all__ = ["build_parser", "entrypoint", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # One import per command, here and nowhere else: the lazy imports are the point.
    match args.command:
        case "run":
            from refresherd.cli.run import command
        case "check-config":
            from refresherd.cli.check import command
        case "tokens":
            from refresherd.cli.tokens import command
        case "refresh":
            from refresherd.cli.refresh import command
        case "rekey":
            from refresherd.cli.rekey import command
        case "migrate":
            from refresherd.cli.migrate import command
        case "demo":
            from refresherd.cli.demo import command
        case other:  # pragma: no cover - argparse refuses an unknown command first
            raise AssertionError(other)
    return command(args)


def entrypoint() -> None:
    sys.exit(main())
