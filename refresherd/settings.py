"""Configuration types: what a validated config is, as frozen dataclasses, and the few rules
and values the rest of the daemon shares with the loader (durations, hook event types, the
workers' share of a limit, loopback hosts, ``ConfigError``).

The loader (:mod:`refresherd.config`: TOML, files, env, credentials) builds these; every other
module imports them from here, so that a policy or an endpoint does not load the loader. This
module imports only the model (and the database location type, for type checking only,
from the store's location module, which imports only the model).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from refresherd.errors import InvalidInput
from refresherd.model import AuthMethod, RefreshMode, RefreshTokenUsage, Secret

if TYPE_CHECKING:
    # The database location types (refresherd.store.location imports only the model too).
    from refresherd.store.location import Location

# sysexits.h EX_CONFIG: the exit code of every configuration error.
EX_CONFIG = 78

# `[daemon] concurrency = "auto"`: refreshes in flight adapt to the IdP's pace
# (refresherd.concurrency) up to this many, the whole daemon's, with an IdP 0-100 ms away;
# for one further away, as many as its pace needs, up to AUTO_CONCURRENCY_FAR (a provider's
# GradientLimit.reach). Measured (docs/benchmarks.md): past 512 an IdP on loopback or 50 ms
# away gained nothing (and lost 2-7 % to the CPU more in flight costs); one 200 ms away did
# 17-35 % more at 1,024 than at 512.
AUTO_CONCURRENCY: Final = 512
AUTO_CONCURRENCY_FAR: Final = 1024
Auto = Literal["auto"]


class ConfigError(InvalidInput):
    """A configuration problem, naming the file, the key and what was expected."""

    def __init__(self, file: str, key: str | None, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    # A SQLite file (a Path) or a PostgreSQL database (refresherd.store.location).
    database: Location
    # The most refreshes in flight, the whole daemon's: the ceiling of each provider's adaptive
    # limit (refresherd.concurrency); "auto": AUTO_CONCURRENCY, rising for a distant IdP up to
    # AUTO_CONCURRENCY_FAR (one process: with workers it is AUTO_CONCURRENCY, shared out).
    concurrency: int | Auto = "auto"
    lease_duration: float = 60.0
    shutdown_timeout: float = 20.0
    poll_interval: float = 1.0
    instance_name: str | None = None
    # Processes that refresh (refresherd.workers): the primary and workers - 1 more. The
    # limits in the config (concurrency, a provider's connections, concurrent refreshes and
    # rate) are the whole daemon's, shared out among them.
    workers: int = 1
    # A worker that sends the primary no metrics snapshot (it sends one a second) for this
    # long is taken for hung: killed and started again (refresherd.workers).
    worker_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    """Keys for the token columns: ``key`` seals, ``previous_keys`` only open (rotation)."""

    key: Secret
    previous_keys: tuple[Secret, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9469
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The token API (/v1/*) on the server's listener and, if set, on a unix socket."""

    enabled: bool = False
    # Required when enabled: every /v1 request carries it as "Authorization: Bearer ...".
    bearer_token: Secret | None = field(default=None, repr=False)
    unix_socket: Path | None = None
    unix_socket_mode: int = 0o600
    # Serve /v1 on the TCP listener too (false: only on the unix socket).
    tcp: bool = True
    # How long GET /v1/tokens/{id} waits for a refresh it triggered or joined.
    wait_timeout: float = 10.0
    # Answers of GET /v1/tokens/{id} kept in memory (web/token_cache.py); 0: none.
    cache_size: int = 10_000


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """Notifications of token-set events: a webhook and/or a command (refresherd.hooks)."""

    webhook_url: str | None = None
    webhook_secret: Secret | None = field(default=None, repr=False)
    webhook_timeout: float = 10.0
    command: tuple[str, ...] = ()
    command_timeout: float = 30.0
    events: tuple[str, ...] = ()  # empty: every event type
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    # A notification still undelivered this long after it was raised is given up (recorded).
    give_up_after: float = 7 * 86400.0

    @property
    def enabled(self) -> bool:
        return self.webhook_url is not None or bool(self.command)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # "json" | "console" | "auto" (json unless stderr is a TTY)


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    refresh_fraction: float = 0.8
    min_margin: float = 60.0
    jitter: float = 0.1
    min_interval: float = 1.0
    default_expires_in: float = 3600.0
    backoff_initial: float = 5.0
    backoff_max: float = 900.0
    retry_after_max: float = 600.0
    circuit_backoff_initial: float = 30.0
    circuit_backoff_max: float = 1800.0
    # How long before a refresh token's absolute expiry it is reported (log line, hook).
    refresh_token_expiry_warning: float = 7 * 86400.0
    # `tokens import`: spread each set's first refresh over this fraction of the time until its
    # planned refresh (policy.plan_imported_refresh), so a bulk import is no hourly herd.
    import_spread: float = 1.0


