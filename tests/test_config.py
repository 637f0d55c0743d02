"""The config loader: TOML → validated Config, with errors that name file, key and expectation."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refresherd.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ConfigProblems,
    load_config,
    resolve_config_path,
)
from refresherd.model import AuthMethod, RefreshTokenUsage, Secret
from refresherd.settings import EX_CONFIG, Config, format_duration, parse_duration
from refresherd.store import PostgresLocation

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Val!ue-9f8e7d"  # distinctive, so that any leak is found by substring
ENV = {"VISMA_CLIENT_SECRET": SECRET}

MINIMAL = """\
[daemon]
database = "tokens.db"

[providers.visma]
token_url = "https://connect.visma.com/connect/token"
client_id = "isv_example"
client_secret_env = "VISMA_CLIENT_SECRET"
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env=ENV if env is None else env)


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV if env is None else env)
    return info.value


def assert_error(exc: ConfigError, tmp_path: Path, key: str, *expected: str) -> None:
    """The message names the file (as given), the key, and says what was expected."""
    message = str(exc)
    # The expected problem comes first; any other is about another key (one problem a key).
    if isinstance(exc, ConfigProblems):
        keys = [problem.key for problem in exc.problems]
        assert len(keys) == len(set(keys)), message
    assert exc.file == str(tmp_path / "config.toml")
    assert exc.key == key
    assert message.startswith(f"{tmp_path / 'config.toml'}: {key}: "), message
    for fragment in expected:
        assert fragment in message, message
    assert SECRET not in message


def with_provider(extra: str) -> str:
    """MINIMAL with extra lines in [providers.visma]."""
    return MINIMAL + extra + "\n"


# --- whole configs ---------------------------------------------------------------------------


FULL = """\
[daemon]
database = "/var/lib/refresherd/tokens.db"
concurrency = 8
lease_duration = "2m"
shutdown_timeout = "45s"
poll_interval = "250ms"
instance_name = "node-a"

[server]
listen = "[::1]:0"
enabled = false

[log]
level = "debug"
format = "json"

[schedule]
refresh_fraction = 0.5
min_margin = "2m"
jitter = 0
min_interval = "5s"
default_expires_in = "30m"
backoff_initial = "1s"
backoff_max = "1h"
retry_after_max = "5m"
circuit_backoff_initial = "1m"
circuit_backoff_max = "2h"

[providers.visma]
token_url = "https://connect.visma.com/connect/token"
client_id = "isv_example"
client_secret = "s3cr3t-Val!ue-9f8e7d"
auth_method = "client_secret_basic"
refresh_token_usage = "reuse"
grace_period = "1m"
request_timeout = "20s"
connect_timeout = "3s"
scope = "openid offline_access"
max_connections = 4

[providers."local.fake-idp"]
token_url = "http://127.0.0.1:8080/token"
client_id = "test"
client_secret_env = "VISMA_CLIENT_SECRET"
"""


