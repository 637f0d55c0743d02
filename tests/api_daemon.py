"""A daemon with its token API on, for the tests that talk to it: the bearer in a 0600 file, the
[api] table that accepts it, a config with both, and the application's side (:class:`Client`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from conftest import DaemonProcess, IdPHandle, PgDatabase, write_config, write_secret

# The provider the IdP is configured under (idp_factory's default name).
PROVIDER = "idp"
# The application's own redirect URI, for the codes it exchanges (POST /v1/tokens/ID/exchange).
REDIRECT = "https://app.example/callback"


def new_bearer(directory: Path) -> tuple[str, Path]:
    """A random bearer in a 0600 file; registered with the leak scan."""
    bearer = "api_" + os.urandom(18).hex()
    return bearer, write_secret(directory / "api.bearer", bearer)


def api_table(
    directory: Path, api: dict[str, object] | None = None
) -> tuple[str, dict[str, object]]:
    """A new bearer (its file in ``directory``) and the [api] table that accepts it, with the
    keys of ``api`` on top."""
    bearer, bearer_file = new_bearer(directory)
    return bearer, {"enabled": True, "bearer_token_file": str(bearer_file), **(api or {})}


def api_config(
    tmp_path: Path,
    handle: IdPHandle,
    *,
    api: dict[str, object] | None = None,
    database: Path | PgDatabase | None = None,
    **provider: object,
) -> tuple[Path, str]:
    """``tmp_path/config.toml``: ``handle`` as ``PROVIDER`` (with ``provider`` overrides) and the
    token API on; with the bearer it takes."""
    bearer, table = api_table(tmp_path, api)
    config = write_config(
        tmp_path / "config.toml",
        database=database if database is not None else tmp_path / "tokens.db",
        providers={PROVIDER: handle.provider(**provider)},
        tables={"api": table},
    )
    return config, bearer


class Client:
    """The application's side: httpx with the bearer, over TCP or a unix socket."""

    def __init__(self, daemon: DaemonProcess, bearer: str, *, uds: Path | None = None):
        self.daemon = daemon
        self.headers = {"Authorization": f"Bearer {bearer}"}
        transport = httpx.HTTPTransport(uds=str(uds)) if uds is not None else None
        self.base = "http://refresherd" if uds is not None else daemon.url("")
        self.http = httpx.Client(transport=transport, timeout=60)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, self.base + path, headers=self.headers, **kw)

    def get(self, token_set_id: str) -> httpx.Response:
        return self.request("GET", f"/v1/tokens/{token_set_id}")
