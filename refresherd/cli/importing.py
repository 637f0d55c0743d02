"""``refresherd tokens import``: JSON Lines into the store, all or nothing, as a well-behaved
process.

- The input is read and parsed in a thread of its own, a chunk ahead of the store, which
  stages the chunk before (so that reading, parsing and writing overlap). A daemon thread: one
  blocked on a terminal or on a pipe whose writer is stalled must neither keep Ctrl-C from
  being heard nor keep the process from ending.
- Ctrl-C (SIGINT), wherever it lands before the commit (before reading, mid-read, mid-insert,
  during the final move), cancels the import: the statement running is stopped and the
  transaction rolled back, and one line says that nothing was imported (exit 130, no
  traceback; a second Ctrl-C meanwhile changes nothing). The commit is one step: a Ctrl-C that
  lands in it finds the import done, and the command says what it imported.
- On a terminal, progress on stderr (bytes read, lines, rate; the share done where the input
  is a file), then a line while the rows are moved in; nothing on a pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import stat
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from itertools import islice
from typing import IO, TYPE_CHECKING, Any, Final

import anyio
import anyio.from_thread
import anyio.lowlevel

from refresherd.cli.common import EX_DATAERR, EX_NOINPUT, configured, fail, one_shot
from refresherd.cli.endings import IMPORT_INTERRUPTED, report_interrupted
from refresherd.encryption import cipher_for
from refresherd.intake import InputError, iter_lines
from refresherd.settings import Config
from refresherd.store import NewTokenSet, TokenSetExists, open_store

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

# Lines parsed per chunk handed to the store: large enough that handing one over costs
# nothing, small enough that a Ctrl-C or a bad line is acted on within a fraction of a second.
CHUNK_LINES: Final = 5000

Item = tuple[str, NewTokenSet]


def command(args: argparse.Namespace) -> int:
    loaded = configured(args)
    if isinstance(loaded, int):
        return loaded
    _, config = loaded
    return one_shot(config, import_tokens, config, args)


class _Reader:
    """The input read and parsed in a daemon thread; its chunks sent to the event loop."""

    def __init__(
        self,
        stream: IO[bytes],
        parse: Callable[[Iterable[bytes]], Iterator[Item]],
        send: MemoryObjectSendStream[list[Item]],
    ) -> None:
        self._stream = stream
        self._parse = parse
        self._send = send
        self._token = anyio.lowlevel.current_token()
        # Written by the thread, read by the event loop for progress (whole ints: no lock).
        self.bytes_read = 0
        self.lines_read = 0
        # What the input raised (a bad line, a read error): the import's to report.
        self.error: BaseException | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="refresherd import reader", daemon=True).start()

    def _lines(self) -> Iterator[bytes]:
        for line in self._stream:
            self.bytes_read += len(line)
            self.lines_read += 1
            yield line

    def _run(self) -> None:
        # The stream is this thread's: closed here, never while the thread may be in it.
        with self._stream:
            try:
                items = self._parse(self._lines())
                while chunk := list(islice(items, CHUNK_LINES)):
                    anyio.from_thread.run(self._send.send, chunk, token=self._token)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.RunFinishedError):
                return  # the import stopped listening: it was cancelled, or failed
            except BaseException as exc:  # reported by the import, not here
                self.error = exc
        with contextlib.suppress(anyio.RunFinishedError):
            anyio.from_thread.run_sync(self._send.close, token=self._token)


class _Progress:
    """What a person at a terminal sees while a long import runs (tqdm, on stderr); nothing
    where stderr is no terminal, or where stdin is one (the bar would draw over the typing)."""

    def __init__(self, reader: _Reader, total: int | None, *, shown: bool) -> None:
        self._reader = reader
        self._bar: Any = None
        if shown:
            from tqdm import tqdm  # only when shown: a pipe never pays for it

            self._bar = tqdm(
                total=total,
                desc="import",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def update(self) -> None:
        if self._bar is not None:
            lines, read = self._reader.lines_read, self._reader.bytes_read
            self._bar.set_postfix_str(f"{lines:,} lines", refresh=False)
            self._bar.update(read - self._bar.n)
            # Drawn at each chunk handed over (a few times a second), not at tqdm's own pace,
            # which may skip the last state of the input.
            self._bar.refresh()

    def read_all(self, count: int) -> None:
        """The input is read and staged: the last step, moving the rows in, begins."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            print(f"import: writing {count:,} token set(s) to the database...", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _open_input(path: str) -> IO[bytes]:
    """The input as bytes. Standard input gets a reader of its own on fd 0, not sys.stdin's:
    the thread may still be blocked in it when the interpreter tidies sys.stdin away."""
    if path == "-":
        return open(sys.stdin.fileno(), "rb", closefd=False)
    return open(path, "rb")


