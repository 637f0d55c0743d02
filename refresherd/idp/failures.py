"""The typed failures of a token request: what a refresh, a code exchange or a revocation
raises instead of returning.

Each carries a ``failure`` (:class:`refresherd.model.Failure`) that says, above all, whether
the IdP may have consumed the refresh token (DESIGN.md's failure table); the refresher's
policy decides on its ``kind``. No token or client secret ever appears in a message.
"""

from __future__ import annotations

import enum

from refresherd.errors import IdPError
from refresherd.model import Failure, FailureKind


class FailureReason(enum.StrEnum):
    """Why a token request failed, in a word: ``Failure.reason``, the ``reason`` label of
    ``refresherd_refresh_failures_total`` (README). The refresher adds its own reasons for
    failures of a refresh that are not the IdP's (``storage_error``, ``lost_race``,
    ``unknown_provider``)."""

    CONNECT_ERROR = "connect_error"  # NotSent: connect, DNS, TLS, no time left to send
    TIMEOUT = "timeout"  # Ambiguous: sent, no answer in time
    NETWORK_ERROR = "network_error"  # Ambiguous: the connection failed after sending
    SERVER_ERROR = "server_error"  # Ambiguous: 5xx other than 503
    MALFORMED_RESPONSE = "malformed_response"  # Ambiguous: a 2xx that cannot be read
    RATE_LIMITED = "rate_limited"  # RateLimited: 429, 503
    INVALID_GRANT = "invalid_grant"  # InvalidGrant
    INVALID_CLIENT = "invalid_client"  # ClientRejected (or a bare 401)
    UNAUTHORIZED_CLIENT = "unauthorized_client"  # ClientRejected
    OAUTH_ERROR = "oauth_error"  # OAuthError: any other OAuth error code
    HTTP_ERROR = "http_error"  # OAuthError: a status without an OAuth error, a redirect
    NO_REFRESH_TOKEN = "no_refresh_token"  # OAuthError: a code exchange without one


class EndpointError(IdPError):
    """A token request that did not yield a grant. ``failure`` is safe to log."""

    kind: FailureKind = FailureKind.OAUTH_ERROR

    def __init__(
        self,
        reason: FailureReason,
        detail: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.failure = Failure(
            kind=self.kind, reason=reason, detail=detail, status=status, retry_after=retry_after
        )


class NotSent(EndpointError):
    """Connect, DNS or TLS failure: the IdP never saw the refresh token."""

    kind = FailureKind.NOT_SENT


class Ambiguous(EndpointError):
    """Sent, but the answer was lost or unusable: the IdP may have rotated the token."""

    kind = FailureKind.AMBIGUOUS


class RateLimited(EndpointError):
    kind = FailureKind.RATE_LIMITED


class InvalidGrant(EndpointError):
    kind = FailureKind.INVALID_GRANT


class ClientRejected(EndpointError):
    kind = FailureKind.CLIENT_REJECTED


class OAuthError(EndpointError):
    kind = FailureKind.OAUTH_ERROR
