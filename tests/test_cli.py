"""The ``refresherd`` command line, subcommand by subcommand, as real subprocesses.

The spellings and exit codes are a public contract: 0 ok, 65 bad input data, 66 no such token
set, 75 another process holds the lease, 78 configuration error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    LEAKS,
    DaemonProcess,
    IdPFactory,
    IdPHandle,
    find_leaks,
    free_port,
    import_tokens,
    metric,
    read_rows,
    refresherd_argv,
    run_cli,
    wait_until,
    write_config,
)

from refresherd.config import DEFAULT_CONFIG_PATH
from refresherd.testing import FaultKind

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@dataclass
class Setup:
    idp: IdPHandle
    db: Path
    config: Path

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, *args, input=input)


@pytest.fixture
def setup(tmp_path: Path, idp_factory: IdPFactory) -> Setup:
    idp = idp_factory(grace_period=5, access_token_lifetime=3600)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml", database=db, providers={"p": idp.provider()}
    )
    return Setup(idp, db, config)


def assert_no_token_values(text: str, idp: IdPHandle) -> None:
    leaks = find_leaks(text.encode(), {t.encode() for t in idp.ledger.issued_tokens()})
    assert not leaks, "a token value was printed without --reveal"


def test_leak_scanner_finds_planted_values() -> None:
    needles = {b"rt_abcDEF-_123", b"cs_0011"}
    data = b'{"x": "prefixrt_abcDEF-_123suffix"}\nplain cs_0011\n rt_abcDEF-_12 '
    assert sorted(offset for _, offset in find_leaks(data, needles)) == [13, 42]
    assert find_leaks(b"nothing here", needles) == []


# --------------------------------------------------------------------------- start-up

# What a one-shot command must not load: the daemon and the libraries only it needs (the
# package refresherd.cli imports each command's handler when that command runs).
DAEMON_ONLY = ("refresherd.daemon", "aiohttp", "starlette", "uvicorn", "prometheus_client")


def imported_modules(config: Path | None, *args: str) -> tuple[set[str], str]:
    """Every module ``refresherd ARGS`` imports, as ``python -X importtime`` reports them; and
    its stdout."""
    argv = refresherd_argv(config, *args)
    proc = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    LEAKS.add_output("refresherd -X importtime " + " ".join(args), proc.stdout.encode())
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "refresherd.cli" in names, "python -X importtime reported nothing"
    return names, proc.stdout


def loaded(names: set[str], roots: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that are one of ``roots`` or inside one."""
    return sorted(n for n in names if any(n == r or n.startswith(r + ".") for r in roots))


def daemon_only(names: set[str]) -> list[str]:
    """Which of DAEMON_ONLY ``names`` holds (a package counts with any module of it)."""
    return [root for root in DAEMON_ONLY if loaded(names, (root,))]


@pytest.mark.parametrize("args", [("--help",), ("tokens", "list", "--help")])
def test_help_loads_the_parser_alone(args: tuple[str, ...]) -> None:
    names, stdout = imported_modules(None, *args)
    assert "usage: refresherd" in stdout
    assert daemon_only(names) == []
    assert loaded(names, ("refresherd",)) == [
        "refresherd",
        "refresherd.cli",
        "refresherd.cli.endings",
        "refresherd.cli.parser",
    ]


def test_one_shot_commands_do_not_load_the_daemon(tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("cs_startup_5f1c\n")
    secret.chmod(0o600)
    LEAKS.add_secret("cs_startup_5f1c")
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={
            "p": {
                "token_url": "http://127.0.0.1:1/connect/token",
                "client_id": "c",
                "client_secret_file": str(secret),
            }
        },
    )
    line = {
        "id": "s1",
        "provider": "p",
        "access_token": "at_startup_5f1c",
        "refresh_token": "rt_startup_5f1c",
    }
    LEAKS.add_secret("at_startup_5f1c")
    LEAKS.add_secret("rt_startup_5f1c")
    import_tokens(config, [line])
    names, stdout = imported_modules(config, "tokens", "list")
    assert stdout.splitlines()[1].split()[:3] == ["s1", "p", "active"]
    assert daemon_only(names) == []
    assert "refresherd.store.sqlite" in names  # it did read the database
    names, stdout = imported_modules(config, "check-config")
    assert stdout.strip() == f"{config}: ok (1 provider(s))"
    assert daemon_only(names) == []
    assert "refresherd.store.sqlite" not in names  # it checks the path, opens no database


# --------------------------------------------------------------------------- check-config