def _size(stream: IO[bytes]) -> int | None:
    """The input's size where it is a file (a pipe or a terminal has none)."""
    info = os.fstat(stream.fileno())
    return info.st_size if stat.S_ISREG(info.st_mode) else None


async def import_tokens(config: Config, args: argparse.Namespace) -> int:
    """Streamed into the database all or nothing, in bounded memory (a million lines need no
    more memory than a hundred); Ctrl-C cancels it (see the module docstring)."""
    source = "stdin" if args.file == "-" else args.file
    try:
        stream = _open_input(args.file)
    except OSError as exc:
        return fail(f"tokens import: cannot read {args.file}: {exc.strerror}", EX_NOINPUT)
    imported: list[int] = []
    interrupted = False
    # Heard from here to the end, so that no Ctrl-C of this import ends in a traceback.
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            work = anyio.CancelScope()

            async def on_interrupt() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    work.cancel()  # a second Ctrl-C: the rollback under way is all there is

            tg.start_soon(on_interrupt)
            with work:
                code = await _import(config, stream, source, imported)
            tg.cancel_scope.cancel()
        if imported:  # committed, whenever a Ctrl-C came
            # From here a Ctrl-C (main() reports it) no longer means nothing was imported.
            args.interrupted = "interrupted"
            print(f"imported {imported[0]} token set(s)")
            return 0
        if interrupted:
            return report_interrupted(IMPORT_INTERRUPTED)
        return code


async def _import(config: Config, stream: IO[bytes], source: str, imported: list[int]) -> int:
    """The import proper; ``imported`` gets the count once it is committed."""
    now = time.time()
    rng = random.Random()

    def parse(lines: Iterable[bytes]) -> Iterator[Item]:
        return iter_lines(
            lines,
            source=source,
            providers=config.providers,
            now=now,
            schedule=config.schedule,
            rand=iter(rng.random, None),
        )

    if sys.stdin.isatty() and source == "stdin":
        print(
            "Reading token sets from the terminal: one JSON object per line, then Ctrl-D "
            "(Ctrl-C to cancel)",
            file=sys.stderr,
        )
    send, receive = anyio.create_memory_object_stream[list[Item]](1)
    reader = _Reader(stream, parse, send)
    progress = _Progress(
        reader, _size(stream), shown=sys.stderr.isatty() and not os.isatty(stream.fileno())
    )

    async def chunks() -> AsyncGenerator[list[Item], None]:
        staged = 0
        async with receive:
            async for chunk in receive:
                progress.update()
                yield chunk
                staged += len(chunk)
        if reader.error is not None:
            raise reader.error
        progress.read_all(staged)

    try:
        reader.start()
        # Not cut short: a connection half made would be finished by its own thread after the
        # event loop is gone. A Ctrl-C meanwhile is acted on as soon as the store is open.
        with anyio.CancelScope(shield=True):
            store = await open_store(config.daemon.database, cipher=cipher_for(config.encryption))
        try:
            async with contextlib.aclosing(chunks()) as staged:
                imported.append(await store.import_stream(staged, now=now))
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
    except (InputError, TokenSetExists) as exc:
        return fail(f"tokens import: {exc}; nothing was imported", EX_DATAERR)
    except OSError as exc:
        if exc is not reader.error:
            raise
        return fail(
            f"tokens import: cannot read {source}: {exc.strerror or exc}; nothing was imported",
            EX_NOINPUT,
        )
    finally:
        progress.close()
    return 0