@dataclass(frozen=True, slots=True)
class ConnectConfig:
    """Connecting customers through this provider (refresherd.connect): the authorization
    code flow's first half, owned by refresherd. Set when the provider has ``redirect_uri``."""

    # The callback URL the IdP is told (registered with it): refresherd's public
    # /connect/NAME/callback, as the browser reaches it.
    redirect_uri: str
    # Where the browser may be sent back with the outcome (the application's pages): exact
    # scheme, host, port and path; empty: refresherd shows the outcome itself.
    return_urls: tuple[str, ...] = ()
    # "query" (the default, left out of the link) or "form_post" (the IdP POSTs the answer).
    response_mode: str = "query"
    # PKCE (RFC 7636, S256) on every link; an IdP without PKCE ignores it (RFC 6749 3.1).
    pkce: bool = True
    # The scope a link asks for unless the request names one (else the provider's scope).
    scope: str | None = None
    # Extra parameters on every link (Google: access_type = "offline"); a request may add more.
    params: tuple[tuple[str, str], ...] = ()
    # How long a link (its state) can be used.
    link_lifetime: float = 600.0


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    # Empty when ``issuer`` is given: discovery (refresherd.idp.discovery) fills it in at start.
    token_url: str
    client_id: str
    client_secret: Secret = field(repr=False)
    auth_method: AuthMethod = AuthMethod.CLIENT_SECRET_POST
    refresh_token_usage: RefreshTokenUsage = RefreshTokenUsage.ONE_TIME
    grace_period: float = 0.0
    request_timeout: float = 10.0
    connect_timeout: float = 5.0
    scope: str | None = None
    # The provider's connection pool; "auto": as many as its refreshes in flight need, which
    # the adaptive limit, [daemon] concurrency and max_concurrent_refreshes bound.
    max_connections: int | Auto = "auto"
    # Politeness (refresherd.throttle): refreshes in flight at once and sends per second to
    # this IdP; None: no limit beyond max_connections and [daemon] concurrency.
    max_concurrent_refreshes: int | None = None
    max_requests_per_second: float | None = None
    # Absolute refresh-token lifetime, counted from the first authorization (the token set's
    # creation) and never extended by rotation; None: unknown, or the IdP says per response.
    refresh_token_lifetime: float | None = None
    # Sliding lifetime: the refresh token dies when unused for this long; None: none known.
    refresh_token_idle_lifetime: float | None = None
    # access_token: keep a fresh access token; keep_alive: refresh only as often as the idle
    # lifetime requires (needs refresh_token_idle_lifetime).
    refresh_mode: RefreshMode = RefreshMode.ACCESS_TOKEN
    # OpenID Connect issuer whose discovery document names the token endpoint.
    issuer: str | None = None
    # From the discovery document, when there is one.
    revocation_url: str | None = None
    # The preset this provider's defaults came from, if any.
    preset: str | None = None
    # The authorization endpoint (RFC 6749 3.1): a preset's, discovery's, or given.
    authorization_url: str | None = None
    # None: no connect links for this provider (no redirect_uri configured).
    connect: ConnectConfig | None = None


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    daemon: DaemonConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    # None: token columns are stored in plaintext.
    encryption: EncryptionConfig | None = None
    # Things worth saying at start that do not stop it (e.g. a secret file readable by others).
    warnings: tuple[str, ...] = ()


# Event types a hook can be told about (refresherd.hooks.EVENT_TYPES names the same).
HOOK_EVENTS: Final = (
    "token_set.invalidated",
    "token_set.recovered",
    "refresh_token.expiring",
    "token_set.connected",
)


# --- durations ---------------------------------------------------------------------------------

# Largest unit first; each unit at most once, so "1h30m" has exactly one reading.
_DURATION_UNITS: Final[dict[str, Fraction]] = {
    "d": Fraction(86400),
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_ORDER: Final = tuple(_DURATION_UNITS)
# "ms" before "m" so that "5ms" is not read as "5m" followed by garbage.
_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|d|h|m|s)")
# Bounds the work on hostile input and keeps every accepted value a finite float.
_DURATION_MAX_CHARS: Final = 64
_DURATION_EXPECTED: Final = 'expected a duration such as "30s", "5m" or "1h"'