def test_check_config_ok(setup: Setup) -> None:
    proc = setup.cli("check-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{setup.config}: ok (1 provider(s))"
    assert setup.idp.client_secret not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("body", "key", "hint"),
    [
        ("[daemon]\nconcurency = 4\n", "daemon.concurency", 'did you mean "concurrency"?'),
        ("concurrency = 4\n[daemon]\n", "concurrency", "put it under [daemon]"),
        ('[daemon]\npoll_interval = "fast"\n', "daemon.poll_interval", 'such as "30s"'),
        ('[log]\nlevel = "loud"\n', "log.level", '"debug", "info", "warning", "error"'),
        (
            '[providers.p]\nclient_secret_env = "REFRESHERD_TEST_UNSET_VAR"\n',
            "providers.p.client_secret_env",
            "REFRESHERD_TEST_UNSET_VAR is not set",
        ),
    ],
)
def test_check_config_errors_exit_78_naming_file_key_and_fix(
    tmp_path: Path, body: str, key: str, hint: str
) -> None:
    path = tmp_path / "bad.toml"
    base = {
        "[daemon]": f'database = "{tmp_path / "t.db"}"',
        "[providers.p]": 'token_url = "http://127.0.0.1:1/connect/token"\nclient_id = "c"\n'
        'client_secret_file = "secret"',
    }
    text = body
    for header, keys in base.items():
        if header in text:
            text = text.replace(header + "\n", f"{header}\n{keys}\n", 1)
        else:
            text += f"\n{header}\n{keys}\n"
    if "client_secret_env" in body:
        text = text.replace('client_secret_file = "secret"\n', "", 1)
    path.write_text(text, encoding="utf-8")
    (tmp_path / "secret").write_text("s3cr3t\n")
    (tmp_path / "secret").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "REFRESHERD_TEST_UNSET_VAR"}
    proc = run_cli(path, "check-config", env=env)
    assert proc.returncode == 78, proc.stderr
    assert proc.stdout == ""
    assert str(path) in proc.stderr
    assert key in proc.stderr
    assert hint in proc.stderr


def database_config(directory: Path, database: Path) -> Path:
    """A config whose only resource is the database: its client secret comes from the
    environment (see run_as), so that another user can read all of it."""
    config = write_config(
        directory / "c.toml",
        database=database,
        providers={
            "p": {
                "token_url": "http://127.0.0.1:1/connect/token",
                "client_id": "c",
                "client_secret_env": "REFRESHERD_TEST_SECRET",
            }
        },
    )
    config.chmod(0o644)
    return config


