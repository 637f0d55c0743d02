"""The loader: TOML → a frozen, validated :class:`~refresherd.settings.Config`. The only module
that reads config files, env and credentials. The types it builds are in
:mod:`refresherd.settings`, which everything else imports instead of this module.

Every mistake in a file is reported in one go: a key that is wrong is recorded (one problem
per key, each naming the file, the key and what was expected) and reading goes on with the
next key; a check across keys runs only on keys that were read without a problem, so that one
mistake is not reported twice. One problem is raised as the :class:`ConfigError` it is; more as
one :class:`ConfigProblems`, which lists them all, in the order of the file's sections.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit

from refresherd.connect import (
    RESPONSE_MODES,
    callback_path,
    config_params,
    return_url_allowed,
)
from refresherd.model import AuthMethod, RefreshMode, RefreshTokenUsage, Secret
from refresherd.presets import PRESETS, apply_preset
from refresherd.settings import (
    HOOK_EVENTS,
    ApiConfig,
    Auto,
    Config,
    ConfigError,
    ConnectConfig,
    DaemonConfig,
    EncryptionConfig,
    HooksConfig,
    LogConfig,
    ProviderConfig,
    ScheduleConfig,
    ServerConfig,
    did_you_mean,
    format_duration,
    is_loopback,
    parse_duration,
    share_problem,
    shown,
    type_name,
)
from refresherd.store import Location, PostgresLocation, has_password, parse_location

# The project targets 3.11+, but the fallback keeps the loader importable on an older interpreter.
if sys.version_info >= (3, 11):  # noqa: UP036
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "ConfigProblems",
    "load_config",
    "parse_config",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/refresherd/config.toml")
CONFIG_ENV_VAR: Final = "REFRESHERD_CONFIG"

T = TypeVar("T")


class ConfigProblems(ConfigError):
    """More than one problem in one file: ``problems``, each a :class:`ConfigError` naming
    the file, the key and what was expected. It stands as the first of them (``file``, ``key``
    and ``message`` are the first's); ``str()`` is every problem, one line each."""

    def __init__(self, problems: Sequence[ConfigError]) -> None:
        first = problems[0]
        super().__init__(first.file, first.key, first.message)
        self.problems = tuple(problems)
        self.args = ("\n".join(str(p) for p in self.problems),)


# --- config path -------------------------------------------------------------------------------


def resolve_config_path(cli_value: str | None, env: Mapping[str, str]) -> Path:
    """``--config PATH``, else ``$REFRESHERD_CONFIG``, else :data:`DEFAULT_CONFIG_PATH`."""
    if cli_value is not None:
        if not cli_value:
            raise ConfigError("--config", None, "expected the path of a TOML file, got nothing")
        return Path(cli_value)
    # An empty variable counts as unset, as shells and unit files commonly leave it.
    from_env = env.get(CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_PATH


# --- loading -----------------------------------------------------------------------------------


def load_config(path: Path | str, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the config file at ``path``; errors name the path as given."""
    source = str(path)
    file_path = Path(path)
    try:
        data = file_path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            source,
            None,
            f"cannot read the config file: {reason}; expected a readable TOML file "
            f"(choose it with --config or ${CONFIG_ENV_VAR})",
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # `from None`: the decode error holds the raw bytes, inline secrets included.
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            source,
            None,
            f"expected UTF-8 text, found an invalid byte at line {line}, column {column}",
        ) from None
    return parse_config(
        text,
        source=source,
        # Absolute, so that relative paths in the file keep working after a chdir.
        base_dir=file_path.absolute().parent,
        env=os.environ if env is None else env,
    )


_SECTIONS: Final = (
    "daemon",
    "server",
    "api",
    "hooks",
    "log",
    "schedule",
    "providers",
    "encryption",
)
_ENCRYPTION_KEYS: Final = ("key_file", "key_credential", "previous_key_files")
# More would only contend for the same database; a process per core is the point.
MAX_WORKERS: Final = 64
# Workers report once a second: a shorter limit would kill busy ones.
MIN_WORKER_TIMEOUT: Final = 3.0
_DAEMON_KEYS: Final = (
    "database",
    "database_password_file",
    "database_password_credential",
    "concurrency",
    "lease_duration",
    "shutdown_timeout",
    "poll_interval",
    "instance_name",
    "workers",
    "worker_timeout",
)
_SERVER_KEYS: Final = ("listen", "enabled")
_LOG_KEYS: Final = ("level", "format")
_API_KEYS: Final = (
    "enabled",
    "bearer_token_file",
    "bearer_token_credential",
    "unix_socket",
    "unix_socket_mode",
    "tcp",
    "wait_timeout",
    "cache_size",
)
_HOOKS_KEYS: Final = (
    "webhook_url",
    "webhook_secret_file",
    "webhook_secret_credential",
    "webhook_timeout",
    "command",
    "command_timeout",
    "events",
    "backoff_initial",
    "backoff_max",
    "give_up_after",
)
_SCHEDULE_KEYS: Final = (
    "refresh_fraction",
    "min_margin",
    "jitter",
    "min_interval",
    "default_expires_in",
    "backoff_initial",
    "backoff_max",
    "retry_after_max",
    "circuit_backoff_initial",
    "circuit_backoff_max",
    "refresh_token_expiry_warning",
    "import_spread",
)
_SECRET_KEYS: Final = (
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "client_secret_credential",
)
# Connecting customers (refresherd.connect): the authorization code flow's first half.
_CONNECT_KEYS: Final = (
    "authorization_url",
    "redirect_uri",
    "return_urls",
    "response_mode",
    "pkce",
    "authorization_scope",
    "authorization_params",
    "link_lifetime",
)
_PROVIDER_KEYS: Final = (
    "preset",
    "token_url",
    "issuer",
    "revocation_url",
    "client_id",
    *_SECRET_KEYS,
    "auth_method",
    "refresh_token_usage",
    "grace_period",
    "request_timeout",
    "connect_timeout",
    "scope",
    "max_connections",
    "max_concurrent_refreshes",
    "max_requests_per_second",
    "refresh_token_lifetime",
    "refresh_token_idle_lifetime",
    "refresh_mode",
    *_CONNECT_KEYS,
)
# A top-level key that belongs to a section gets "put it under [section]" instead of a guess.
_SECTION_OF_KEY: Final = {
    key: section
    for section, keys in (
        ("daemon", _DAEMON_KEYS),
        ("server", _SERVER_KEYS),
        ("log", _LOG_KEYS),
        ("schedule", _SCHEDULE_KEYS),
        ("api", _API_KEYS),
        ("hooks", _HOOKS_KEYS),
        ("providers.NAME", _PROVIDER_KEYS),
    )
    for key in keys
}

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "console", "auto")
# Provider names become metric labels: short, and safe in any exposition format.
_PROVIDER_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV_VAR_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A secret file is a few hundred bytes at most; anything far larger is the wrong file.
_SECRET_FILE_MAX_BYTES: Final = 64 * 1024

_DAEMON_DEFAULTS: Final = DaemonConfig(database=Path())
_SERVER_DEFAULTS: Final = ServerConfig()
_LOG_DEFAULTS: Final = LogConfig()
_SCHEDULE_DEFAULTS: Final = ScheduleConfig()
_PROVIDER_DEFAULTS: Final = ProviderConfig(
    name="", token_url="", client_id="", client_secret=Secret("")
)


def parse_config(text: str, *, source: str, base_dir: Path, env: Mapping[str, str]) -> Config:
    """Parse and validate config text. ``source`` names the file in errors; relative paths in
    the file are taken relative to ``base_dir``; ``env`` supplies ``client_secret_env`` values
    and ``$CREDENTIALS_DIRECTORY``.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The parser's message carries the line and column; `from None` keeps the document
        # (which may hold an inline secret) out of the exception chain.
        raise ConfigError(source, None, f"invalid TOML: {exc}") from None
    ctx = _Context(source=source, base_dir=base_dir, env=env)
    root = _Table(ctx, (), document, _SECTIONS, hints=_SECTION_OF_KEY)
    daemon = root.section("daemon", _parse_daemon)
    server = root.section("server", _parse_server)
    log = root.section("log", _parse_log)
    schedule = root.section("schedule", _parse_schedule)
    providers = root.section("providers", _parse_providers)
    if daemon is not None and providers is not None and not ctx.problems:
        with ctx.collecting():
            _check_shares(ctx, daemon, providers)
    # Last, so that a typo elsewhere is reported before any secret file's problem.
    api = root.section("api", _parse_api)
    hooks = root.section("hooks", _parse_hooks)
    encryption = root.section("encryption", _parse_encryption)
    if server is not None and api is not None and providers is not None:
        _check_listeners(ctx, server, api, providers)
    ctx.raise_problems()
    # With no problem reported, every section was read.
    assert daemon is not None and server is not None and log is not None
    assert schedule is not None and providers is not None
    assert api is not None and hooks is not None
    return Config(
        source=source,
        daemon=daemon,
        server=server,
        api=api,
        hooks=hooks,
        log=log,
        schedule=schedule,
        providers=providers,
        encryption=encryption,
        warnings=tuple(ctx.warnings),
    )


def _check_listeners(
    ctx: _Context, server: ServerConfig, api: ApiConfig, providers: Mapping[str, ProviderConfig]
) -> None:
    """What the daemon serves needs somewhere to be served: [server]'s listener, or the token
    API's unix socket (which serves the same app). An enabled token API with neither is
    refused; a connect callback with neither is said (in a fleet, any daemon on the database
    takes the callback, so a refresh-only member without a listener is fine)."""
    if server.enabled or (api.enabled and api.unix_socket is not None):
        return
    if api.enabled:
        ctx.report(
            ctx.error(
                "server.enabled",
                "is false and [api] has no unix_socket, so nothing would serve the token API "
                "([api] enabled): set [server] enabled = true, or give [api] a unix_socket",
            )
        )
        return
    connecting = sorted(name for name, p in providers.items() if p.connect is not None)
    if connecting:
        names = ", ".join(f"[providers.{n}]" for n in connecting)
        ctx.warnings.append(
            f"[server] enabled is false and the token API has no unix socket: this daemon "
            f"does not serve the connect callback of {names}; another daemon on the same "
            "database must (any daemon takes a callback)"
        )


def _parse_daemon(t: _Table) -> DaemonConfig:
    d = _DAEMON_DEFAULTS
    text = t.required_string(
        "database",
        'the path of the SQLite database, such as "/var/lib/refresherd/tokens.db", or a'
        ' PostgreSQL URL, such as "postgresql://refresherd@db.internal/refresherd"',
    )
    password = _secret(t, "database_password", required=False, what="the PostgreSQL password")
    database: Location = Path()
    if text:  # else reported (as missing, misspelt or not a string)
        try:
            database = parse_location(text, base_dir=t.ctx.base_dir, password=password)
        except ValueError as exc:
            t.report("database", str(exc))
        else:
            if password is not None and not isinstance(database, PostgresLocation):
                t.report("database", "a database password is for a postgresql:// database only")
    if has_password(text):
        t.ctx.warnings.append(
            f"{t.key('database')}: the URL holds a password; keep it in "
            "database_password_file (or a systemd credential) instead"
        )
    return DaemonConfig(
        database=database,
        concurrency=_integer_or_auto(t, "concurrency", minimum=1),
        lease_duration=t.duration("lease_duration", d.lease_duration, minimum=1.0),
        shutdown_timeout=t.duration("shutdown_timeout", d.shutdown_timeout),
        poll_interval=t.duration("poll_interval", d.poll_interval, minimum=0.05, maximum=60.0),
        instance_name=t.optional_string("instance_name"),
        workers=t.integer("workers", d.workers, minimum=1, maximum=MAX_WORKERS),
        worker_timeout=t.duration(
            "worker_timeout", d.worker_timeout, minimum=MIN_WORKER_TIMEOUT, maximum=3600.0
        ),
    )


def _integer_or_auto(t: _Table, name: str, *, minimum: int) -> int | Auto:
    """A count limit that may be left to the daemon: an integer, or "auto" (the default)."""
    if t.data.get(name, "auto") == "auto":
        return "auto"
    value = t.data[name]
    if not isinstance(value, int) or isinstance(value, bool):
        got = shown(value) if isinstance(value, str | float) else type_name(value)
        raise t.error(name, f'expected an integer or "auto", got {got}')
    return t.integer(name, minimum, minimum=minimum)


def _check_shares(
    ctx: _Context, daemon: DaemonConfig, providers: Mapping[str, ProviderConfig]
) -> None:
    problem = share_problem(daemon, providers)
    if problem is not None:
        raise ctx.error(*problem)


def _parse_server(t: _Table) -> ServerConfig:
    d = _SERVER_DEFAULTS
    host, port = d.host, d.port
    listen = t.optional_string("listen")
    if listen is not None:
        with t.ctx.collecting():
            host, port = _parse_listen(t, listen)
    return ServerConfig(host=host, port=port, enabled=t.boolean("enabled", d.enabled))


# Hostnames and IPv4 addresses; IPv6 goes in brackets and is checked by `ipaddress`.
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def _parse_listen(t: _Table, value: str) -> tuple[str, int]:
    expected = (
        'expected "host:port" such as "127.0.0.1:9469" or "[::1]:9469", with a port from 0 to 65535'
    )
    host: str | None = None
    port_text = ""
    if value.startswith("["):
        close = value.find("]")
        if close > 0 and value[close + 1 : close + 2] == ":":
            candidate, port_text = value[1:close], value[close + 2 :]
            try:
                ipaddress.IPv6Address(candidate)
                host = candidate
            except ValueError:
                pass
    else:
        candidate, sep, port_text = value.rpartition(":")
        if ":" in candidate:
            expected += " (an IPv6 address goes in brackets)"
        elif sep and _HOSTNAME.fullmatch(candidate):
            host = candidate
    valid_port = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if host is None or not valid_port or int(port_text) > 65535:
        raise t.error("listen", f"{expected}, got {shown(value)}")
    return host, int(port_text)


def _parse_api(t: _Table) -> ApiConfig:
    d = ApiConfig()
    enabled = t.boolean("enabled", d.enabled)
    unix_socket = t.optional_string("unix_socket")
    mode_text = t.optional_string("unix_socket_mode")
    mode = d.unix_socket_mode
    if mode_text is not None:
        if mode_text in ("0600", "0660"):
            mode = int(mode_text, 8)
        else:
            t.report(
                "unix_socket_mode",
                f'expected "0600" (owner only) or "0660" (owner and group), got {shown(mode_text)}',
            )
    tcp = t.boolean("tcp", d.tcp)
    if (
        not tcp
        and unix_socket is None
        and enabled
        and not t.failed("tcp", "unix_socket", "enabled")
    ):
        t.report("tcp", "is false but no unix_socket is set: the API would be unreachable")
    wait_timeout = t.duration("wait_timeout", d.wait_timeout, positive=True, maximum=300.0)
    bearer = _secret(t, "bearer_token", required=enabled, what="the API's bearer token")
    return ApiConfig(
        enabled=enabled,
        bearer_token=bearer,
        unix_socket=t.ctx.base_dir / unix_socket if unix_socket is not None else None,
        unix_socket_mode=mode,
        tcp=tcp,
        wait_timeout=wait_timeout,
        cache_size=t.integer("cache_size", d.cache_size, minimum=0, maximum=10_000_000),
    )


def _parse_hooks(t: _Table) -> HooksConfig:
    d = HooksConfig()
    url = t.optional_string("webhook_url")
    if url is not None:
        with t.ctx.collecting():
            _check_token_url(
                t, url, key="webhook_url", example="https://hooks.example.com/refresherd"
            )
    command: tuple[str, ...] = ()
    raw = t.data.get("command")
    if raw is not None:
        if (
            not isinstance(raw, list)
            or not raw
            or not all(isinstance(part, str) and part for part in raw)
        ):
            t.report(
                "command",
                'expected a non-empty array of strings such as ["/usr/local/bin/on-event"] '
                "(the event comes as JSON on stdin)",
            )
        else:
            command = (str(t.ctx.base_dir / raw[0]) if "/" in raw[0] else raw[0], *raw[1:])
    events: tuple[str, ...] = ()
    raw_events = t.data.get("events")
    if raw_events is not None:
        options = ", ".join(json.dumps(e) for e in HOOK_EVENTS)
        if not isinstance(raw_events, list) or not all(e in HOOK_EVENTS for e in raw_events):
            t.report("events", f"expected an array of event types from {options}")
        else:
            events = tuple(str(e) for e in raw_events)
    hooks = HooksConfig(
        webhook_url=url,
        webhook_timeout=t.duration("webhook_timeout", d.webhook_timeout, positive=True),
        command=command,
        command_timeout=t.duration("command_timeout", d.command_timeout, positive=True),
        events=events,
        backoff_initial=t.duration("backoff_initial", d.backoff_initial, positive=True),
        backoff_max=t.duration("backoff_max", d.backoff_max, positive=True),
        give_up_after=t.duration("give_up_after", d.give_up_after, positive=True),
    )
    both = ("backoff_initial", "backoff_max")
    if hooks.backoff_initial > hooks.backoff_max and not t.failed(*both):
        t.report(
            "backoff_initial",
            f"expected at most {t.key('backoff_max')} ({format_duration(hooks.backoff_max)}), "
            f"got {format_duration(hooks.backoff_initial)}",
        )
    secret = _secret(t, "webhook_secret", required=url is not None, what="the webhook's HMAC key")
    if secret is not None and url is None and not t.failed("webhook_url"):
        t.report("webhook_url", "is required when a webhook secret is set")
    return replace(hooks, webhook_secret=secret)


def _secret(t: _Table, prefix: str, *, required: bool, what: str) -> Secret | None:
    """``<prefix>_file`` or ``<prefix>_credential``, read as client secrets are."""
    keys = (f"{prefix}_file", f"{prefix}_credential")
    given = [key for key in keys if key in t.data]
    if len(given) > 1:
        t.ctx.report(t.ctx.error(t.key(None), f"expected one of {' and '.join(keys)}, got both"))
        return None
    if not given:
        if required and not t.misspelt.intersection(keys):
            t.ctx.report(
                t.ctx.error(
                    t.key(None), f"expected {keys[0]} or {keys[1]} holding {what}, got neither"
                )
            )
        return None
    kind = given[0]
    key = t.key(kind)
    ctx = t.ctx
    with ctx.collecting():
        if kind.endswith("_file"):
            name = t.required_string(kind, "the path of a file holding the secret")
            if name:
                return _secret_file(ctx, key, ctx.base_dir / name)
            return None
        path = _credential_path(t, kind, instead=f"{prefix}_file")
        secret, _ = _read_secret_file(ctx, key, path)
        return secret
    return None


def _parse_log(t: _Table) -> LogConfig:
    d = _LOG_DEFAULTS
    return LogConfig(
        level=t.choice("level", LOG_LEVELS, d.level),
        format=t.choice("format", LOG_FORMATS, d.format),
    )


def _parse_schedule(t: _Table) -> ScheduleConfig:
    d = _SCHEDULE_DEFAULTS
    schedule = ScheduleConfig(
        refresh_fraction=t.number("refresh_fraction", d.refresh_fraction, 0.1, 0.95),
        min_margin=t.duration("min_margin", d.min_margin),
        jitter=t.number("jitter", d.jitter, 0.0, 0.5),
        # A zero floor would let a token with a tiny lifetime refresh in a tight loop.
        min_interval=t.duration("min_interval", d.min_interval, positive=True),
        default_expires_in=t.duration("default_expires_in", d.default_expires_in, positive=True),
        backoff_initial=t.duration("backoff_initial", d.backoff_initial, positive=True),
        backoff_max=t.duration("backoff_max", d.backoff_max, positive=True),
        retry_after_max=t.duration("retry_after_max", d.retry_after_max, positive=True),
        circuit_backoff_initial=t.duration(
            "circuit_backoff_initial", d.circuit_backoff_initial, positive=True
        ),
        circuit_backoff_max=t.duration("circuit_backoff_max", d.circuit_backoff_max, positive=True),
        refresh_token_expiry_warning=t.duration(
            "refresh_token_expiry_warning", d.refresh_token_expiry_warning
        ),
        import_spread=t.number("import_spread", d.import_spread, 0.0, 1.0),
    )
    # Checked on the built values so that a default on one side counts too.
    for low, high in (
        ("backoff_initial", "backoff_max"),
        ("circuit_backoff_initial", "circuit_backoff_max"),
    ):
        low_value: float = getattr(schedule, low)
        high_value: float = getattr(schedule, high)
        if low_value > high_value and not t.failed(low, high):
            t.report(
                low,
                f"expected at most {t.key(high)} ({format_duration(high_value)}), "
                f"got {format_duration(low_value)}",
            )
    return schedule


def _parse_providers(t: _Table) -> dict[str, ProviderConfig]:
    if not t.data:
        raise t.ctx.error(
            "providers", "expected at least one provider, such as a [providers.visma] table"
        )
    providers: dict[str, ProviderConfig] = {}
    for name, value in t.data.items():
        key = t.key(name)
        if not isinstance(value, dict):
            t.ctx.report(
                t.ctx.error(
                    key,
                    f"expected a provider table such as [providers.visma], got "
                    f"{type_name(value)} (provider keys go under [providers.NAME])",
                )
            )
            continue
        if not _PROVIDER_NAME.fullmatch(name):
            t.ctx.report(
                t.ctx.error(
                    key,
                    "expected a provider name of 1 to 64 letters, digits, '_', '.' or '-' "
                    f"(it becomes a metric label), got {shown(name)}",
                )
            )
            continue
        table = _Table(t.ctx, (*t.path, name), value, _PROVIDER_KEYS)
        provider = _parse_provider(name, table)
        if provider is not None:
            providers[name] = provider
    return providers


def _parse_provider(name: str, t: _Table) -> ProviderConfig | None:
    """The provider, or None where its preset is unknown (a problem reported: the rest of the
    table means something else under each preset)."""
    d = _PROVIDER_DEFAULTS
    preset = t.optional_string("preset")
    if preset is not None:
        if preset not in PRESETS:
            known = ", ".join(json.dumps(p) for p in PRESETS)
            close = [p for p in PRESETS if p.startswith(preset.lower())] or (
                difflib.get_close_matches(preset, list(PRESETS), n=1, cutoff=0.5)
            )
            hint = f'; did you mean "{close[0]}"?' if close else ""
            t.report("preset", f"unknown preset {shown(preset)}{hint} (known: {known})")
            return None
        # Preset values first, explicit keys over them; validated alike (their unknown keys
        # were reported by the table as written).
        t = _Table(t.ctx, t.path, apply_preset(preset, t.data), _PROVIDER_KEYS, quiet=True)
    token_url, issuer = "", None
    with t.ctx.collecting():
        token_url, issuer = _endpoint(t, preset)
    client_id = t.required_string("client_id", "the OAuth client id")
    auth_method = AuthMethod(t.choice("auth_method", tuple(AuthMethod), d.auth_method.value))
    usage = RefreshTokenUsage(
        t.choice("refresh_token_usage", tuple(RefreshTokenUsage), d.refresh_token_usage.value)
    )
    grace_period = t.duration("grace_period", d.grace_period, maximum=600.0)
    request_timeout = t.duration("request_timeout", d.request_timeout, positive=True)
    connect_timeout = t.duration("connect_timeout", d.connect_timeout, positive=True)
    scope = t.optional_string("scope")
    max_connections = _integer_or_auto(t, "max_connections", minimum=1)
    max_concurrent = None
    if t.data.get("max_concurrent_refreshes") is not None:
        max_concurrent = t.integer("max_concurrent_refreshes", 0, minimum=1)
    per_second = None
    if t.data.get("max_requests_per_second") is not None:
        per_second = t.number("max_requests_per_second", 0.0, 0.01, 1_000_000.0)
    lifetime = None
    if t.data.get("refresh_token_lifetime") is not None:
        lifetime = t.duration("refresh_token_lifetime", 0.0, positive=True)
    idle_lifetime = None
    if t.data.get("refresh_token_idle_lifetime") is not None:
        idle_lifetime = t.duration("refresh_token_idle_lifetime", 0.0, positive=True)
    mode = RefreshMode(t.choice("refresh_mode", tuple(RefreshMode), d.refresh_mode.value))
    both = ("refresh_mode", "refresh_token_idle_lifetime")
    if mode is RefreshMode.KEEP_ALIVE and idle_lifetime is None and not t.failed(*both):
        t.report(
            "refresh_mode",
            'is "keep_alive", which refreshes only as often as the sliding lifetime requires: '
            'expected refresh_token_idle_lifetime too (such as "30d")',
        )
    # RFC 7009 revocation endpoint (DELETE /v1/tokens/{id}?revoke=true); discovery fills it
    # for providers given by issuer.
    revocation_url = t.optional_string("revocation_url")
    if revocation_url is not None:
        with t.ctx.collecting():
            _check_token_url(t, revocation_url, key="revocation_url")
    authorization_url, connect = _parse_connect(t, name, issuer)
    # Last, so that a typo elsewhere is reported before any secret file's problem.
    client_secret = Secret("")
    with t.ctx.collecting():
        client_secret = _client_secret(t)
    return ProviderConfig(
        name=name,
        token_url=token_url,
        client_id=client_id,
        client_secret=client_secret,
        auth_method=auth_method,
        refresh_token_usage=usage,
        grace_period=grace_period,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        scope=scope,
        max_connections=max_connections,
        max_concurrent_refreshes=max_concurrent,
        max_requests_per_second=per_second,
        refresh_token_lifetime=lifetime,
        refresh_token_idle_lifetime=idle_lifetime,
        refresh_mode=mode,
        issuer=issuer,
        revocation_url=revocation_url,
        preset=preset,
        authorization_url=authorization_url,
        connect=connect,
    )


def _parse_connect(
    t: _Table, name: str, issuer: str | None
) -> tuple[str | None, ConnectConfig | None]:
    """``(authorization_url, connect)``: connecting is on where ``redirect_uri`` is given.
    Each problem is reported, and the rest still read."""
    authorization_url = t.optional_string("authorization_url")
    if authorization_url is not None:
        with t.ctx.collecting():
            _check_token_url(
                t,
                authorization_url,
                key="authorization_url",
                example="https://connect.visma.com/connect/authorize",
            )
    redirect_uri = t.optional_string("redirect_uri")
    if redirect_uri is None:
        # The other keys (a preset's quirks among them) wait for a redirect_uri.
        return authorization_url, None
    with t.ctx.collecting():
        example = f"https://refresherd.example.com{callback_path(name)}"
        _check_token_url(t, redirect_uri, key="redirect_uri", example=example)
        if urlsplit(redirect_uri).query:
            raise t.error(
                "redirect_uri", f"expected a URL without a ?query, got {shown(redirect_uri)}"
            )
        if not urlsplit(redirect_uri).path.endswith(callback_path(name)):
            t.ctx.warnings.append(
                f"{t.key('redirect_uri')}: its path does not end with {callback_path(name)}, the "
                "callback route: a proxy in front of refresherd must map it there"
            )
    if authorization_url is None and issuer is None and not t.failed("authorization_url"):
        t.report(
            "redirect_uri",
            "needs an authorization endpoint: authorization_url, a preset that has one, or "
            "issuer (discovery finds it)",
        )
    return_urls: list[str] = []
    raw = t.data.get("return_urls", [])
    if not isinstance(raw, list) or not all(isinstance(u, str) for u in raw):
        t.report("return_urls", "expected an array of URLs (the application's pages)")
        raw = []
    for i, url in enumerate(raw):
        key = f"{t.key('return_urls')}[{i}]"
        with t.ctx.collecting():
            try:
                _check_token_url(t, url, key="return_urls", example="https://app.example.com/done")
            except ConfigError as exc:
                raise t.ctx.error(key, exc.message) from None
            if not return_url_allowed(url, [url]):
                raise t.ctx.error(key, f"expected a URL without a #fragment, got {shown(url)}")
            return_urls.append(url)
    pairs: tuple[tuple[str, str], ...] = ()
    params = t.data.get("authorization_params", {})
    if not isinstance(params, Mapping):
        t.report("authorization_params", f"expected a table, got {type_name(params)}")
    else:
        try:
            pairs = config_params(params)
        except ValueError as exc:
            t.report("authorization_params", str(exc))
    d = ConnectConfig(redirect_uri="")
    connect = ConnectConfig(
        redirect_uri=redirect_uri,
        return_urls=tuple(return_urls),
        response_mode=t.choice("response_mode", RESPONSE_MODES, d.response_mode),
        pkce=t.boolean("pkce", d.pkce),
        scope=t.optional_string("authorization_scope"),
        params=pairs,
        link_lifetime=t.duration("link_lifetime", d.link_lifetime, minimum=1.0, maximum=86400.0),
    )
    return authorization_url, connect


def _endpoint(t: _Table, preset: str | None) -> tuple[str, str | None]:
    """``(token_url, issuer)``: exactly one of them given; token_url empty with an issuer."""
    token_url = t.optional_string("token_url")
    issuer = t.optional_string("issuer")
    if token_url is not None and issuer is not None:
        raise t.ctx.error(
            t.key(None),
            "expected token_url or issuer, not both (issuer finds the token endpoint through "
            "its /.well-known/openid-configuration document)",
        )
    if issuer is not None:
        _check_token_url(t, issuer, key="issuer", example="https://YOUR-ORG.okta.com")
        if urlsplit(issuer).query:
            raise t.error("issuer", f"expected an issuer URL without a ?query, got {shown(issuer)}")
        return "", issuer
    if token_url is None:
        example = PRESETS[preset].issuer_example if preset is not None else None
        if example is not None:
            raise t.error(
                "token_url",
                f'is required: preset "{preset}" needs issuer = "{example}" or token_url '
                "(the tenant's token endpoint)",
            )
        raise t.error(
            "token_url",
            "is required: expected the token endpoint URL, such as "
            '"https://connect.visma.com/connect/token" (or an OpenID Connect issuer = "https://...")',
        )
    _check_token_url(t, token_url)
    return token_url, None


def _check_token_url(
    t: _Table,
    url: str,
    *,
    key: str = "token_url",
    example: str = "https://connect.visma.com/connect/token",
) -> None:
    example = f'an https URL such as "{example}"'
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise t.error(key, f"expected {example}, got a value with spaces or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise t.error(key, f"expected {example}, got an unparsable URL") from None
    if "@" in parts.netloc:
        # Checked before any message repeats the URL: user info may hold a password.
        raise t.error(
            key,
            "expected a URL without a user name or password; "
            "credentials go in client_id and client_secret",
        )
    if parts.scheme not in ("http", "https") or not host:
        raise t.error(key, f"expected {example}, got {shown(url)}")
    if parts.fragment:
        raise t.error(key, f"expected a URL without a #fragment (RFC 6749, 3.2), got {shown(url)}")
    if parts.scheme == "http" and not is_loopback(host):
        raise t.error(
            key,
            f"expected {example}: plain http is allowed only for loopback hosts "
            "(127.0.0.0/8, ::1, localhost) because the client secret and refresh tokens "
            f"would travel in clear, got {shown(url)}",
        )


def _client_secret(t: _Table) -> Secret:
    given = [key for key in _SECRET_KEYS if key in t.data]
    if not given and t.misspelt.intersection(_SECRET_KEYS):
        return Secret("")  # the misspelt key is the problem, reported already
    if len(given) != 1:
        found = " and ".join(given) if given else "none"
        raise t.ctx.error(
            t.key(None),
            f"expected exactly one of {', '.join(_SECRET_KEYS)}, got {found}",
        )
    kind = given[0]
    key = t.key(kind)
    ctx = t.ctx
    if kind == "client_secret":
        value = t.data[kind]
        # Never shown() this one: the value is the secret.
        if not isinstance(value, str):
            raise ctx.error(key, f"expected a string, got {type_name(value)}")
        if not value:
            raise ctx.error(key, "expected the client secret, got an empty string")
        return Secret(value)
    if kind == "client_secret_file":
        path = ctx.base_dir / t.required_string(kind, "the path of a file holding the secret")
        return _secret_file(ctx, key, path)
    if kind == "client_secret_env":
        name = t.required_string(kind, "the name of an environment variable")
        if not _ENV_VAR_NAME.fullmatch(name):
            # Not repeated: a value that is no variable name may be the secret pasted here.
            raise ctx.error(
                key,
                'expected the name of an environment variable such as "VISMA_CLIENT_SECRET" '
                "(letters, digits and '_'), not the secret itself",
            )
        env_value = ctx.env.get(name)
        if not env_value:
            state = "empty" if env_value == "" else "not set"
            raise ctx.error(
                key, f"environment variable {name} is {state}; expected it to hold the secret"
            )
        return Secret(env_value)
    # client_secret_credential
    path = _credential_path(t, kind, instead="client_secret_file")
    secret, _ = _read_secret_file(ctx, key, path)
    return secret


def _parse_encryption(t: _Table) -> EncryptionConfig | None:
    if not t.data:
        return None
    ctx = t.ctx
    given = [k for k in ("key_file", "key_credential") if k in t.data]
    key = Secret("")
    if len(given) != 1:
        if given or not t.misspelt.intersection(("key_file", "key_credential")):
            found = " and ".join(given) if given else "none"
            t.ctx.report(
                ctx.error(
                    t.key(None), f"expected exactly one of key_file, key_credential, got {found}"
                )
            )
    elif given[0] == "key_file":
        name = t.required_string("key_file", "the path of a file holding the key")
        if name:
            with ctx.collecting():
                key = _encryption_key(ctx, t.key("key_file"), ctx.base_dir / name)
    else:
        with ctx.collecting():
            path = _credential_path(t, "key_credential", instead="key_file")
            # A credential's mode is its provider's (systemd: 0400; a Kubernetes Secret with
            # fsGroup: 0440, whatever defaultMode says), not the user's to chmod: no warning,
            # as for the other credentials.
            key = _encryption_key(ctx, t.key("key_credential"), path, check_mode=False)
    previous = t.data.get("previous_key_files", [])
    old: list[Secret] = []
    if not isinstance(previous, list) or not all(isinstance(p, str) and p for p in previous):
        t.report("previous_key_files", f"expected a list of file paths, got {type_name(previous)}")
    else:
        for i, p in enumerate(previous):
            with ctx.collecting():
                where = f"{t.key('previous_key_files')}[{i}]"
                old.append(_encryption_key(ctx, where, ctx.base_dir / p))
    return EncryptionConfig(key=key, previous_keys=tuple(old))


def _encryption_key(ctx: _Context, key: str, path: Path, *, check_mode: bool = True) -> Secret:
    """A key file's content, checked to be 32 bytes of base64; a warning if others may read it
    (``check_mode``)."""
    from refresherd.encryption import decode_key  # the cryptography import only when used

    secret = _secret_file(ctx, key, path) if check_mode else _read_secret_file(ctx, key, path)[0]
    try:
        decode_key(secret.reveal())
    except ValueError as exc:
        raise ctx.error(key, f"{path}: {exc}") from None
    return secret


def _secret_file(ctx: _Context, key: str, path: Path) -> Secret:
    """The secret in ``path``; a warning (not an error) if group or others may read it."""
    secret, mode = _read_secret_file(ctx, key, path)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        ctx.warnings.append(
            f"{ctx.source}: {key}: {path} is readable by group or others "
            f"(mode {mode:04o}); expected mode 0600 or 0400 (chmod 600 {path})"
        )
    return secret


def _credential_path(t: _Table, kind: str, *, instead: str) -> Path:
    """Where the systemd credential named by key ``kind`` is: $CREDENTIALS_DIRECTORY/NAME.
    ``instead``: the key to suggest when not running under systemd."""
    ctx, key = t.ctx, t.key(kind)
    name = t.required_string(kind, "the name of a systemd credential")
    if "/" in name or name in (".", "..") or "\0" in name:
        raise ctx.error(key, f"expected a systemd credential name without '/', got {shown(name)}")
    directory = ctx.env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ctx.error(
            key,
            "CREDENTIALS_DIRECTORY is not set; expected refresherd to run under a systemd unit "
            f"with LoadCredential={name}:... or SetCredential={name}:... (or use {instead})",
        )
    return Path(directory) / name


def _read_secret_file(ctx: _Context, key: str, path: Path) -> tuple[Secret, int]:
    """The secret in ``path`` (trailing newlines stripped) and the file's permission bits."""
    try:
        with path.open("rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            data = fh.read(_SECRET_FILE_MAX_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ctx.error(
            key, f"cannot read {path}: {reason}; expected a readable file holding the secret"
        ) from None
    if len(data) > _SECRET_FILE_MAX_BYTES:
        raise ctx.error(
            key, f"{path} is larger than {_SECRET_FILE_MAX_BYTES} bytes; expected just the secret"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # `from None`: the decode error holds the raw bytes, that is, the secret.
        raise ctx.error(key, f"{path} is not UTF-8 text; expected the secret as text") from None
    # `echo secret > file` and editors add a newline that is no part of the secret.
    text = text.rstrip("\r\n")
    if not text:
        raise ctx.error(key, f"{path} is empty; expected it to hold the secret")
    return Secret(text), mode


# --- the table reader --------------------------------------------------------------------------


@dataclass
class _Context:
    source: str
    base_dir: Path
    env: Mapping[str, str]
    warnings: list[str] = field(default_factory=list)
    # Every problem found so far, in the order found; at most one per key.
    problems: list[ConfigError] = field(default_factory=list)

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def report(self, problem: ConfigError) -> None:
        """Record ``problem``, unless its key has one already: a value that is wrong once
        (then read as its default) must not be reported again by a later check."""
        if problem.key is None or not self.failed(problem.key):
            self.problems.append(problem)

    def failed(self, key: str) -> bool:
        return any(p.key == key for p in self.problems)

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Run a check that raises ConfigError; record what it raises, and go on."""
        try:
            yield
        except ConfigProblems as many:
            for problem in many.problems:
                self.report(problem)
        except ConfigError as exc:
            self.report(exc)

    def raise_problems(self) -> None:
        if len(self.problems) == 1:
            raise self.problems[0]
        if self.problems:
            raise ConfigProblems(self.problems)


class _Table:
    """One TOML table: rejects unknown keys up front, then hands out typed, checked values.

    TOML has no null, so a missing key and ``None`` from ``dict.get`` mean the same.
    """

    def __init__(
        self,
        ctx: _Context,
        path: tuple[str, ...],
        data: Mapping[str, object],
        allowed: Sequence[str],
        *,
        hints: Mapping[str, str] | None = None,
        quiet: bool = False,
    ) -> None:
        """``quiet``: the unknown keys of ``data`` are reported already (a preset's table)."""
        self.ctx = ctx
        self.path = path
        self.data = data
        # The keys an unknown key was taken for a misspelling of: that it is missing is the
        # same mistake, not another one.
        self.misspelt: set[str] = set()
        for name in data:
            if name not in allowed:
                close = did_you_mean(name, allowed) if name not in (hints or {}) else None
                if close is not None:
                    self.misspelt.add(close)
                if not quiet:
                    ctx.report(ctx.error(self.key(name), _unknown_key(name, allowed, hints or {})))

    def key(self, name: str | None) -> str:
        parts = (*self.path, name) if name is not None else self.path
        return ".".join(_quote_key(part) for part in parts)

    def error(self, name: str, message: str) -> ConfigError:
        return self.ctx.error(self.key(name), message)

    def report(self, name: str, message: str) -> None:
        self.ctx.report(self.error(name, message))

    def failed(self, *names: str) -> bool:
        """Whether any of these keys of this table has a problem reported."""
        return any(self.ctx.failed(self.key(name)) for name in names)

    def _refused(self, name: str, message: str, default: T) -> T:
        """Report a problem with key ``name`` and go on with ``default`` in its place."""
        self.report(name, message)
        return default

    def section(self, name: str, parse: Callable[[_Table], T]) -> T | None:
        """``parse`` of the table ``name``; None where it is no table, or where a problem
        stopped its parse (both reported)."""
        table = self.table(name)
        if table is None:
            return None
        with self.ctx.collecting():
            return parse(table)
        return None

    def table(self, name: str) -> _Table | None:
        """The table ``name`` (empty where absent); None, with a problem reported, where the
        key holds something else."""
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.report(name, f"expected a table [{name}], got {type_name(value)}")
            return None
        allowed = {
            "daemon": _DAEMON_KEYS,
            "server": _SERVER_KEYS,
            "api": _API_KEYS,
            "hooks": _HOOKS_KEYS,
            "log": _LOG_KEYS,
            "schedule": _SCHEDULE_KEYS,
            "encryption": _ENCRYPTION_KEYS,
        }.get(name)
        # Provider names are free; _parse_providers checks them.
        return _Table(self.ctx, (*self.path, name), value, allowed or tuple(value))

    # The readers below report a wrong value and go on with the default (an empty string for
    # a required one): the config is not built while any problem stands.

    def required_string(self, name: str, what: str) -> str:
        value = self.optional_string(name)
        if value is None:
            if name in self.misspelt or self.failed(name):
                return ""
            return self._refused(name, f"is required: expected {what}", "")
        return value

    def optional_string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            return self._refused(name, f"expected a string, got {type_name(value)}", None)
        if not value:
            return self._refused(name, "expected a non-empty string, got an empty string", None)
        return value

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        # bool is an int in Python but not in TOML.
        if not isinstance(value, int) or isinstance(value, bool):
            return self._refused(name, f"expected an integer, got {type_name(value)}", default)
        if value < minimum:
            message = f"expected an integer of at least {minimum}, got {value}"
            return self._refused(name, message, default)
        if maximum is not None and value > maximum:
            message = f"expected an integer of at most {maximum}, got {value}"
            return self._refused(name, message, default)
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            return self._refused(name, f"expected a number, got {type_name(value)}", default)
        # TOML allows nan and inf; a NaN would slip through both comparisons.
        if not (math.isfinite(value) and minimum <= value <= maximum):
            message = f"expected a number from {minimum} to {maximum}, got {shown(value)}"
            return self._refused(name, message, default)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            return self._refused(name, f"expected true or false, got {type_name(value)}", default)
        return value

    def choice(self, name: str, allowed: Sequence[str], default: str) -> str:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, str) and value in allowed:
            return value
        options = ", ".join(json.dumps(str(option)) for option in allowed)
        return self._refused(name, f"expected one of {options}, got {shown(value)}", default)

    def duration(
        self,
        name: str,
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float | None = None,
        positive: bool = False,
    ) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        try:
            seconds = parse_duration(value, file=self.ctx.source, key=self.key(name))
        except ConfigError as exc:
            self.ctx.report(exc)
            return default
        too_small = seconds <= minimum if positive else seconds < minimum
        if too_small or (maximum is not None and seconds > maximum):
            low, high = format_duration(minimum), None
            if maximum is not None:
                high = format_duration(maximum)
            if high is not None and minimum > 0:
                bounds = f"from {low} to {high}"
            elif high is not None:
                bounds = f"of at most {high}"
            elif positive:
                bounds = f"longer than {low}"
            else:
                bounds = f"of at least {low}"
            return self._refused(name, f"expected a duration {bounds}, got {shown(value)}", default)
        return seconds


def _unknown_key(name: str, allowed: Sequence[str], hints: Mapping[str, str]) -> str:
    if name in hints:
        return f"unknown key here; did you mean to put it under [{hints[name]}]?"
    close = did_you_mean(name, allowed)
    if close is not None:
        return f'unknown key; did you mean "{close}"?'
    return "unknown key; expected one of " + ", ".join(allowed)


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _quote_key(part: str) -> str:
    # As TOML would write it, so that `providers."eu.visma"` is not read as two levels.
    return part if _BARE_KEY.fullmatch(part) else json.dumps(part)
