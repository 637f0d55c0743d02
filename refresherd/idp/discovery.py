"""OpenID Connect Discovery 1.0: an ``issuer`` → its token (revocation, authorization) endpoints.

Resolved when the daemon starts or reloads and by one-shot commands that talk to the token
endpoint, never by the config parser (``check-config`` needs no network). Results are cached
in memory, keyed by issuer, for the life of the process; a reload fetches afresh and falls
back to the cached document if the issuer cannot be reached then.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final
from urllib.parse import urlsplit

import anyio
import httpx

from refresherd import logs
from refresherd.errors import IdPError
from refresherd.settings import ProviderConfig, is_loopback

log = logs.get_logger("refresherd.discovery")

WELL_KNOWN: Final = "/.well-known/openid-configuration"
# A discovery document is a few kilobytes; anything far larger is not one.
_MAX_BYTES: Final = 512 * 1024
# Exit status when an issuer cannot be resolved at start (sysexits.h EX_UNAVAILABLE).
EX_UNAVAILABLE: Final = 69


class DiscoveryError(IdPError):
    """An issuer whose discovery document cannot be fetched or used."""

    def __init__(self, url: str, message: str, *, provider: str | None = None) -> None:
        self.url = url
        self.provider = provider
        self.message = message
        where = f"providers.{provider}: " if provider else ""
        super().__init__(f"{where}discovery {url}: {message}")

    def for_provider(self, provider: str) -> DiscoveryError:
        return DiscoveryError(self.url, self.message, provider=provider)


@dataclass(frozen=True, slots=True)
class DiscoveredEndpoints:
    issuer: str
    token_endpoint: str
    revocation_endpoint: str | None = None
    # For connect links (refresherd.connect); only an https one (http on loopback) is kept.
    authorization_endpoint: str | None = None


_cache: dict[str, DiscoveredEndpoints] = {}


def discovery_url(issuer: str) -> str:
    # §4: any trailing "/" of the issuer is removed before the well-known path is appended.
    return issuer.rstrip("/") + WELL_KNOWN


def _secure(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if not host or "@" in parts.netloc or parts.fragment:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and is_loopback(host)


async def resolve(
    issuer: str, *, timeout: float, fresh: bool = False, client: httpx.AsyncClient | None = None
) -> DiscoveredEndpoints:
    """The endpoints in ``issuer``'s discovery document; cached unless ``fresh``."""
    if not fresh and issuer in _cache:
        return _cache[issuer]
    url = discovery_url(issuer)
    try:
        if client is None:
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as own:
                response = await own.get(url, headers={"Accept": "application/json"})
        else:
            response = await client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise DiscoveryError(url, f"cannot be reached ({reason})") from None
    if response.status_code != 200:
        raise DiscoveryError(url, f"expected HTTP 200, got {response.status_code}")
    if len(response.content) > _MAX_BYTES:
        raise DiscoveryError(url, f"expected a JSON document, got more than {_MAX_BYTES} bytes")
    try:
        document = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        ctype = response.headers.get("content-type", "no content type")
        raise DiscoveryError(
            url, f"expected a JSON document, got something else ({ctype})"
        ) from None
    found = _endpoints(url, issuer, document)
    _cache[issuer] = found
    return found


def _endpoints(url: str, issuer: str, document: object) -> DiscoveredEndpoints:
    if not isinstance(document, dict):
        raise DiscoveryError(url, "expected a JSON object")
    claimed = document.get("issuer")
    # §4.3: the issuer in the document must be identical to the one it was fetched for.
    if claimed != issuer:
        raise DiscoveryError(
            url,
            f"the document's issuer is {json.dumps(claimed)}, expected exactly "
            f"{json.dumps(issuer)} (OpenID Connect Discovery 1.0, 4.3)",
        )
    token = document.get("token_endpoint")
    if not isinstance(token, str) or not token:
        raise DiscoveryError(url, "the document has no token_endpoint")
    if not _secure(token):
        raise DiscoveryError(
            url,
            f"token_endpoint {json.dumps(token[:100])} is not an https URL "
            "(plain http only for loopback hosts)",
        )
    revocation = document.get("revocation_endpoint")
    if not (isinstance(revocation, str) and _secure(revocation)):
        revocation = None
    authorization = document.get("authorization_endpoint")
    if not (isinstance(authorization, str) and _secure(authorization)):
        authorization = None
    return DiscoveredEndpoints(issuer, token, revocation, authorization)


async def resolve_providers(
    providers: Mapping[str, ProviderConfig], *, fresh: bool = False
) -> dict[str, ProviderConfig]:
    """``providers`` with every issuer's token_url (and revocation_url) filled in.

    Providers with a token URL are returned as they are. With ``fresh`` (a reload) documents are
    fetched again, and a cached one is used, with a warning, if its issuer cannot be reached.
    """
    resolved: dict[str, ProviderConfig] = {}
    pending = {name: p for name, p in providers.items() if p.issuer is not None and not p.token_url}
    results: dict[str, DiscoveredEndpoints | DiscoveryError] = {}

    async def one(name: str, p: ProviderConfig) -> None:
        assert p.issuer is not None
        try:
            results[name] = await resolve(p.issuer, timeout=p.request_timeout, fresh=fresh)
        except DiscoveryError as exc:
            cached = _cache.get(p.issuer) if fresh else None
            if cached is None:
                results[name] = exc.for_provider(name)
                return
            log.warning(
                "discovery failed, using the document fetched earlier",
                provider=name,
                url=exc.url,
                error=exc.message,
            )
            results[name] = cached

    async with anyio.create_task_group() as tg:
        for name, p in pending.items():
            tg.start_soon(one, name, p)
    for name, p in providers.items():
        result = results.get(name)
        if result is None:
            resolved[name] = p
        elif isinstance(result, DiscoveryError):
            raise result
        else:
            resolved[name] = replace(
                p,
                token_url=result.token_endpoint,
                revocation_url=result.revocation_endpoint,
                # A configured authorization_url wins, as it is the operator's word.
                authorization_url=p.authorization_url or result.authorization_endpoint,
            )
    return resolved


def clear_cache() -> None:
    _cache.clear()