def run_as(
    prefix: list[str], config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``refresherd`` under a wrapper (another user, a mount namespace); output leak-scanned."""
    secret = "cs_" + os.urandom(12).hex()
    LEAKS.add_secret(secret)
    argv = [*prefix, *refresherd_argv(config, *args)]
    proc = subprocess.run(
        argv,
        env={**os.environ, "REFRESHERD_TEST_SECRET": secret, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    LEAKS.add_output("refresherd " + " ".join(args), (proc.stdout + proc.stderr).encode())
    return proc


def error_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("level") == "error"]


@pytest.mark.parametrize("problem", ["missing", "not_a_directory"])
def test_a_database_directory_that_does_not_exist_is_a_config_error(
    tmp_path: Path, problem: str
) -> None:
    """check-config refuses it, and run exits 78 (EX_CONFIG: systemd does not restart it) with
    one log line naming the path, rather than 1, which systemd restarts for ever."""
    parent = tmp_path / "state"
    if problem == "not_a_directory":
        parent.write_text("a file, not a directory\n")
    database = parent / "tokens.db"
    config = database_config(tmp_path, database)

    checked = run_as([], config, "check-config")
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert checked.stdout == ""
    assert f"{config}: daemon.database: database {database}: " in checked.stderr
    assert str(parent) in checked.stderr

    ran = run_as([], config, "run")
    assert ran.returncode == 78, ran.stderr
    (line,) = error_lines(ran.stderr)
    assert line["event"] == "cannot use the database" and str(parent) in line["error"]
    assert not parent.is_dir()  # nothing made it meanwhile


def mount_namespaces() -> bool:
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(not mount_namespaces(), reason="no mount namespaces (unshare --mount)")
def test_a_read_only_file_system_at_start_stays_a_storage_fault(tmp_path: Path) -> None:
    """Not a config error: a file system remounted read-only after disk errors comes back, and
    systemd restarting the daemon (exit 1) resumes it then (docs/reliability.md, Start-up)."""
    state = tmp_path / "state"
    state.mkdir()
    database = state / "tokens.db"
    config = database_config(tmp_path, database)
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    read_only = ["unshare", "--mount", "sh", "-c", script, "sh", str(state)]

    checked = run_as(read_only, config, "check-config")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    ran = run_as(read_only, config, "run")
    assert ran.returncode == 1, ran.stderr
    (line,) = error_lines(ran.stderr)
    assert line["event"] == "cannot use the database" and "Read-only file system" in line["error"]


@pytest.mark.parametrize("what", ["directory", "file"])
def test_a_database_the_daemon_s_user_may_not_write_is_a_config_error(what: str) -> None:
    """Permissions (say, a database made by root's `tokens import`, or a directory of the wrong
    owner): run exits 78; check-config, perhaps run by another user than the daemon's, warns."""
    base = Path(tempfile.mkdtemp(prefix="refresherd-test-"))
    try:
        base.chmod(0o755)  # other users may read the config and look into state/
        state = base / "state"
        state.mkdir()
        database = state / "tokens.db"
        if what == "file":
            state.chmod(0o777)
            database.touch(mode=0o600)
            expected = f"database {database}: cannot open: Permission denied"
        else:
            state.chmod(0o555)
            expected = f"directory {state} is not writable by this process"
        config = database_config(base, database)
        as_other: list[str] = []
        if os.geteuid() == 0:  # root may write anything: run as nobody
            as_other = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        elif what == "file":  # an ordinary user already: take our own access away
            database.chmod(0)

        checked = run_as(as_other, config, "check-config")
        assert checked.returncode == 0, checked.stderr
        assert "warning" in checked.stderr and expected in checked.stderr

        ran = run_as(as_other, config, "run")
        assert ran.returncode == 78, ran.stderr
        (line,) = error_lines(ran.stderr)
        assert line["event"] == "cannot use the database" and expected in line["error"]
        assert database.exists() == (what == "file")
    finally:
        for path in (base, *base.rglob("*")):
            path.chmod(0o700)
        shutil.rmtree(base)


def test_check_config_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    proc = run_cli(missing, "check-config")
    assert proc.returncode == 78
    assert str(missing) in proc.stderr and "cannot read" in proc.stderr


def test_config_path_resolution(setup: Setup, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text("[daemon]\nnot_a_key = 1\n", encoding="utf-8")
    env = {**os.environ, "REFRESHERD_CONFIG": str(other)}
    # --config wins over $REFRESHERD_CONFIG.
    proc = run_cli(setup.config, "check-config", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{setup.config}: ok")
    # Without --config, $REFRESHERD_CONFIG is used.
    proc = run_cli(None, "check-config", env=env)
    assert proc.returncode == 78
    assert str(other) in proc.stderr and "daemon.not_a_key" in proc.stderr
    env["REFRESHERD_CONFIG"] = str(setup.config)
    proc = run_cli(None, "tokens", "list", "--json", env=env)
    # (the database does not exist yet: the error names the one from the env's config)
    assert str(setup.db) in proc.stderr
    # Neither: the default path.
    if DEFAULT_CONFIG_PATH.exists():
        return
    env.pop("REFRESHERD_CONFIG")
    proc = run_cli(None, "check-config", env=env)
    assert proc.returncode == 78
    assert str(DEFAULT_CONFIG_PATH) in proc.stderr


# --------------------------------------------------------------------------- tokens add / import


def token_response(idp: IdPHandle, user: str, *, access: bool = True) -> dict[str, Any]:
    response = dict(idp.idp.issue(user=user))
    if not access:
        del response["access_token"], response["expires_in"]
    return response


def test_tokens_add(setup: Setup) -> None:
    response = token_response(setup.idp, "alice")
    before = time.time()
    proc = setup.cli("tokens", "add", "alice", "--provider", "p", input=json.dumps(response))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("added alice (provider p, next refresh ")
    assert_no_token_values(proc.stdout + proc.stderr, setup.idp)
    row = read_rows(setup.db)["alice"]
    assert row["refresh_token"] == response["refresh_token"]
    assert row["access_token"] == response["access_token"]
    assert row["provider"] == "p" and row["state"] == "active" and row["version"] == 1
    assert before + 3600 - 5 < row["expires_at"] < time.time() + 3600 + 5
    assert before < row["next_refresh_at"] < row["expires_at"]

    # Without an access token it is due at once.
    proc = setup.cli(
        "tokens", "add", "bob", "--provider", "p",
        input=json.dumps(token_response(setup.idp, "bob", access=False)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_rows(setup.db)["bob"]["next_refresh_at"] <= time.time()

    # The same id again: refused, nothing changed.
    proc = setup.cli(
        "tokens", "add", "alice", "--provider", "p",
        input=json.dumps(token_response(setup.idp, "alice2")),
    )  # fmt: skip
    assert proc.returncode == 65
    assert "'alice' exists already" in proc.stderr
    assert read_rows(setup.db)["alice"]["refresh_token"] == response["refresh_token"]


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ('{"access_token": "at_only", "expires_in": 3600}', "refresh_token is required"),
        ('{"refresh_token": ""}', "refresh_token is required"),
        ("", "not valid JSON"),
        ("{not json", "not valid JSON"),
        ('["refresh_token"]', "expected a JSON object"),
        ('{"refresh_token": "rt_x", "expires_in": "soon"}', "expires_in must be a number"),
    ],
)
def test_tokens_add_bad_input_exits_65(setup: Setup, stdin: str, message: str) -> None:
    proc = setup.cli("tokens", "add", "carol", "--provider", "p", input=stdin)
    assert proc.returncode == 65, proc.stderr
    assert "carol" in proc.stderr and message in proc.stderr
    assert not setup.db.exists() or "carol" not in read_rows(setup.db)


def test_tokens_add_unknown_provider(setup: Setup) -> None:
    body = json.dumps(token_response(setup.idp, "dave"))
    proc = setup.cli("tokens", "add", "dave", "--provider", "nope", input=body)
    assert proc.returncode not in (0, 65, 66)
    assert "'nope' is not configured" in proc.stderr and "known: p" in proc.stderr
    assert not setup.db.exists() or "dave" not in read_rows(setup.db)


def import_line(idp: IdPHandle, token_set_id: str, **extra: object) -> str:
    return json.dumps(
        {"id": token_set_id, "provider": "p", **token_response(idp, token_set_id), **extra}
    )


def test_tokens_import_is_all_or_nothing(setup: Setup, tmp_path: Path) -> None:
    import_tokens(
        setup.config, [{"id": "existing", "provider": "p", **token_response(setup.idp, "e")}]
    )

    bad_files = {
        "missing refresh token": (
            [import_line(setup.idp, "a"), '{"id": "b", "provider": "p", "access_token": "x"}'],
            2,
            "refresh_token is required",
        ),
        "unknown provider": (
            [import_line(setup.idp, "a"), "", import_line(setup.idp, "c", provider="zz")],
            3,
            "'zz' is not configured",
        ),
        "not JSON": (
            [import_line(setup.idp, "a"), import_line(setup.idp, "b"), "{oops"],
            3,
            "JSON",
        ),
        "duplicate id": ([import_line(setup.idp, "a"), import_line(setup.idp, "a")], 2, "twice"),
    }
    for what, (lines, bad_line, message) in bad_files.items():
        path = tmp_path / "import.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        proc = setup.cli("tokens", "import", str(path))
        assert proc.returncode == 65, (what, proc.stderr)
        assert f"{path}:{bad_line}:" in proc.stderr, (what, proc.stderr)
        assert message in proc.stderr and "nothing was imported" in proc.stderr, what
        assert_no_token_values(proc.stdout + proc.stderr, setup.idp)
        assert set(read_rows(setup.db)) == {"existing"}, what

    # An id the database holds already: the transaction adds none of the others either.
    body = import_line(setup.idp, "a") + "\n" + import_line(setup.idp, "existing") + "\n"
    proc = setup.cli("tokens", "import", "-", input=body)
    assert proc.returncode == 65
    assert "'existing' exists already" in proc.stderr and "nothing was imported" in proc.stderr
    assert set(read_rows(setup.db)) == {"existing"}

    proc = setup.cli("tokens", "import", str(tmp_path / "absent.jsonl"))
    assert proc.returncode == 66 and "absent.jsonl" in proc.stderr

    # Good input, from a file, from "-" and from stdin by default.
    path = tmp_path / "good.jsonl"
    path.write_text(import_line(setup.idp, "f1") + "\n\n" + import_line(setup.idp, "f2") + "\n")
    proc = setup.cli("tokens", "import", str(path))
    assert proc.returncode == 0 and proc.stdout.strip() == "imported 2 token set(s)", proc.stderr
    proc = setup.cli("tokens", "import", "-", input=import_line(setup.idp, "s1") + "\n")
    assert proc.returncode == 0 and proc.stdout.strip() == "imported 1 token set(s)", proc.stderr
    proc = setup.cli("tokens", "import", input=import_line(setup.idp, "s2"))
    assert proc.returncode == 0 and proc.stdout.strip() == "imported 1 token set(s)", proc.stderr
    assert set(read_rows(setup.db)) == {"existing", "f1", "f2", "s1", "s2"}


# --------------------------------------------------------------------------- list / show / remove


def test_tokens_list_and_show(setup: Setup) -> None:
    proc = setup.cli("tokens", "list")
    assert proc.returncode != 0 and str(setup.db) in proc.stderr  # no database yet

    import_tokens(
        setup.config,
        [
            {"id": "one", "provider": "p", **token_response(setup.idp, "one")},
            {"id": "two", "provider": "p", **token_response(setup.idp, "two", access=False)},
        ],
    )
    refreshed = setup.cli("refresh", "one")
    assert refreshed.returncode == 0, refreshed.stderr
    rows = read_rows(setup.db)

    proc = setup.cli("tokens", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert_no_token_values(proc.stdout, setup.idp)
    items = {item["id"]: item for item in json.loads(proc.stdout)}
    assert set(items) == {"one", "two"}
    for item in items.values():
        assert {"id", "provider", "state", "expires_at", "last_refresh_at", "last_error"} <= set(
            item
        )
        assert item["provider"] == "p" and item["state"] == "active"
        assert item["last_error"] is None
        assert "access_token" not in item and "refresh_token" not in item
    one = items["one"]
    assert RFC3339_UTC.match(one["expires_at"]), one["expires_at"]
    assert RFC3339_UTC.match(one["last_refresh_at"]), one["last_refresh_at"]
    assert abs(iso_seconds(one["expires_at"]) - rows["one"]["expires_at"]) < 1.0
    assert items["two"]["expires_at"] is None and items["two"]["last_refresh_at"] is None

    proc = setup.cli("tokens", "list")
    assert proc.returncode == 0, proc.stderr
    assert_no_token_values(proc.stdout, setup.idp)
    header, *lines = proc.stdout.splitlines()
    assert header.split() == [
        "id", "provider", "state", "expires_at", "last_refresh_at", "refresh_token_expires_at",
        "last_error",
    ]  # fmt: skip
    assert sorted(line.split()[0] for line in lines) == ["one", "two"]

    proc = setup.cli("tokens", "list", "--json", "--reveal")
    assert proc.returncode == 0, proc.stderr
    revealed = {item["id"]: item for item in json.loads(proc.stdout)}
    for token_set_id, row in rows.items():
        assert revealed[token_set_id]["access_token"] == row["access_token"]
        assert revealed[token_set_id]["refresh_token"] == row["refresh_token"]
    proc = setup.cli("tokens", "list", "--reveal")
    assert (
        rows["one"]["refresh_token"] in proc.stdout and rows["one"]["access_token"] in proc.stdout
    )

    for args in (("--json",), ()):
        proc = setup.cli("tokens", "show", "one", *args)
        assert proc.returncode == 0, proc.stderr
        assert_no_token_values(proc.stdout, setup.idp)
    shown = json.loads(setup.cli("tokens", "show", "one", "--json").stdout)
    assert (
        shown["id"] == "one" and shown["version"] == 2 and shown["expires_at"] == one["expires_at"]
    )
    proc = setup.cli("tokens", "show", "one", "--json", "--reveal")
    assert json.loads(proc.stdout)["refresh_token"] == rows["one"]["refresh_token"]
    proc = setup.cli("tokens", "show", "one", "--reveal")
    assert rows["one"]["refresh_token"] in proc.stdout

    proc = setup.cli("tokens", "show", "nobody", "--json")
    assert proc.returncode == 66 and "nobody" in proc.stderr


def iso_seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_tokens_remove(setup: Setup) -> None:
    import_tokens(setup.config, [{"id": "gone", "provider": "p", **token_response(setup.idp, "g")}])
    proc = setup.cli("tokens", "remove", "gone")
    assert proc.returncode == 0 and proc.stdout.strip() == "removed gone", proc.stderr
    assert setup.cli("tokens", "show", "gone").returncode == 66
    proc = setup.cli("tokens", "remove", "gone")
    assert proc.returncode == 66 and "gone" in proc.stderr


# --------------------------------------------------------------------------- refresh


def test_refresh_rotates_the_stored_token(setup: Setup) -> None:
    response = token_response(setup.idp, "r")
    import_tokens(setup.config, [{"id": "r", "provider": "p", **response}])
    proc = setup.cli("refresh", "r")
    assert proc.returncode == 0, proc.stderr
    assert_no_token_values(proc.stdout + proc.stderr, setup.idp)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["id"] == "r" and summary["outcome"] == "refreshed"
    assert summary["state"] == "active" and RFC3339_UTC.match(summary["expires_at"])

    row = read_rows(setup.db)["r"]
    ledger = setup.idp.ledger
    assert row["version"] == 2
    assert row["refresh_token"] != response["refresh_token"]
    assert row["access_token"] != response["access_token"]
    assert ledger.refreshes == 1 and ledger.is_live(row["refresh_token"])
    assert ledger.family_of(row["refresh_token"]) == ledger.family_of(
        str(response["refresh_token"])
    )
    assert row["lease_owner"] is None and row["attempt_started_at"] is None

    proc = setup.cli("refresh", "nobody")
    assert proc.returncode == 66 and "nobody" in proc.stderr


def test_refresh_of_a_revoked_token_prints_the_state_it_stored(setup: Setup) -> None:
    """The summary shows the token set as stored after the refresh: a revoked refresh token
    makes it invalidated, and the line must not say "active"."""
    response = token_response(setup.idp, "gone")
    import_tokens(setup.config, [{"id": "gone", "provider": "p", **response}])
    setup.idp.idp.revoke(str(response["refresh_token"]))
    proc = setup.cli("refresh", "gone")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_no_token_values(proc.stdout + proc.stderr, setup.idp)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["outcome"] != "refreshed" and summary["reason"] == "invalid_grant"
    row = read_rows(setup.db)["gone"]
    assert row["state"] == "invalidated"
    assert summary["state"] == "invalidated"
    assert setup.idp.ledger.invalid_grants == 1


def test_refresh_while_another_process_holds_the_lease_exits_75(
    tmp_path: Path, idp_factory: IdPFactory
) -> None:
    # A long grace period: the daemon's stalled send is kept open (hedged beside, not
    # abandoned), and its lease held meanwhile.
    idp = idp_factory("slow-idp", grace_period=30)
    db = tmp_path / "tokens.db"
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    setup = Setup(idp, db, config)
    response = token_response(idp, "busy", access=False)  # due at once
    import_tokens(setup.config, [{"id": "busy", "provider": "p", **response}])
    # The daemon's request hangs at the IdP for a while, and the daemon holds the lease.
    # (Its hedges too: every send the daemon may make hangs, so it keeps the lease.)
    idp.faults.add(FaultKind.SLOW, times=5, delay=8.0, process_first=False)
    daemon = DaemonProcess(setup.config, tmp_path / "daemon.log").start()
    try:
        wait_until(lambda: idp.ledger.requests == 1, what="the daemon's request to be in flight")
        assert read_rows(db)["busy"]["lease_owner"] is not None
        proc = setup.cli("refresh", "busy")
        assert proc.returncode == 75, proc.stdout + proc.stderr
        assert "lease" in proc.stderr and "another refresherd process" in proc.stderr
        assert json.loads(proc.stdout)["outcome"] == "leased"
        wait_until(lambda: read_rows(setup.db)["busy"]["version"] == 2, what="the daemon's grant")
    finally:
        code = daemon.stop()
    assert code == 0
    # The CLI sent nothing; the daemon hedged its stalled send (inside the window).
    ledger = idp.ledger
    assert 1 <= ledger.requests <= 5 and ledger.reuses_outside_grace == 0, ledger.snapshot()


# --------------------------------------------------------------------------- demo


def test_demo_runs_and_refreshes(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    LEAKS.add_file(log)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            refresherd_argv(None, "demo", "--duration", "8", "--listen", f"127.0.0.1:{port}"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def refreshed() -> float:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            except httpx.HTTPError:
                return 0.0
            return metric(text, "refresherd_refresh_success_total", provider="demo")

        wait_until(lambda: refreshed() > 0, what="the demo's metrics to show refreshes")
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [e for e in events if e.get("event") == "refresh" and e.get("outcome") == "refreshed"]
    summary = re.search(
        r"the IdP saw (\d+) refreshes, \d+ grace reuses, (\d+) reuses outside grace, "
        r"(\d+) concurrent uses",
        text,
    )
    assert summary is not None, text
    assert int(summary[1]) > 0 and summary[2] == "0" and summary[3] == "0"