def test_full_config(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    assert config.source == str(tmp_path / "config.toml")
    assert config.warnings == ()
    d = config.daemon
    assert d.database == Path("/var/lib/refresherd/tokens.db")
    assert (d.concurrency, d.lease_duration, d.shutdown_timeout) == (8, 120.0, 45.0)
    assert (d.poll_interval, d.instance_name) == (0.25, "node-a")
    assert (config.server.host, config.server.port, config.server.enabled) == ("::1", 0, False)
    assert (config.log.level, config.log.format) == ("debug", "json")
    s = config.schedule
    assert (s.refresh_fraction, s.min_margin, s.jitter, s.min_interval) == (0.5, 120.0, 0.0, 5.0)
    assert (s.default_expires_in, s.backoff_initial, s.backoff_max) == (1800.0, 1.0, 3600.0)
    assert (s.retry_after_max, s.circuit_backoff_initial, s.circuit_backoff_max) == (
        300.0,
        60.0,
        7200.0,
    )
    assert isinstance(s.jitter, float)
    assert list(config.providers) == ["visma", "local.fake-idp"]
    p = config.providers["visma"]
    assert p.name == "visma"
    assert p.token_url == "https://connect.visma.com/connect/token"
    assert p.client_id == "isv_example"
    assert p.client_secret == Secret(SECRET)
    assert p.auth_method is AuthMethod.CLIENT_SECRET_BASIC
    assert p.refresh_token_usage is RefreshTokenUsage.REUSE
    assert (p.grace_period, p.request_timeout, p.connect_timeout) == (60.0, 20.0, 3.0)
    assert (p.scope, p.max_connections) == ("openid offline_access", 4)
    assert config.providers["local.fake-idp"].token_url == "http://127.0.0.1:8080/token"


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    # Relative to the config file's directory, not to the working directory.
    assert config.daemon.database == tmp_path / "tokens.db"
    d = config.daemon
    assert (d.concurrency, d.lease_duration, d.shutdown_timeout, d.poll_interval) == (
        "auto",
        60.0,
        20.0,
        1.0,
    )
    assert d.instance_name is None
    assert (config.server.host, config.server.port, config.server.enabled) == (
        "127.0.0.1",
        9469,
        True,
    )
    assert (config.log.level, config.log.format) == ("info", "auto")
    s = config.schedule
    assert (s.refresh_fraction, s.min_margin, s.jitter, s.min_interval) == (0.8, 60.0, 0.1, 1.0)
    assert (s.default_expires_in, s.backoff_initial, s.backoff_max) == (3600.0, 5.0, 900.0)
    assert (s.retry_after_max, s.circuit_backoff_initial, s.circuit_backoff_max) == (
        600.0,
        30.0,
        1800.0,
    )
    p = config.providers["visma"]
    assert p.client_secret.reveal() == SECRET
    assert p.auth_method is AuthMethod.CLIENT_SECRET_POST
    assert p.refresh_token_usage is RefreshTokenUsage.ONE_TIME
    assert (p.grace_period, p.request_timeout, p.connect_timeout) == (0.0, 10.0, 5.0)
    assert (p.scope, p.max_connections) == (None, "auto")
    assert config.warnings == ()


def test_relative_config_path_gives_absolute_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load_config("config.toml", env=ENV)
    assert config.source == "config.toml"
    assert config.daemon.database == tmp_path / "tokens.db"


def test_example_config_parses() -> None:
    config = load_config(REPO / "config.example.toml", env=ENV)
    assert config.daemon.database == Path("/var/lib/refresherd/tokens.db")
    visma = config.providers["visma"]
    assert visma.token_url == "https://connect.visma.com/connect/token"
    assert visma.refresh_token_usage is RefreshTokenUsage.ONE_TIME
    assert visma.grace_period > 0
    assert visma.client_secret.reveal() == SECRET
    assert config.warnings == ()


def test_politeness_limits_are_off_unless_set(tmp_path: Path) -> None:
    p = load(tmp_path, MINIMAL).providers["visma"]
    assert (p.max_concurrent_refreshes, p.max_requests_per_second) == (None, None)
    text = with_provider("max_concurrent_refreshes = 8\nmax_requests_per_second = 2.5")
    p = load(tmp_path, text).providers["visma"]
    assert (p.max_concurrent_refreshes, p.max_requests_per_second) == (8, 2.5)


def test_example_config_shows_every_key() -> None:
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    keys = [
        "database", "database_password_file", "database_password_credential", "concurrency",
        "lease_duration", "shutdown_timeout", "poll_interval",
        "instance_name", "listen", "enabled", "level", "format", "refresh_fraction",
        "min_margin", "jitter", "import_spread", "min_interval", "default_expires_in",
        "backoff_initial",
        "backoff_max", "retry_after_max", "circuit_backoff_initial", "circuit_backoff_max",
        "token_url", "client_id", "client_secret", "client_secret_file", "client_secret_env",
        "client_secret_credential", "auth_method", "refresh_token_usage", "grace_period",
        "request_timeout", "connect_timeout", "scope", "max_connections",
        "max_concurrent_refreshes", "max_requests_per_second",
        "refresh_token_lifetime", "preset", "issuer", "key_file", "key_credential",
        "previous_key_files",
    ]  # fmt: skip
    for key in keys:
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), key


# --- reading the file ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    assert str(info.value).startswith(f"{path}: cannot read the config file: No such file")
    assert info.value.key is None


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read"):
        load_config(tmp_path, env=ENV)  # a directory


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(MINIMAL.encode() + b'[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    assert str(info.value) == (
        f"{path}: expected UTF-8 text, found an invalid byte at line 9, column 10"
    )


def test_malformed_toml_gives_line_and_column(tmp_path: Path) -> None:
    exc = load_error(tmp_path, MINIMAL + "[log]\nlevel = info\n")
    assert str(exc).startswith(f"{tmp_path / 'config.toml'}: invalid TOML: ")
    assert "(at line 9, column " in str(exc)


