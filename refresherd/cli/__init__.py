"""The ``refresherd`` command. Subcommand spellings are a public contract (README).

Exit codes follow sysexits.h where one fits: 65 bad input data, 66 no such token set,
75 temporarily impossible (another process holds the lease), 78 configuration error.
No secret is ever taken from argv: token responses come on stdin or from a file.

A one-shot command pays only for what it uses. This module, :mod:`.parser` (the argparse
tree) and :mod:`.endings` import nothing of refresherd beyond them; each command's handler is a
module of its own, imported when that command runs: ``tokens list`` opens the store and never
loads the daemon, aiohttp, Starlette, uvicorn or prometheus-client; ``--help`` loads argparse
alone (tests/test_cli.py checks both with ``python -X importtime``).

| command | handler |
| --- | --- |
| ``run`` | :mod:`.run` (the daemon) |
| ``check-config`` | :mod:`.check` |
| ``tokens add/list/show/remove`` | :mod:`.tokens` |
| ``tokens import`` | :mod:`.importing` |
| ``refresh`` | :mod:`.refresh` (the daemon's runtime, for one refresh) |
| ``connect`` | :mod:`.connect` (a connect link, kept in the store) |
| ``rekey`` | :mod:`.rekey` |
| ``migrate`` | :mod:`.migrate` |
| ``demo`` | :mod:`.demo` |
| ``completion`` | :mod:`.completion` |

What every command shares, here: a reader that goes away (``tokens list | head``) ends the
command quietly, and Ctrl-C that a command does not handle itself ends it with one line and
status 130, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from refresherd.cli.endings import EX_BROKEN_PIPE, interrupt_once, report_interrupted
from refresherd.cli.parser import build_parser

__all__ = ["build_parser", "entrypoint", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
            # The daemon handles its own signals; a SIGINT ignored by whoever started us (a
            # background job) stays ignored.
            default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
            if args.command != "run" and default:
                signal.signal(signal.SIGINT, interrupt_once)
            return _run(args)
        finally:
            # Within the handlers: a reader gone by now is a broken pipe too.
            sys.stdout.flush()
            # Not interrupted: as it was, for a caller in this process (interrupted, it stays
            # ignored while we end).
            if signal.getsignal(signal.SIGINT) is interrupt_once:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except BrokenPipeError:
        # Python's "Note on SIGPIPE": the rest of the output goes to /dev/null, so that the
        # interpreter's own flush at exit does not fail again (and print a traceback).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EX_BROKEN_PIPE
    except KeyboardInterrupt:
        # Ignored already where interrupt_once raised it; for the daemon's start-up, from here.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # What a command's interruption leaves behind, where it says (parser.py).
        return report_interrupted(getattr(args, "interrupted", "interrupted"))


def _run(args: argparse.Namespace) -> int:
    # One import per command, here and nowhere else: the lazy imports are the point.
    match args.command:
        case "run":
            from refresherd.cli.run import command
        case "check-config":
            from refresherd.cli.check import command
        case "tokens" if args.tokens_command == "import":
            from refresherd.cli.importing import command
        case "tokens":
            from refresherd.cli.tokens import command
        case "refresh":
            from refresherd.cli.refresh import command
        case "connect":
            from refresherd.cli.connect import command
        case "rekey":
            from refresherd.cli.rekey import command
        case "migrate":
            from refresherd.cli.migrate import command
        case "demo":
            from refresherd.cli.demo import command
        case "completion":
            from refresherd.cli.completion import command
        case other:  # pragma: no cover - argparse refuses an unknown command first
            raise AssertionError(other)
    return command(args)


def entrypoint() -> None:
    sys.exit(main())
