"""TOML → a frozen, validated :class:`Config`. The only module that reads config files and env."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from refresherd.model import AuthMethod, RefreshTokenUsage, Secret

DEFAULT_CONFIG_PATH = Path("/etc/refresherd/config.toml")
EX_CONFIG = 78


class ConfigError(Exception):
    """A configuration problem, naming the file, the key and what was expected."""

    def __init__(self, file: str, key: str | None, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    database: Path
    concurrency: int = 32
    lease_duration: float = 60.0
    shutdown_timeout: float = 20.0
    poll_interval: float = 1.0
    instance_name: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9469
    enabled: bool = True


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


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    token_url: str
    client_id: str
    client_secret: Secret = field(repr=False)
    auth_method: AuthMethod = AuthMethod.CLIENT_SECRET_POST
    refresh_token_usage: RefreshTokenUsage = RefreshTokenUsage.ONE_TIME
    grace_period: float = 0.0
    request_timeout: float = 10.0
    connect_timeout: float = 5.0
    scope: str | None = None
    max_connections: int = 20


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    daemon: DaemonConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    # Things worth saying at start that do not stop it (e.g. a secret file readable by others).
    warnings: tuple[str, ...] = ()
