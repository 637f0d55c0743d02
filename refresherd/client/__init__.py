"""A client of the refresherd sidecar's token API, for applications.

Fetch a token set's access token, cache it until shortly before it expires, and after a 401
from the upstream API ask once more and retry once::

    import httpx
    from refresherd.client import Sidecar, SidecarAuth, SidecarTokens

    sidecar = Sidecar(unix_socket="/run/refresherd/api.sock",
                      bearer_file="/etc/refresherd/api.bearer")
    acme = SidecarTokens(sidecar, "acme")          # one per token set, shared
    api = httpx.Client(base_url="https://api.example", auth=SidecarAuth(acme))
    api.get("/invoices")                           # or httpx.AsyncClient(auth=...), same auth

    from refresherd.client import SidecarRequestsAuth   # needs requests
    session.auth = SidecarRequestsAuth(acme)

A token that cannot be had raises :class:`TokenUnavailable` (``code`` ``invalidated``: send the
customer to authorize again). Imports httpx and anyio only: nothing of the daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from refresherd.client.httpx_auth import SidecarAuth
from refresherd.client.sidecar import AccessToken, Sidecar, SidecarUnreachable, TokenUnavailable
from refresherd.client.tokens import SidecarTokens, use_until

if TYPE_CHECKING:
    from refresherd.client.requests_auth import SidecarRequestsAuth

__all__ = [
    "AccessToken",
    "Sidecar",
    "SidecarAuth",
    "SidecarRequestsAuth",
    "SidecarTokens",
    "SidecarUnreachable",
    "TokenUnavailable",
    "use_until",
]


def __getattr__(name: str) -> Any:
    # requests is optional: imported when its auth is asked for, not with the package.
    if name == "SidecarRequestsAuth":
        from refresherd.client.requests_auth import SidecarRequestsAuth

        return SidecarRequestsAuth
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