def parse_duration(value: object, *, file: str, key: str) -> float:
    """Parse ``"500ms"``, ``"90s"``, ``"5m"``, ``"1h"``, ``"180d"`` or ``"1h30m"`` into seconds.

    Only strings are accepted: a bare number has no unit, and guessing one is how a
    30-minute timeout becomes a 30-second one.
    """
    if isinstance(value, str):
        seconds = _duration_seconds(value)
        if seconds is not None:
            return seconds
    raise ConfigError(file, key, f"{_DURATION_EXPECTED}, got {shown(value)}")


def _duration_seconds(text: str) -> float | None:
    if not text or len(text) > _DURATION_MAX_CHARS:
        return None
    total = Fraction(0)
    pos = 0
    last_rank = -1
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        rank = _DURATION_ORDER.index(match[2])
        if rank <= last_rank:
            return None
        last_rank = rank
        total += Fraction(match[1]) * _DURATION_UNITS[match[2]]
        pos = match.end()
    # Summed exactly and rounded once, so "1s1ms" is the same float as 1.001.
    return float(total)


def format_duration(seconds: float) -> str:
    """The canonical spelling of a duration: ``5400.0`` → ``"1h30m"``, ``0.5`` → ``"500ms"``.

    Whole milliseconds round-trip through :func:`parse_duration` exactly.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {seconds!r}")
    millis = round(seconds * 1000)
    if millis == 0 and seconds > 0:
        # Below the grammar's resolution; only ever shown, never parsed back.
        return f"{seconds:.9f}".rstrip("0") + "s"
    parts: list[str] = []
    for unit in _DURATION_ORDER:
        unit_millis = int(_DURATION_UNITS[unit] * 1000)
        count, millis = divmod(millis, unit_millis)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


# --- rules shared with the loader -------------------------------------------------------------


def concurrency_ceiling(daemon: DaemonConfig) -> int:
    """The most refreshes the daemon may have in flight: ``concurrency``, or the auto ceiling
    (for a distant IdP it may rise to :func:`far_concurrency_ceiling`)."""
    return AUTO_CONCURRENCY if daemon.concurrency == "auto" else daemon.concurrency


def far_concurrency_ceiling(daemon: DaemonConfig) -> int | None:
    """With ``concurrency = "auto"``: how far a distant IdP's pace may raise the ceiling;
    None for a count (a ceiling set by hand is kept)."""
    return AUTO_CONCURRENCY_FAR if daemon.concurrency == "auto" else None


def share_problem(
    daemon: DaemonConfig, providers: Mapping[str, ProviderConfig]
) -> tuple[str, str] | None:
    """(key, message) if a count limit is below [daemon] workers: each of the processes gets
    an equal share of it, so each needs at least one (refresherd.workers.process_share)."""
    n = daemon.workers
    if n == 1:
        return None
    limits = [("daemon.concurrency", concurrency_ceiling(daemon))]
    for name, p in providers.items():
        if p.max_connections != "auto":
            limits.append((f"providers.{name}.max_connections", p.max_connections))
        if p.max_concurrent_refreshes is not None:
            limits.append(
                (f"providers.{name}.max_concurrent_refreshes", p.max_concurrent_refreshes)
            )
    for key, value in limits:
        if value < n:
            return key, (
                f"expected at least {n}, one for each of [daemon] workers = {n} processes "
                f"(which share it out), got {value}"
            )
    return None


def is_loopback(host: str) -> bool:
    """localhost or a loopback address: the only hosts plain http is allowed to."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def did_you_mean(name: str, allowed: Sequence[str], *, cutoff: float = 0.6) -> str | None:
    """The one name in ``allowed`` that ``name`` most likely misspells, or None. A higher
    ``cutoff`` (up to 1) asks for a closer likeness (difflib's ratio)."""
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=cutoff)
    return close[0] if close else None


def type_name(value: object) -> str:
    match value:
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return "a float"
        case str():
            return "a string"
        case dict():
            return "a table"
        case list():
            return "an array"
        case _:
            return "a date or time"


def shown(value: object) -> str:
    """A non-secret value as TOML would spell it, shortened for one line of error."""
    if isinstance(value, str):
        shown = json.dumps(value if len(value) <= 60 else value[:57] + "...")
        return shown
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return type_name(value)