def test_resolve_config_path() -> None:
    env = {"REFRESHERD_CONFIG": "/srv/env.toml"}
    assert resolve_config_path("/srv/cli.toml", env) == Path("/srv/cli.toml")
    assert resolve_config_path(None, env) == Path("/srv/env.toml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH
    assert resolve_config_path(None, {"REFRESHERD_CONFIG": ""}) == DEFAULT_CONFIG_PATH
    with pytest.raises(ConfigError, match="--config"):
        resolve_config_path("", env)
    assert EX_CONFIG == 78


# --- errors, one per class -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        # unknown keys, with a suggestion
        (with_provider('grace_periode = "30s"'), "providers.visma.grace_periode",
         ['unknown key; did you mean "grace_period"?']),
        (MINIMAL + "[deamon]\n", "deamon", ['did you mean "daemon"?']),
        (MINIMAL + "[log]\nlvl = 'info'\n", "log.lvl", ['did you mean "level"?']),
        (MINIMAL + "[log]\nxyzzy = 1\n", "log.xyzzy",
         ["unknown key; expected one of level, format"]),
        ('database = "x"\n' + MINIMAL, "database", ["put it under [daemon]"]),
        # required keys and sections
        (MINIMAL.replace('database = "tokens.db"', ""), "daemon.database",
         ["is required", "SQLite database"]),
        (MINIMAL.replace("[daemon]\n", "[server]\n"), "daemon.database", ["is required"]),
        (MINIMAL.replace('client_id = "isv_example"', ""), "providers.visma.client_id",
         ["is required", "client id"]),
        (MINIMAL.replace('token_url = "https://connect.visma.com/connect/token"', ""),
         "providers.visma.token_url", ["is required", "https://"]),
        ('[daemon]\ndatabase = "x"\n', "providers", ["at least one provider"]),
        ('[daemon]\ndatabase = "x"\n[providers]\n', "providers", ["at least one provider"]),
        # wrong types
        ("daemon = 3\n" + MINIMAL.replace('[daemon]\ndatabase = "tokens.db"\n', ""), "daemon",
         ["expected a table [daemon], got an integer"]),
        (MINIMAL.replace('"tokens.db"', "1"), "daemon.database",
         ["expected a string, got an integer"]),
        (MINIMAL + "[server]\nenabled = 'yes'\n", "server.enabled",
         ["expected true or false, got a string"]),
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\nconcurrency = true'),
         "daemon.concurrency", ['expected an integer or "auto", got a boolean']),
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\nconcurrency = 1.5'),
         "daemon.concurrency", ['expected an integer or "auto", got 1.5']),
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\nconcurrency = "many"'),
         "daemon.concurrency", ['expected an integer or "auto", got "many"']),
        (with_provider('max_connections = "Auto"'), "providers.visma.max_connections",
         ['expected an integer or "auto", got "Auto"']),
        (MINIMAL + "[schedule]\njitter = '0.1'\n", "schedule.jitter",
         ["expected a number, got a string"]),
        (MINIMAL + "[schedule]\njitter = 2024-01-01\n", "schedule.jitter",
         ["expected a number, got a date or time"]),
        (with_provider("scope = ['a', 'b']"), "providers.visma.scope",
         ["expected a string, got an array"]),
        (with_provider('scope = ""'), "providers.visma.scope", ["expected a non-empty string"]),
        (MINIMAL + '[providers]\ntoken_url = "x"\n', "providers.token_url",
         ["expected a provider table such as [providers.visma], got a string"]),
        # ranges
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\nconcurrency = 0'), "daemon.concurrency",
         ["expected an integer of at least 1, got 0"]),
        (with_provider("max_connections = -1"), "providers.visma.max_connections",
         ["at least 1, got -1"]),
        (with_provider("max_concurrent_refreshes = 0"),
         "providers.visma.max_concurrent_refreshes", ["expected an integer of at least 1, got 0"]),
        (with_provider("max_requests_per_second = 0"), "providers.visma.max_requests_per_second",
         ["expected a number from 0.01 to 1000000.0, got 0"]),
        (with_provider("max_requests_per_second = '10/s'"),
         "providers.visma.max_requests_per_second", ["expected a number, got a string"]),
        (MINIMAL + "[schedule]\nrefresh_fraction = 0.99\n", "schedule.refresh_fraction",
         ["expected a number from 0.1 to 0.95, got 0.99"]),
        (MINIMAL + "[schedule]\njitter = nan\n", "schedule.jitter",
         ["from 0.0 to 0.5, got nan"]),
        (MINIMAL + "[schedule]\njitter = -0.1\n", "schedule.jitter", ["from 0.0 to 0.5"]),
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\nlease_duration = "500ms"'),
         "daemon.lease_duration", ['expected a duration of at least 1s, got "500ms"']),
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\npoll_interval = "10ms"'),
         "daemon.poll_interval", ['expected a duration from 50ms to 1m, got "10ms"']),
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\npoll_interval = "61s"'),
         "daemon.poll_interval", ["from 50ms to 1m"]),
        (with_provider('grace_period = "11m"'), "providers.visma.grace_period",
         ['expected a duration of at most 10m, got "11m"']),
        (with_provider('request_timeout = "0s"'), "providers.visma.request_timeout",
         ['expected a duration longer than 0s, got "0s"']),
        (with_provider("grace_period = 30"), "providers.visma.grace_period",
         ['expected a duration such as "30s", "5m" or "1h", got 30']),
        (MINIMAL + '[schedule]\nbackoff_initial = "20m"\n', "schedule.backoff_initial",
         ["expected at most schedule.backoff_max (15m), got 20m"]),
        (MINIMAL + '[schedule]\ncircuit_backoff_max = "10s"\n', "schedule.circuit_backoff_initial",
         ["expected at most schedule.circuit_backoff_max (10s), got 30s"]),
        # enums list the allowed values
        (MINIMAL + "[log]\nlevel = 'verbose'\n", "log.level",
         ['expected one of "debug", "info", "warning", "error", got "verbose"']),
        (MINIMAL + "[log]\nformat = 'text'\n", "log.format",
         ['expected one of "json", "console", "auto", got "text"']),
        (with_provider('auth_method = "basic"'), "providers.visma.auth_method",
         ['expected one of "client_secret_post", "client_secret_basic", got "basic"']),
        (with_provider('refresh_token_usage = "rotating"'), "providers.visma.refresh_token_usage",
         ['expected one of "one_time", "reuse", got "rotating"']),
        # listen
        (MINIMAL + '[server]\nlisten = "9469"\n', "server.listen",
         ['expected "host:port" such as "127.0.0.1:9469" or "[::1]:9469"', 'got "9469"']),
        (MINIMAL + '[server]\nlisten = "::1:9469"\n', "server.listen",
         ["an IPv6 address goes in brackets"]),
        (MINIMAL + '[server]\nlisten = "localhost:65536"\n', "server.listen",
         ["port from 0 to 65535"]),
        (MINIMAL + '[server]\nlisten = "[::1]"\n', "server.listen", ["host:port"]),
        (MINIMAL + '[server]\nlisten = "[nonsense]:1"\n', "server.listen", ["host:port"]),
        (MINIMAL + '[server]\nlisten = ":9469"\n', "server.listen", ["host:port"]),
        (MINIMAL + '[server]\nlisten = "a b:9469"\n', "server.listen", ["host:port"]),
        # provider names are metric labels
        (MINIMAL + '[providers."has space"]\n', 'providers."has space"',
         ["expected a provider name of 1 to 64", "metric label", 'got "has space"']),
        (MINIMAL + f'[providers.{"x" * 65}]\n', f"providers.{'x' * 65}", ["1 to 64"]),
    ],
)  # fmt: skip
def test_errors(tmp_path: Path, text: str, key: str, expected: list[str]) -> None:
    assert_error(load_error(tmp_path, text), tmp_path, key, *expected)


