"""How a command ends other than with its result: Ctrl-C, and a reader of stdout that went
away. Imports nothing but sys and signal, so that ``cli.main`` and ``--help`` stay as light as
argparse."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Final

# 128 + the signal's number, as a shell reports a process that signal ended.
EX_INTERRUPTED: Final = 130
EX_BROKEN_PIPE: Final = 141

# What a Ctrl-C leaves behind, said by ``cli.main`` where the command does not say it itself
# (its parser's default ``interrupted``; plain "interrupted" where none is set).
IMPORT_INTERRUPTED: Final = "import interrupted: nothing imported"
ADD_INTERRUPTED: Final = "add interrupted: nothing added"


def report_interrupted(message: str) -> int:
    """The one line that says what a Ctrl-C left behind; the exit status to end with."""
    # Typed on a terminal, Ctrl-C echoed "^C" after what was typed: a line of our own.
    start = "\n" if sys.stdin.isatty() and sys.stderr.isatty() else ""
    print(f"{start}refresherd: {message}", file=sys.stderr)
    return EX_INTERRUPTED


def interrupt_once(signum: int, frame: FrameType | None) -> None:
    """SIGINT's handler for a one-shot command: the first Ctrl-C raises KeyboardInterrupt,
    which ends the command with its one line; further ones are ignored from that moment on,
    before any other code runs, so that none can interrupt that ending wherever it lands (a
    ``finally``, the report itself, or the instant before ``except`` is reached)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt
