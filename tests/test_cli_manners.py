"""The command line's manners: what a person at a terminal, a shell pipeline or a shell's
completion takes for granted, each checked on the real ``refresherd`` process.

``--version``; global options after the subcommand too; help on every argument; completion
scripts generated from the parser; Ctrl-C during ``tokens import`` wherever it lands (nothing
imported, one line, exit 130); ``tokens add`` on a terminal says what it waits for; ``tokens
list | head`` ends quietly; a long import shows progress on a terminal and nothing on a pipe;
``tokens list --state/--provider`` and its aligned table; every mistake of a config file in one
run; import errors that say where (the column of a cut-short line, the line of a taken id).

Terminals are real pseudo-terminals (``os.openpty``); Ctrl-C is SIGINT sent to the process, or
the byte a terminal turns into SIGINT, typed on the process's controlling terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import os
import re
import select
import shlex
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEADLINE, LEAKS, read_rows, refresherd_argv, run_cli, wait_until, write_config
from databases import Database

import refresherd
from refresherd.cli import build_parser
from refresherd.cli import main as cli_main
from refresherd.cli.endings import interrupt_once
from refresherd.cli.parser import COMPLETION_SHELLS, TOKEN_STATES
from refresherd.model import State

# The exit status of a process that Ctrl-C ended: 128 + SIGINT. CPython itself may end one by
# SIGINT instead (returncode -2, which a shell shows as 130 too): where a Ctrl-C landed inside
# code it runs through eval() (namedtuple, typing), it takes it for unhandled at exit even
# though refresherd handled it and said so.
INTERRUPTED = (130, -signal.SIGINT)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return config_for(tmp_path, tmp_path / "tokens.db")


def config_for(directory: Path, database: Database) -> Path:
    secret = directory / "client-secret"
    secret.write_text("cs_manners_7c1d\n")
    secret.chmod(0o600)
    LEAKS.add_secret("cs_manners_7c1d")
    provider = {
        "token_url": "http://127.0.0.1:1/connect/token",
        "client_id": "c",
        "client_secret_file": str(secret),
    }
    return write_config(
        directory / "refresherd.toml", database=database, providers={"p": provider, "q": provider}
    )


def jsonl(count: int, *, start: int = 0, provider: str = "p") -> bytes:
    """``count`` import lines; their token values are made up here (no IdP issued them)."""
    return b"".join(
        json.dumps(
            {
                "id": f"set-{i:07d}",
                "provider": provider,
                "access_token": f"at-manners-{i:07d}",
                "refresh_token": f"rt-manners-{i:07d}",
                "expires_in": 3600,
            }
        ).encode()
        + b"\n"
        for i in range(start, start + count)
    )


def stored(database: Database) -> dict[str, dict[str, object]]:
    """Every token set stored; none where the command never created the database."""
    if isinstance(database, Path):
        if not database.exists():
            return {}
        with contextlib.closing(sqlite3.connect(database)) as conn:
            if (
                conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'token_sets'").fetchone()
                is None
            ):
                return {}  # Ctrl-C came while the command created it: no table yet
    return read_rows(database)


def cli_env() -> dict[str, str]:
    # The terminal's size for tqdm; no colour or locale surprises.
    return {**os.environ, "COLUMNS": "100", "LINES": "24", "LC_ALL": "C.UTF-8"}


# --------------------------------------------------------------------------- --version, options


def test_version_is_the_package_version() -> None:
    proc = run_cli(None, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"refresherd {refresherd.__version__}\n"
    assert refresherd.__version__ == importlib.metadata.version("refresherd")


def test_global_options_work_before_and_after_the_subcommand(config: Path, tmp_path: Path) -> None:
    expected = f"{config}: ok (2 provider(s))"
    before = run_cli(config, "check-config")
    after = run_cli(None, "check-config", "--config", str(config))
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert before.stdout.strip() == after.stdout.strip() == expected
    # Below a subcommand's subcommand too, and with the other options around it.
    proc = run_cli(None, "tokens", "list", "--config", str(config), "--json")
    assert proc.returncode != 0 and "tokens.db" in proc.stderr  # no database yet: it read config
    # Given twice, the one nearer the end wins, as with any repeated option.
    absent = tmp_path / "absent.toml"
    proc = run_cli(absent, "check-config", "--config", str(config))
    assert proc.returncode == 0 and proc.stdout.strip() == expected, proc.stderr
    proc = run_cli(config, "check-config", "--config", str(absent))
    assert proc.returncode == 78 and str(absent) in proc.stderr
    # Not given after the subcommand: the one before stands (the subcommand's default must
    # not overwrite it), and without either, $REFRESHERD_CONFIG.
    env = {**os.environ, "REFRESHERD_CONFIG": str(config)}
    proc = run_cli(None, "check-config", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == expected, proc.stderr
    args = build_parser().parse_args(["--config", "a.toml", "tokens", "list"])
    assert args.config == "a.toml"
    assert build_parser().parse_args(["tokens", "list"]).config is None


def walk(
    parser: argparse.ArgumentParser, path: str = "refresherd"
) -> Iterator[tuple[str, argparse.Action]]:
    """Every (command path, argument) of the tree, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert helped.get(name), f"{path} {name}: a subcommand without help"
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_argument_has_help() -> None:
    missing = [
        f"{path} {action.option_strings or action.dest}"
        for path, action in walk(build_parser())
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert missing == []
    hidden = [
        (path, action.dest)
        for path, action in walk(build_parser())
        if action.help == argparse.SUPPRESS
    ]
    assert hidden == [("refresherd run", "worker")]  # started by the daemon itself, not by people
    # And --help prints it: each option of `tokens list` with its words.
    proc = run_cli(None, "tokens", "list", "--help")
    assert proc.returncode == 0
    for words in ("--state", "only sets in this state", "--provider", "--config", "--reveal"):
        assert words in proc.stdout


def test_the_states_a_listing_offers_are_the_states_the_store_knows() -> None:
    assert tuple(state.value for state in State) == TOKEN_STATES


# --------------------------------------------------------------------------- completion


def complete(script: str, *words: str) -> list[str]:
    """What bash offers after ``refresherd WORDS`` (the last word being completed), with the
    completion script loaded as a user's shell would load it."""
    line = " ".join(("refresherd", *words))
    quoted = " ".join(shlex.quote(word) for word in words)
    program = (
        f"source {shlex.quote(script)}\n"
        f"COMP_WORDS=(refresherd {quoted})\n"
        f"COMP_CWORD={len(words)}\nCOMP_LINE={shlex.quote(line)}\n"
        "COMP_POINT=${#COMP_LINE}\n"
        "_shtab_refresherd\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return sorted(filter(None, proc.stdout.splitlines()))


def test_bash_completion_is_valid_bash_and_completes_from_the_parser(tmp_path: Path) -> None:
    proc = run_cli(None, "completion", "bash")
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "refresherd.bash"
    script.write_text(proc.stdout)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    commands = [name for name in build_parser()._subparsers._group_actions[0].choices]  # type: ignore[union-attr]
    for name in commands:
        assert re.search(rf"\b{re.escape(name)}\b", proc.stdout), name
    # It completes as the parser reads: subcommands, options, choices, file names.
    assert complete(str(script), "tok") == ["tokens"]
    assert complete(str(script), "tokens", "") == ["add", "import", "list", "remove", "show"]
    assert "--state" in complete(str(script), "tokens", "list", "--")
    assert complete(str(script), "tokens", "list", "--state", "") == sorted(TOKEN_STATES)
    (tmp_path / "sets.jsonl").write_text("")
    files = complete(str(script), "tokens", "import", str(tmp_path / "se"))
    assert files == [str(tmp_path / "sets.jsonl")]


@pytest.mark.parametrize("shell", [s for s in COMPLETION_SHELLS if s != "bash"])
def test_other_shells_get_a_script_naming_the_commands(shell: str) -> None:
    proc = run_cli(None, "completion", shell)
    assert proc.returncode == 0, proc.stderr
    # tcsh's `complete` spells options without their dashes.
    for name in ("check-config", "tokens", "import", "expiring-within"):
        assert name in proc.stdout
    binary = shutil.which(shell)
    if binary is not None and shell == "zsh":
        check = subprocess.run([binary, "-n", "-c", proc.stdout], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_help_and_completion_import_their_library_only_when_used() -> None:
    # --help stays argparse alone (tests/test_cli.py checks the whole list); shtab and tqdm
    # are loaded by the command that uses them.
    probe = (
        "import sys\nfrom refresherd.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('shtab', 'tqdm') if m in sys.modules), file=sys.stderr)"
    )
    argv = refresherd_argv(None)[:1]
    for args, loaded in ((["--help"], "[]"), (["completion", "bash"], "['shtab']")):
        proc = subprocess.run(
            [*argv, "-c", probe, *args], capture_output=True, text=True, timeout=DEADLINE
        )
        assert proc.stderr.strip().splitlines()[-1] == loaded, proc.stderr


# --------------------------------------------------------------------------- Ctrl-C during import

# read(2)'s number, to see in /proc that a process waits for its input.
READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}.get(os.uname().machine)


def waits_on_stdin(pid: int) -> bool:
    """Whether a thread of ``pid`` is blocked reading its standard input (fd 0)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "syscall").read_text().split()[:2] == [READ_SYSCALL, "0x0"]:
                return True
    return False


def unread(fd: int) -> int:
    """Bytes written to the pipe whose read end ``fd`` is, and not yet read."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def assert_interrupted(proc: subprocess.Popen[bytes], stdout: bytes, stderr: bytes) -> None:
    text = stderr.decode().replace("\r\n", "\n")
    assert proc.returncode in INTERRUPTED, text
    assert "Traceback" not in text and stdout == b"", text
    assert text.strip().splitlines()[-1] == "refresherd: import interrupted: nothing imported"
    # One line: whatever else was printed (the progress bar) is no line of its own.
    assert text.count("\n") <= 2, text


@pytest.mark.skipif(READ_SYSCALL is None, reason="read(2)'s number on this machine is not known")
@pytest.mark.parametrize("sent", [0, 20_000], ids=["before-reading", "mid-read"])
def test_ctrl_c_while_an_import_reads_its_input_imports_nothing(
    config: Path, tmp_path: Path, sent: int
) -> None:
    """The input is a pipe whose writer is this test: it stops writing (after nothing, or
    after 20,000 lines, four chunks, some of them staged), waits until the process has read
    all of it and waits for more, and then Ctrl-C."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        refresherd_argv(config, "tokens", "import"),
        stdin=read_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        if sent:
            with open(write_end, "wb", closefd=False) as writer:
                writer.write(jsonl(sent))
        wait_until(
            lambda: unread(read_end) == 0 and waits_on_stdin(proc.pid),
            interval=0.02,
            what="the import to read all it was given and wait for more",
        )
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        os.close(write_end)  # the writer is still there: it was the Ctrl-C that ended it
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
    assert_interrupted(proc, stdout, stderr)
    assert stored(tmp_path / "tokens.db") == {}
    # Whatever the Ctrl-C cut short (even the database's creation), the next import works.
    proc2 = run_cli(config, "tokens", "import", input=jsonl(3).decode())
    assert proc2.returncode == 0 and proc2.stdout == "imported 3 token set(s)\n", proc2.stderr


class Terminal:
    """A pseudo-terminal (100 columns), and what a process wrote to it."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.output = b""

    def read_until(self, pattern: bytes, timeout: float = DEADLINE) -> re.Match[bytes]:
        """Read until ``pattern`` shows (in the output since the start)."""
        end = time.monotonic() + timeout
        while (found := re.search(pattern, self.output)) is None:
            left = end - time.monotonic()
            assert left > 0, f"{pattern!r} not seen in {self.output[-2000:]!r}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                self.output += os.read(self.master, 65536)
        return found

    def read_rest(self) -> bytes:
        """Everything written until the last process holding the terminal closed it."""
        with contextlib.suppress(OSError):  # EIO: no process holds the other end any more
            while select.select([self.master], [], [], DEADLINE)[0]:
                data = os.read(self.master, 65536)
                if not data:
                    break
                self.output += data
        return self.output

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    tty = Terminal()
    try:
        yield tty
    finally:
        tty.close()


@pytest.fixture(scope="module")
def big_import(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100,000 lines (18 MB): seconds to stage, and a final move long enough to land in."""
    path = tmp_path_factory.mktemp("import") / "big.jsonl"
    path.write_bytes(jsonl(100_000))
    return path


def import_on_a_terminal(config: Path, path: Path, terminal: Terminal) -> subprocess.Popen[bytes]:
    """``tokens import PATH`` with stderr on ``terminal`` (so that it shows its progress)."""
    proc = subprocess.Popen(
        refresherd_argv(config, "tokens", "import", str(path)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal.slave,
        env=cli_env(),
    )
    os.close(terminal.slave)
    return proc


@pytest.mark.parametrize("when", ["mid-insert", "moving-in"])
def test_ctrl_c_while_an_import_writes_imports_nothing(
    tmp_path: Path, db: Database, big_import: Path, terminal: Terminal, when: str
) -> None:
    """Seen on its progress: while chunks are being staged (10,000 lines read and more to
    come), or once the whole input is staged and the last step, moving the rows into
    token_sets (which ends in the commit), has begun. Both backends: the statement running
    is stopped, the transaction rolled back."""
    config = config_for(tmp_path, db)
    proc = import_on_a_terminal(config, big_import, terminal)
    try:
        if when == "mid-insert":
            terminal.read_until(rb"import: +\d+%.*?\b[1-9]\d,\d{3} lines")
        else:
            terminal.read_until(rb"writing 100,000 token set\(s\) to the database")
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_interrupted(proc, stdout, terminal.read_rest())
    assert stored(db) == {}
    # And the same database takes the same import afterwards, whole.
    proc = subprocess.Popen(
        refresherd_argv(config, "tokens", "import", str(big_import)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = proc.communicate(timeout=DEADLINE * 3)
    assert proc.returncode == 0 and stdout == b"imported 100000 token set(s)\n", stderr
    assert stderr == b""  # no terminal: no progress


def test_a_second_ctrl_c_during_an_interrupted_import_changes_nothing(
    config: Path, tmp_path: Path, big_import: Path, terminal: Terminal
) -> None:
    proc = import_on_a_terminal(config, big_import, terminal)
    try:
        terminal.read_until(rb"\b[1-9]\d,\d{3} lines")
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
        stdout, _ = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_interrupted(proc, stdout, terminal.read_rest())
    assert stored(tmp_path / "tokens.db") == {}


def test_a_long_import_shows_progress_on_a_terminal_and_none_on_a_pipe(
    config: Path, tmp_path: Path, terminal: Terminal
) -> None:
    path = tmp_path / "sets.jsonl"
    path.write_bytes(jsonl(30_000))
    proc = import_on_a_terminal(config, path, terminal)
    stdout, _ = proc.communicate(timeout=DEADLINE)
    shown = terminal.read_rest().decode()
    assert proc.returncode == 0 and stdout == b"imported 30000 token set(s)\n", shown
    # tqdm's bar: the share of the file read, its size, and the lines so far; then the move.
    size = f"{path.stat().st_size / 1024 / 1024:.2f}M"
    bars = re.findall(
        r"import: +(\d+)%\|.*?\| ([\d.]+[kM]?)/([\d.]+M) \[.*?(?:, ([\d,]+) lines)?\]", shown
    )
    assert bars and bars[-1][:3] == ("100", size, size) and bars[-1][3] == "30,000", shown
    assert "import: writing 30,000 token set(s) to the database..." in shown
    assert len(stored(tmp_path / "tokens.db")) == 30_000

    # On a pipe: the result on stdout, not a byte on stderr.
    more = tmp_path / "more.jsonl"
    more.write_bytes(jsonl(30_000, start=30_000))
    proc2 = run_cli(config, "tokens", "import", str(more))
    assert proc2.returncode == 0 and proc2.stdout == "imported 30000 token set(s)\n"
    assert proc2.stderr == ""


# --------------------------------------------------------------------------- tokens add, a terminal


def as_a_shell_starts_a_foreground_job() -> None:
    """In the child before exec: Ctrl-C's SIGINT at its default and no signal blocked, as an
    interactive shell starts a foreground job. Both would otherwise come from this test's own
    process (an ignored signal and the signal mask survive exec), and a refresherd started
    with SIGINT ignored rightly keeps ignoring it, as under nohup."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def add_on_a_terminal(config: Path, terminal: Terminal) -> subprocess.Popen[bytes]:
    """``tokens add alice`` in a session of its own whose controlling terminal is
    ``terminal``, as a shell runs it: what is typed there reaches it, Ctrl-C included."""
    setsid = shutil.which("setsid")
    if setsid is None:
        pytest.skip("setsid (util-linux) is needed to give the process a controlling terminal")
    proc = subprocess.Popen(
        [setsid, "--ctty", *refresherd_argv(config, "tokens", "add", "alice", "--provider", "p")],
        stdin=terminal.slave,
        stdout=terminal.slave,
        stderr=terminal.slave,
        env=cli_env(),
        preexec_fn=as_a_shell_starts_a_foreground_job,
    )
    os.close(terminal.slave)
    return proc


def process_state(pid: int, terminal: Terminal) -> str:
    """What a process that should have ended is doing: its state, signal masks, where the
    kernel has it wait, its stack (root), its threads, its terminal's foreground process group
    and what it wrote so far."""
    parts = []
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text()
        keep = ("State", "SigQ", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt", "Threads")
        parts += [line for line in status.splitlines() if line.startswith(keep)]
    for name in ("wchan", "stack", "stat"):
        with contextlib.suppress(OSError):
            parts.append(f"{name}: " + Path(f"/proc/{pid}/{name}").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(f"terminal foreground pgrp {os.tcgetpgrp(terminal.master)}")
    with contextlib.suppress(OSError):
        while select.select([terminal.master], [], [], 0.2)[0]:
            terminal.output += os.read(terminal.master, 65536)
    parts.append(f"output: {terminal.output[-600:]!r}")
    return "\n".join(parts)


PROMPT = rb"Paste the token response JSON for 'alice' \(provider p\), then press Ctrl-D"


def test_tokens_add_on_a_terminal_says_what_it_waits_for(
    config: Path, tmp_path: Path, terminal: Terminal
) -> None:
    proc = add_on_a_terminal(config, terminal)
    try:
        terminal.read_until(PROMPT)
        terminal.type(b'{"refresh_token": "rt-typed-1", "access_token": "at-typed-1"}\n\x04')
        terminal.read_until(rb"added alice \(provider p, next refresh ")
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stored(tmp_path / "tokens.db")["alice"]["refresh_token"] == "rt-typed-1"
    # Not on a pipe: there nobody reads a prompt.
    proc2 = run_cli(
        config, "tokens", "add", "bob", "--provider", "p", input='{"refresh_token": "r"}'
    )
    assert proc2.returncode == 0 and proc2.stderr == "", proc2.stderr


def test_ctrl_c_twice_while_tokens_add_waits_prints_one_line(
    config: Path, tmp_path: Path, terminal: Terminal
) -> None:
    # A terminal discards its pending output on Ctrl-C (unless NOFLSH): a second Ctrl-C typed
    # just after refresherd wrote its line, before this test read it, would take the line away.
    # A terminal's reader shows output at once; this test reads after, so keep the output.
    attrs = termios.tcgetattr(terminal.slave)
    attrs[3] |= termios.NOFLSH
    termios.tcsetattr(terminal.slave, termios.TCSANOW, attrs)
    proc = add_on_a_terminal(config, terminal)
    try:
        terminal.read_until(PROMPT)
        terminal.type(b'{"refresh_token": "rt-half')  # half a response typed, then Ctrl-C twice
        # Both at once: the kernel may merge them into one SIGINT or deliver two, the second
        # while the first is handled. That a second can never interrupt the ending is checked
        # without timing by test_after_the_first_ctrl_c_the_next_is_ignored_before_anything_runs.
        terminal.type(b"\x03\x03")
        try:
            code = proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after two Ctrl-Cs: {process_state(proc.pid, terminal)}")
    finally:
        if proc.poll() is None:
            proc.kill()
    shown = terminal.read_rest().decode()
    assert code in INTERRUPTED, shown
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown, shown
    after_prompt = shown.split("Ctrl-C to cancel):", 1)[1]
    # The terminal echoes ^C where the cursor is; refresherd's line is a line of its own.
    # (Echoed too, or dropped with the line Ctrl-C discards: what was typed.)
    lines = [line for line in after_prompt.replace("\r", "").split("\n") if line.strip()]
    # The line is refresherd's last word; the terminal's echo of a Ctrl-C may follow it.
    words = [line for line in lines if line.replace("^C", "").strip()]
    assert words[-1] == "refresherd: add interrupted: nothing added", shown
    assert all(line.replace("^C", "") in '{"refresh_token": "rt-half' for line in words[:-1])
    assert "alice" not in stored(tmp_path / "tokens.db")


# A signal whose C-level handler runs where the read cannot see it: in another thread, the
# main thread having SIGINT blocked. The same as a Ctrl-C landing a moment before the read
# begins (noted, its Python handler waiting for the read to return), made certain.
SIGNAL_THE_READ_DOES_NOT_SEE = """
import os, signal, sys, threading, time
from refresherd.cli.endings import interrupt_once, read_stdin
signal.signal(signal.SIGINT, interrupt_once)
threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGINT))).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
try:
    read_stdin()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("read to the end")
"""


def test_a_ctrl_c_the_read_never_saw_still_ends_the_wait_for_stdin() -> None:
    """``tokens add`` waits on stdin in a way that any SIGINT ends, even one whose handler
    the read never saw (with a plain read this hangs until the test's deadline)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_THE_READ_DOES_NOT_SEE],
        stdin=subprocess.PIPE,  # open, never written: only the signal can end the wait
        stdout=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        code = proc.wait(timeout=DEADLINE)  # stdin held open meanwhile
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdin.close()
    assert (code, proc.stdout.read().decode().strip()) == (130, "interrupted")


def test_read_stdin_reads_to_the_end_as_text() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from refresherd.cli.endings import read_stdin; print(repr(read_stdin()))",
        ],
        input='{"refresh_token": "rt-\u00e9"}\r\nx'.encode() * 3000,
        capture_output=True,
        env=cli_env(),
        timeout=DEADLINE,
        check=True,
    )
    assert proc.stdout.decode().strip() == repr('{"refresh_token": "rt-\u00e9"}\nx' * 3000)


def test_after_the_first_ctrl_c_the_next_is_ignored_before_anything_runs() -> None:
    """A one-shot command's SIGINT handler: the first Ctrl-C raises KeyboardInterrupt with
    further ones already ignored, so no second Ctrl-C can interrupt the ending wherever it
    lands (a race a terminal test can only hit by chance). And main() leaves the handler as
    it found it when not interrupted (a caller in this process)."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, interrupt_once)
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)  # ignored: nothing raised
    finally:
        signal.signal(signal.SIGINT, before)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli_main(["completion", "bash"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


# --------------------------------------------------------------------------- tokens list | head


@pytest.mark.parametrize("args", [(), ("--json",)], ids=["table", "json"])
def test_tokens_list_into_a_reader_that_stops_ends_quietly(
    config: Path, args: tuple[str, ...]
) -> None:
    proc = run_cli(config, "tokens", "import", input=jsonl(3000).decode())
    assert proc.returncode == 0, proc.stderr
    # More than a pipe holds (64 KiB): the reader's going is seen mid-listing.
    shell = subprocess.run(
        ["bash", "-c", '"$@" | head -n 2; echo "status ${PIPESTATUS[0]}" >&2', "bash",
         *refresherd_argv(config, "tokens", "list", *args)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )  # fmt: skip
    assert len(shell.stdout.splitlines()) == 2
    assert shell.stderr == "status 141\n", shell.stderr  # as a process SIGPIPE ended: no traceback


# --------------------------------------------------------------------------- tokens list


def test_tokens_list_filters_by_state_and_provider_in_an_aligned_table(
    config: Path, tmp_path: Path
) -> None:
    body = b"".join(
        json.dumps({"id": token_set_id, "provider": provider, "refresh_token": "rt"}).encode()
        + b"\n"
        for token_set_id, provider in (
            ("a", "p"), ("customer-0042", "p"), ("b2", "q"), ("a-much-longer-token-set-id", "q"),
        )
    )  # fmt: skip
    assert run_cli(config, "tokens", "import", input=body.decode()).returncode == 0
    # States as the daemon leaves them after a failed refresh and a refused refresh token.
    with sqlite3.connect(tmp_path / "tokens.db") as conn:
        conn.execute(
            "UPDATE token_sets SET state = 'failing', failures = 1, last_error = ? WHERE id = ?",
            ("http_503: the IdP\nanswered 503", "customer-0042"),
        )
        conn.execute(
            "UPDATE token_sets SET state = 'invalidated', invalid_reason = 'invalid_grant',"
            " last_error = 'invalid_grant' WHERE id = 'b2'"
        )
    conn.close()

    def listed(*args: str) -> list[str]:
        proc = run_cli(config, "tokens", "list", *args)
        assert proc.returncode == 0, proc.stderr
        if "--json" in args:
            return [item["id"] for item in json.loads(proc.stdout)]
        return [line.split()[0] for line in proc.stdout.splitlines()[1:]]

    everyone = ["a", "a-much-longer-token-set-id", "b2", "customer-0042"]
    assert listed() == everyone
    assert listed("--state", "failing") == ["customer-0042"]
    assert listed("--state", "failing", "--state", "invalidated") == ["b2", "customer-0042"]
    assert listed("--provider", "q") == ["a-much-longer-token-set-id", "b2"]
    assert listed("--provider", "q", "--state", "active", "--json") == [
        "a-much-longer-token-set-id"
    ]
    assert listed("--state", "invalidated", "--provider", "p") == []
    proc = run_cli(config, "tokens", "list", "--provider", "zz")
    assert proc.returncode == 0 and "provider 'zz' is not configured" in proc.stderr
    proc = run_cli(config, "tokens", "list", "--state", "broken")
    assert proc.returncode == 2 and "invalid choice: 'broken'" in proc.stderr

    # Each column as wide as its longest value: every cell starts where its header does.
    header, *rows = run_cli(config, "tokens", "list").stdout.splitlines()
    names = header.split()
    starts = [header.index(name) for name in names]
    assert header[starts[1] - 2 : starts[1]] == "  "
    for row in rows:
        for column, start in enumerate(starts):
            assert row[start - 2 : start] == "  " if column else True, (row, names[column])
            assert row[start] != " ", (row, names[column])
        assert len(row.split()) >= len(names)
    by_id = {row.split()[0]: row for row in rows}
    error_at = starts[names.index("last_error")]
    # The error's new line is a space in the table: one set, one line.
    assert by_id["customer-0042"][error_at:] == "http_503: the IdP answered 503"
    assert by_id["a"][starts[names.index("state")] :].split()[0] == "active"
    assert by_id["a"][error_at:] == "-"


# --------------------------------------------------------------------------- errors that say where


def test_three_mistakes_in_a_config_file_are_reported_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "refresherd.toml"
    path.write_text(
        "[daemon]\n"
        f'databse = "{tmp_path / "tokens.db"}"\n'
        'concurrency = "8"\n'
        "\n[providers.p]\n"
        'token_url = "ftp://idp.example.com/token"\n'
        'client_id = "c"\n'
        'client_secret_env = "P_SECRET"\n'
    )
    proc = run_cli(path, "check-config", env={**os.environ, "P_SECRET": "cs-from-env"})
    assert proc.returncode == 78
    assert proc.stderr.splitlines() == [
        f'refresherd: {path}: daemon.databse: unknown key; did you mean "database"?',
        f'refresherd: {path}: daemon.concurrency: expected an integer or "auto", got "8"',
        f'refresherd: {path}: providers.p.token_url: expected an https URL such as "https://'
        'connect.visma.com/connect/token", got "ftp://idp.example.com/token"',
    ]
    # Mended, it passes: nothing else was wrong, and nothing was reported twice.
    path.write_text(
        path.read_text()
        .replace("databse", "database")
        .replace('"8"', "8")
        .replace("ftp://idp.example.com", "https://idp.example.com")
    )
    proc = run_cli(path, "check-config", env={**os.environ, "P_SECRET": "cs-from-env"})
    assert proc.returncode == 0, proc.stderr


def test_a_cut_short_import_line_is_reported_where_it_ends(config: Path, tmp_path: Path) -> None:
    cut = '{"id": "b", "provider": "p", "refresh_token": "rt-b"'
    path = tmp_path / "sets.jsonl"
    path.write_bytes(jsonl(1) + cut.encode() + b"\n" + jsonl(1, start=5))
    proc = run_cli(config, "tokens", "import", str(path))
    assert proc.returncode == 65
    assert proc.stderr == (
        f"refresherd: tokens import: {path}:2: not valid JSON: Expecting ',' delimiter at column "
        f"{len(cut) + 1}; the line ends there (cut short?); nothing was imported\n"
    )
    assert stored(tmp_path / "tokens.db") == {}
    # A line with a mistake inside it: the column of the mistake, the line not said to end.
    path.write_bytes(jsonl(1) + b'{"id": "b", "provider" "p"}\n')
    proc = run_cli(config, "tokens", "import", str(path))
    assert f"{path}:2: not valid JSON: Expecting ':' delimiter at column 24;" in proc.stderr


def test_an_import_hitting_a_stored_id_names_its_line(config: Path, tmp_path: Path) -> None:
    assert run_cli(config, "tokens", "import", input=jsonl(1, start=7).decode()).returncode == 0
    path = tmp_path / "sets.jsonl"
    path.write_bytes(jsonl(6) + b"\n" + jsonl(3, start=6))  # set-0000007 on line 9
    for where, args, stdin in ((str(path), (str(path),), None), ("stdin", (), path.read_text())):
        proc = run_cli(config, "tokens", "import", *args, input=stdin)
        assert proc.returncode == 65
        assert proc.stderr == (
            f"refresherd: tokens import: {where}:9: token set 'set-0000007' exists already "
            "(remove it first); nothing was imported\n"
        )
    assert list(stored(tmp_path / "tokens.db")) == ["set-0000007"]