def test_every_mistake_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    """Each wrong key is one problem, in the order of the file's sections, each naming file,
    key and what was expected; the rest of the file is still read."""
    exc = load_error(
        tmp_path,
        MINIMAL.replace('database = "tokens.db"', 'database = "tokens.db"\nconcurrency = 0')
        + '[schedule]\njitter = 2\nbackoff_initial = "1 second"\n'
        + "[log]\nlevel = 'loud'\n"
        + '[providers.okta]\npreset = "okta"\nissuer = "http://okta.example.com"\n'
        + 'client_id = "x"\nclient_secret_env = "VISMA_CLIENT_SECRET"\n'
        + "[encryption]\nkey_flie = 'k'\n",
    )
    assert isinstance(exc, ConfigProblems)
    source = str(tmp_path / "config.toml")
    assert [(p.file, p.key) for p in exc.problems] == [
        (source, "daemon.concurrency"),
        (source, "log.level"),
        (source, "schedule.jitter"),
        (source, "schedule.backoff_initial"),
        (source, "providers.okta.issuer"),
        (source, "encryption.key_flie"),
    ]
    # Stands for the first, as one problem alone would; its text lists them all, a line each.
    assert (exc.file, exc.key) == (source, "daemon.concurrency")
    assert exc.message == "expected an integer of at least 1, got 0"
    assert str(exc).splitlines() == [str(p) for p in exc.problems]
    assert str(exc.problems[-1]).endswith('unknown key; did you mean "key_file"?')
    assert "SQLite" not in str(exc)  # no required-key problem made up from the others


@pytest.mark.parametrize(
    ("text", "key"),
    [
        # A misspelt required key: the misspelling, not "database is required" as well.
        (MINIMAL.replace("database =", "databse ="), "daemon.databse"),
        (MINIMAL.replace("client_secret_env", "client_secert_env"),
         "providers.visma.client_secert_env"),
        # A bound checked against a wrong value: only the wrong value.
        (MINIMAL + '[schedule]\nbackoff_max = "soon"\nbackoff_initial = "1h"\n',
         "schedule.backoff_max"),
        (with_provider('refresh_mode = "keep_alive"\nrefresh_token_idle_lifetime = "a month"'),
         "providers.visma.refresh_token_idle_lifetime"),
        # An unknown preset: the rest of its table means something else under each preset.
        (with_provider('preset = "okt"\nissuer = "not a url"'), "providers.visma.preset"),
        # A section that is no table: not its missing keys as well.
        ("daemon = 3\n" + MINIMAL.replace('[daemon]\ndatabase = "tokens.db"\n', ""), "daemon"),
        # A value wrong in two ways (a string, and far too long for a duration): once.
        (MINIMAL.replace('"tokens.db"', '"tokens.db"\nlease_duration = "forever"'),
         "daemon.lease_duration"),
    ],
)  # fmt: skip
def test_one_mistake_is_one_problem(tmp_path: Path, text: str, key: str) -> None:
    exc = load_error(tmp_path, text)
    assert not isinstance(exc, ConfigProblems), str(exc)
    assert exc.key == key, str(exc)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://connect.visma.com/connect/token", "tokens would travel in clear"),
        ("http://10.0.0.1/token", "only for loopback hosts (127.0.0.0/8, ::1, localhost)"),
        ("ftp://connect.visma.com/token", 'got "ftp://connect.visma.com/token"'),
        ("https:///token", "expected an https URL"),
        ("connect.visma.com/connect/token", "expected an https URL"),
        ("https://host:99999/token", "unparsable URL"),
        ("https://host/token#frag", "without a #fragment"),
        ("https://user:hunter2@host/token", "without a user name or password"),
        ("https://host/to ken", "spaces or control characters"),
    ],
)
def test_token_url_errors(tmp_path: Path, url: str, expected: str) -> None:
    text = MINIMAL.replace("https://connect.visma.com/connect/token", url)
    exc = load_error(tmp_path, text)
    assert_error(exc, tmp_path, "providers.visma.token_url", expected)
    assert "hunter2" not in str(exc)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/token",
        "http://127.9.8.7/token",
        "http://localhost:1234/connect/token",
        "http://[::1]:8080/token",
        "https://login.example.com/oauth2/v2.0/token?p=b2c_1_signin",
    ],
)
def test_token_url_accepted(tmp_path: Path, url: str) -> None:
    text = MINIMAL.replace("https://connect.visma.com/connect/token", url)
    assert load(tmp_path, text).providers["visma"].token_url == url


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("localhost:0", "localhost", 0),
        ("[::]:65535", "::", 65535),
        ("metrics.internal:9469", "metrics.internal", 9469),
    ],
)
def test_listen(tmp_path: Path, listen: str, host: str, port: int) -> None:
    config = load(tmp_path, MINIMAL + f'[server]\nlisten = "{listen}"\n')
    assert (config.server.host, config.server.port) == (host, port)


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("0s", 0.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("180d", 180 * 86400.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("0.25h", 900.0),
        ("007s", 7.0),
        ("1s1ms", 1.001),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, file="f.toml", key="k") == seconds


@pytest.mark.parametrize(
    "value",
    [
        "", "30", "s", "5 m", " 5m", "5m ", "5M", "1w", "-5s", "+5s", "1.s", ".5s", "1e3s",
        "1m1h", "1s1s", "1h1h", "5mss", "1h30", "٣s", "1_000s", "inf", "nan", "1" * 70 + "s",
        30, 1.5, True, None, ["5m"], {"m": 5},
    ],
)  # fmt: skip
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, file="config.toml", key="providers.visma.grace_period")
    message = str(info.value)
    assert message.startswith("config.toml: providers.visma.grace_period: expected a duration")


