"""How a command ends other than with its result: Ctrl-C (and a wait on stdin that a Ctrl-C
always ends), and a reader of stdout that went away. Imports nothing but the standard
library's smallest modules, so that ``cli.main`` and ``--help`` stay as light as argparse."""

from __future__ import annotations

import os
import select
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


def read_stdin() -> str:
    """All of standard input, as text, in a wait that a signal always ends.

    A plain ``read()`` sleeps through a Ctrl-C that lands a moment before the read begins:
    Python's C-level handler only notes it, and its Python handler (which raises
    KeyboardInterrupt) runs when the read returns, which on a terminal is not until the user
    types more (another Ctrl-C, say). So the wait is on stdin and a wakeup pipe together
    (``signal.set_wakeup_fd``): a signal that lands at any moment wakes it, and its handler
    runs at once. Main thread only (as set_wakeup_fd)."""
    fd = sys.stdin.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    chunks: list[bytes] = []
    try:
        while True:
            ready = select.select([fd, wake_r], [], [])[0]
            if wake_r in ready:
                # A signal landed; its handler runs before the next line here does.
                os.read(wake_r, 512)
            if fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)
    text = b"".join(chunks).decode(sys.stdin.encoding or "utf-8", sys.stdin.errors or "strict")
    # As sys.stdin.read() would give it (universal newlines).
    return text.replace("\r\n", "\n").replace("\r", "\n")
