"""The typed failures of a token request: what a refresh, a code exchange or a revocation
raises instead of returning.

Each carries a ``failure`` (:class:`refresherd.model.Failure`) that says, above all, whether
the IdP may have consumed the refresh token (DESIGN.md's failure table); the refresher's
policy decides on its ``kind``. No token or client secret ever appears in a message.
"""

from __future__ import annotations

from refresherd.model import Failure, FailureKind


class EndpointError(Exception):
    """A token request that did not yield a grant. ``failure`` is safe to log."""

    kind: FailureKind = FailureKind.OAUTH_ERROR

    def __init__(
        self,
        reason: str,
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