def test_parse_duration_message_for_bare_integer() -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(30, file="config.toml", key="providers.visma.grace_period")
    assert str(info.value) == (
        'config.toml: providers.visma.grace_period: expected a duration such as "30s", "5m" '
        'or "1h", got 30'
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.5, "500ms"), (90.0, "1m30s"), (5400.0, "1h30m"), (86400.0, "1d")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


units = st.integers(min_value=0, max_value=10**6)


@given(d=units, h=units, m=units, s=units, ms=units)
def test_duration_round_trip(d: int, h: int, m: int, s: int, ms: int) -> None:
    parts = [(d, "d"), (h, "h"), (m, "m"), (s, "s"), (ms, "ms")]
    text = "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"
    total_ms = (((d * 24 + h) * 60 + m) * 60 + s) * 1000 + ms
    seconds = parse_duration(text, file="f", key="k")
    assert seconds == total_ms / 1000
    # The canonical spelling parses back to the same value, and is a fixed point.
    canonical = format_duration(seconds)
    assert parse_duration(canonical, file="f", key="k") == seconds
    assert format_duration(parse_duration(canonical, file="f", key="k")) == canonical


duration_like = st.text(alphabet="0123456789.smhdw -+_", max_size=30)


@given(st.one_of(st.text(), duration_like))
def test_parse_duration_only_raises_config_error(text: str) -> None:
    try:
        seconds = parse_duration(text, file="f", key="k")
    except ConfigError as exc:
        assert exc.key == "k"
    else:
        assert seconds >= 0
        assert seconds < float("inf")


# --- secrets ---------------------------------------------------------------------------------


def provider_with(secret_line: str) -> str:
    return MINIMAL.replace('client_secret_env = "VISMA_CLIENT_SECRET"', secret_line)


def test_secret_inline(tmp_path: Path) -> None:
    config = load(tmp_path, provider_with(f'client_secret = "{SECRET}"'))
    assert config.providers["visma"].client_secret.reveal() == SECRET


def test_secret_file_relative_and_private(tmp_path: Path) -> None:
    secret_file = tmp_path / "visma.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    config = load(tmp_path, provider_with('client_secret_file = "visma.secret"'))
    assert config.providers["visma"].client_secret.reveal() == SECRET
    assert config.warnings == ()


def test_secret_file_readable_by_others_warns(tmp_path: Path) -> None:
    secret_file = tmp_path / "visma.secret"
    secret_file.write_text(SECRET + "\r\n")
    secret_file.chmod(0o644)
    config = load(tmp_path, provider_with(f'client_secret_file = "{secret_file}"'))
    assert config.providers["visma"].client_secret.reveal() == SECRET
    (warning,) = config.warnings
    assert warning.startswith(f"{tmp_path / 'config.toml'}: providers.visma.client_secret_file: ")
    assert str(secret_file) in warning
    assert "0644" in warning
    assert SECRET not in warning


def test_secret_file_readable_by_group_warns(tmp_path: Path) -> None:
    secret_file = tmp_path / "visma.secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o640)
    config = load(tmp_path, provider_with('client_secret_file = "visma.secret"'))
    assert len(config.warnings) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_secret_file_unreadable(tmp_path: Path) -> None:
    secret_file = tmp_path / "visma.secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o000)
    exc = load_error(tmp_path, provider_with('client_secret_file = "visma.secret"'))
    assert_error(exc, tmp_path, "providers.visma.client_secret_file", "Permission denied")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "No such file or directory"),
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"\xff\xfe" + SECRET.encode(), "is not UTF-8"),
        (b"x" * 70_000, "is larger than"),
    ],
)
def test_secret_file_errors(tmp_path: Path, content: bytes | None, expected: str) -> None:
    secret_file = tmp_path / "visma.secret"
    if content is not None:
        secret_file.write_bytes(content)
        secret_file.chmod(0o600)
    exc = load_error(tmp_path, provider_with('client_secret_file = "visma.secret"'))
    assert_error(exc, tmp_path, "providers.visma.client_secret_file", str(secret_file), expected)
    # The chain would carry the raw bytes (the secret) of a decode error.
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_secret_env(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL, env={"VISMA_CLIENT_SECRET": SECRET})
    assert config.providers["visma"].client_secret.reveal() == SECRET


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "environment variable VISMA_CLIENT_SECRET is not set"),
        ({"VISMA_CLIENT_SECRET": ""}, "environment variable VISMA_CLIENT_SECRET is empty"),
    ],
)
def test_secret_env_errors(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    exc = load_error(tmp_path, MINIMAL, env=env)
    assert_error(exc, tmp_path, "providers.visma.client_secret_env", expected)


def test_secret_env_with_a_secret_pasted_in_is_not_repeated(tmp_path: Path) -> None:
    exc = load_error(tmp_path, provider_with(f'client_secret_env = "{SECRET}"'))
    assert_error(exc, tmp_path, "providers.visma.client_secret_env", "name of an environment")


def test_secret_credential(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "visma-secret").write_text(SECRET + "\n")
    (creds / "visma-secret").chmod(0o400)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    config = load(tmp_path, provider_with('client_secret_credential = "visma-secret"'), env)
    assert config.providers["visma"].client_secret.reveal() == SECRET


def test_secret_credential_without_credentials_directory(tmp_path: Path) -> None:
    exc = load_error(tmp_path, provider_with('client_secret_credential = "visma-secret"'), {})
    assert_error(
        exc,
        tmp_path,
        "providers.visma.client_secret_credential",
        "CREDENTIALS_DIRECTORY is not set",
        "LoadCredential=",
    )


def test_secret_credential_missing(tmp_path: Path) -> None:
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    exc = load_error(tmp_path, provider_with('client_secret_credential = "nope"'), env)
    assert_error(exc, tmp_path, "providers.visma.client_secret_credential", str(tmp_path / "nope"))


def test_secret_credential_name_with_slash(tmp_path: Path) -> None:
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    exc = load_error(tmp_path, provider_with('client_secret_credential = "../x"'), env)
    assert_error(exc, tmp_path, "providers.visma.client_secret_credential", "without '/'")


@pytest.mark.parametrize(
    ("lines", "found"),
    [
        ("", "got none"),
        (
            f'client_secret = "{SECRET}"\nclient_secret_env = "VISMA_CLIENT_SECRET"',
            "got client_secret and client_secret_env",
        ),
    ],
)
def test_exactly_one_secret_source(tmp_path: Path, lines: str, found: str) -> None:
    exc = load_error(tmp_path, provider_with(lines))
    assert_error(
        exc,
        tmp_path,
        "providers.visma",
        "expected exactly one of client_secret, client_secret_file, client_secret_env, "
        "client_secret_credential",
        found,
    )


# --- the secret never shows ------------------------------------------------------------------


def test_secret_not_in_repr_or_str_of_config(tmp_path: Path) -> None:
    for line in (f'client_secret = "{SECRET}"', 'client_secret_env = "VISMA_CLIENT_SECRET"'):
        config = load(tmp_path, provider_with(line))
        assert config.providers["visma"].client_secret.reveal() == SECRET
        for shown in (repr(config), str(config), repr(config.providers), str(config.warnings)):
            assert SECRET not in shown


@pytest.mark.parametrize(
    "text",
    [
        provider_with(f'client_secret = "{SECRET}'),  # unterminated string
        provider_with(f'client_secret = "{SECRET}" junk'),
        provider_with(f"client_secret = {SECRET}"),  # not a string
        provider_with(f'client_secret = "{SECRET}"\nclient_secret_env = "X"'),
        provider_with(f'client_secret = "{SECRET}"\nclient_secrt = "{SECRET}"'),
        provider_with(f'client_secrt = "{SECRET}"'),
        provider_with(f'client_secret = "{SECRET}"\ngrace_period = "forever"'),
        provider_with(f'client_secret = "{SECRET}"\nauth_method = 1'),
        provider_with(f'client_secret = "{SECRET}"') + "[server]\nlisten = 1\n",
        provider_with(f'client_secret_env = "{SECRET}"'),
        provider_with('client_secret = ""'),
        provider_with("client_secret = 12345"),
        MINIMAL + "[log]\nlevel = 'loud'\n",
    ],
)
def test_secret_not_in_error_messages(tmp_path: Path, text: str) -> None:
    exc = load_error(tmp_path, text)
    assert SECRET not in str(exc)
    assert SECRET not in repr(exc)
    assert "12345" not in str(exc)
    cause = exc.__cause__ or exc.__context__
    assert cause is None or SECRET not in str(cause)


def test_secret_not_in_error_from_non_utf8_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(provider_with(f'client_secret = "{SECRET}\xff"').encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- [api] and [hooks] ---------------------------------------------------------------------


def test_api_and_hooks_tables(tmp_path: Path) -> None:
    bearer = tmp_path / "api.bearer"
    bearer.write_text("b34r3r\n")
    bearer.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hook-key").write_text("k3y\n")
    config = load(
        tmp_path,
        MINIMAL
        + """
[api]
enabled = true
bearer_token_file = "api.bearer"
unix_socket = "run/api.sock"
unix_socket_mode = "0660"
tcp = false
wait_timeout = "30s"
cache_size = 500

[hooks]
webhook_url = "https://hooks.example.com/x"
webhook_secret_credential = "hook-key"
command = ["bin/on-event", "--quiet"]
events = ["token_set.invalidated"]
backoff_initial = "2s"
backoff_max = "1m"
give_up_after = "1d"
""",
        env={**ENV, "CREDENTIALS_DIRECTORY": str(creds)},
    )
    api, hooks = config.api, config.hooks
    assert api.enabled and api.bearer_token == Secret("b34r3r")
    assert (api.unix_socket, api.unix_socket_mode, api.tcp, api.wait_timeout) == (
        tmp_path / "run/api.sock",
        0o660,
        False,
        30.0,
    )
    assert api.cache_size == 500
    assert hooks.webhook_secret == Secret("k3y") and hooks.enabled
    assert hooks.command == (str(tmp_path / "bin/on-event"), "--quiet")
    assert hooks.events == ("token_set.invalidated",)
    assert (hooks.backoff_initial, hooks.backoff_max, hooks.give_up_after) == (2.0, 60.0, 86400.0)
    assert "b34r3r" not in repr(config) and "k3y" not in repr(config)
    # Off by default.
    default = load(tmp_path, MINIMAL)
    assert not default.api.enabled and not default.hooks.enabled
    assert default.api.cache_size == 10_000


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ("[api]\nenabled = true\n", "api", ["bearer_token_file or bearer_token_credential"]),
        ('[api]\nunix_socket_mode = "0666"\n', "api.unix_socket_mode", ['"0600"', '"0660"']),
        ("[api]\nenabled = true\ntcp = false\n", "api.tcp", ["unix_socket"]),
        ('[api]\nbearer = "x"\n', "api.bearer", ["unknown key"]),
        ("[api]\ncache_size = -1\n", "api.cache_size", ["at least 0", "-1"]),
        ('[hooks]\nwebhook_url = "http://example.com/x"\n', "hooks.webhook_url", ["loopback"]),
        ('[hooks]\ncommand = "script.sh"\n', "hooks.command", ["array of strings"]),
        ('[hooks]\nevents = ["token_set.deleted"]\n', "hooks.events", ["token_set.invalidated"]),
        (
            '[hooks]\nwebhook_url = "https://h.example/x"\n',
            "hooks",
            ["webhook_secret_file or webhook_secret_credential"],
        ),
        (
            '[hooks]\ncommand = ["x"]\nbackoff_initial = "1m"\nbackoff_max = "1s"\n',
            "hooks.backoff_initial",
            ["at most hooks.backoff_max"],
        ),
    ],
)
def test_api_and_hooks_errors(tmp_path: Path, extra: str, key: str, expected: list[str]) -> None:
    assert_error(load_error(tmp_path, MINIMAL + "\n" + extra), tmp_path, key, *expected)


def test_example_config_shows_api_and_hooks_keys() -> None:
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    keys = [
        "bearer_token_file", "bearer_token_credential", "unix_socket", "unix_socket_mode",
        "tcp", "wait_timeout", "cache_size", "webhook_url", "webhook_secret_file",
        "webhook_secret_credential", "webhook_timeout", "command", "command_timeout", "events",
        "give_up_after", "revocation_url",
    ]  # fmt: skip
    for key in keys:
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), key


# ---- [daemon] database: a SQLite file or a PostgreSQL URL ----------------------------------


def with_database(line: str) -> str:
    return MINIMAL.replace('database = "tokens.db"', line)


def test_database_sqlite_url_is_an_absolute_path(tmp_path: Path) -> None:
    config = load(tmp_path, with_database('database = "sqlite:///var/lib/refresherd/t.db"'))
    assert config.daemon.database == Path("/var/lib/refresherd/t.db")


def test_database_postgresql_url(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        with_database(
            'database = "postgresql://refresherd@db.internal:5433/tokens?sslmode=require"'
        ),
    )
    location = config.daemon.database
    assert isinstance(location, PostgresLocation)
    assert location.display == "postgresql://refresherd@db.internal:5433/tokens"
    assert location.dsn.reveal() == (
        "postgresql://refresherd@db.internal:5433/tokens?sslmode=require"
    )
    assert config.warnings == ()


def test_database_password_file_goes_into_the_dsn_only(tmp_path: Path) -> None:
    password = "pg-pass w/@:" + SECRET
    (tmp_path / "db-password").write_text(password + "\n")
    (tmp_path / "db-password").chmod(0o600)
    config = load(
        tmp_path,
        with_database(
            'database = "postgresql://refresherd@127.0.0.1/tokens"\n'
            'database_password_file = "db-password"'
        ),
    )
    location = config.daemon.database
    assert isinstance(location, PostgresLocation)
    assert SECRET not in str(location) and SECRET not in repr(location)
    assert SECRET not in repr(config)
    from urllib.parse import unquote, urlsplit

    assert unquote(urlsplit(location.dsn.reveal()).password or "") == password


def test_database_password_in_the_url_warns_and_is_never_shown(tmp_path: Path) -> None:
    config = load(
        tmp_path, with_database(f'database = "postgresql://refresherd:{SECRET}@db/tokens"')
    )
    assert isinstance(config.daemon.database, PostgresLocation)
    assert str(config.daemon.database) == "postgresql://refresherd@db/tokens"
    assert any("database_password_file" in w for w in config.warnings), config.warnings
    assert all(SECRET not in w for w in config.warnings)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('database = "mysql://db/tokens"', ["unknown database scheme 'mysql'"]),
        ('database = "sqlite://relative.db"', ["absolute path"]),
        ('database = "postgresql:///tokens"', ["names no host"]),
        ('database = "postgresql://db:port/tokens"', ["port that is not a number"]),
        ('database = "postgresql://u:12/pw-x@db/tokens"', ["'/' in the user name or password"]),
        ('database = "tokens.db"\ndatabase_password_file = "pw"', ["postgresql:// database only"]),
    ],
)
def test_database_errors(tmp_path: Path, line: str, expected: list[str]) -> None:
    (tmp_path / "pw").write_text("x")
    (tmp_path / "pw").chmod(0o600)
    error = load_error(tmp_path, with_database(line))
    assert_error(error, tmp_path, "daemon.database", *expected)
    assert "pw-x" not in str(error)


@pytest.mark.parametrize(
    "password", ["a?b" + SECRET, "a#b" + SECRET, "a@b" + SECRET, "1?" + SECRET]
)
def test_database_password_with_url_delimiters_stays_whole_and_hidden(
    tmp_path: Path, password: str
) -> None:
    """libpq ends the password at the '@' before the first '/': a '?', '#' or '@' in it is
    part of it, never a query, a fragment or a host shown in logs."""
    config = load(
        tmp_path,
        with_database(f'database = "postgresql://refresherd:{password}@db.internal:5433/tokens"'),
    )
    location = config.daemon.database
    assert isinstance(location, PostgresLocation)
    assert location.display == "postgresql://refresherd@db.internal:5433/tokens"
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(location.dsn.reveal())
    assert unquote(parts.password or "") == password
    assert (parts.hostname, parts.port, parts.path) == ("db.internal", 5433, "/tokens")


def test_workers_default_to_one_process(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).daemon.workers == 1
    config = load(tmp_path, with_database('database = "tokens.db"\nworkers = 2'))
    assert config.daemon.workers == 2
    assert config.daemon.worker_timeout == 60.0
    text = with_database('database = "tokens.db"\nworkers = 2\nworker_timeout = "90s"')
    assert load(tmp_path, text).daemon.worker_timeout == 90.0


@pytest.mark.parametrize(
    ("lines", "key", "expected"),
    [
        ("workers = 0", "daemon.workers", ["at least 1, got 0"]),
        ("workers = 65", "daemon.workers", ["at most 64, got 65"]),
        ('workers = "2"', "daemon.workers", ["expected an integer"]),
        ("workers = 4\nconcurrency = 3", "daemon.concurrency", ["at least 4", "workers = 4"]),
        ('worker_timeout = "1s"', "daemon.worker_timeout", ["from 3s to 1h"]),
        ("worker_timeout = 30", "daemon.worker_timeout", ["duration"]),
    ],
)
def test_workers_errors(tmp_path: Path, lines: str, key: str, expected: list[str]) -> None:
    text = with_database('database = "tokens.db"\n' + lines)
    assert_error(load_error(tmp_path, text), tmp_path, key, *expected)


def test_workers_need_a_connection_each(tmp_path: Path) -> None:
    text = with_database('database = "tokens.db"\nworkers = 3') + "max_connections = 2\n"
    error = load_error(tmp_path, text)
    assert_error(error, tmp_path, "providers.visma.max_connections", "at least 3, one for each")


def test_concurrency_and_max_connections_may_be_auto_or_a_count(tmp_path: Path) -> None:
    text = MINIMAL.replace('"tokens.db"', '"tokens.db"\nconcurrency = "auto"')
    config = load(tmp_path, text + 'max_connections = "auto"\n')
    assert config.daemon.concurrency == "auto"
    assert config.providers["visma"].max_connections == "auto"
    config = load(tmp_path, MINIMAL.replace('"tokens.db"', '"tokens.db"\nconcurrency = 700'))
    assert config.daemon.concurrency == 700


# --------------------------------------------------------------------------- somewhere to listen

CONNECTING = (
    MINIMAL
    + """authorization_url = "https://connect.visma.com/connect/authorize"
redirect_uri = "https://refresherd.example.com/connect/visma/callback"
"""
)


def test_a_connect_callback_with_nothing_listening_is_said(tmp_path: Path) -> None:
    # A refresh-only fleet member may have no listener: any daemon on the database takes a
    # callback. Said, not refused.
    config = load(tmp_path, CONNECTING + "\n[server]\nenabled = false\n")
    [warning] = [w for w in config.warnings if "connect callback" in w]
    assert "[providers.visma]" in warning and "another daemon" in warning
    # Served on the API's unix socket (one app: the callback is there too), or on [server]'s
    # listener: nothing to say.
    (tmp_path / "bearer").write_text("b" * 40, encoding="utf-8")
    (tmp_path / "bearer").chmod(0o600)
    api = f'\n[api]\nenabled = true\nbearer_token_file = "{tmp_path / "bearer"}"\n'
    config = load(
        tmp_path,
        CONNECTING + "\n[server]\nenabled = false\n" + api + f'unix_socket = "{tmp_path}/a.sock"\n',
    )
    assert not config.server.enabled and config.api.unix_socket is not None
    assert not [w for w in config.warnings if "connect callback" in w]
    assert not [w for w in load(tmp_path, CONNECTING).warnings if "connect callback" in w]


def test_a_token_api_with_nothing_listening_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bearer").write_text("b" * 40, encoding="utf-8")
    (tmp_path / "bearer").chmod(0o600)
    api = f'\n[api]\nenabled = true\nbearer_token_file = "{tmp_path / "bearer"}"\n'
    exc = load_error(tmp_path, MINIMAL + "\n[server]\nenabled = false\n" + api)
    assert_error(exc, tmp_path, "server.enabled", "the token API", "unix_socket")
    # Neither API nor connect: a refresh-only daemon with no listener is fine.
    assert not load(tmp_path, MINIMAL + "\n[server]\nenabled = false\n").server.enabled
