"""Connecting a customer (the authorization code flow's first half): the decisions, apart
from I/O.

An application (``POST /v1/tokens/ID/connect``) or support staff (``refresherd connect``) asks
for a link for a provider and a token-set id. The link carries a ``state`` that is unguessable
(random bytes the caller draws with :mod:`secrets`), single use, bound to the provider and the
token-set id, and expiring; it is kept in the database, hashed, so that any daemon of a fleet
can check it (:class:`PendingConnection` is its row). With PKCE (RFC 7636, S256) the verifier is
kept with it, a secret. The browser comes back to ``/connect/PROVIDER/callback``:
:func:`read_callback` reads what it brought, :func:`decide_callback` judges it against the
pending connection (unknown, foreign or expired states, an IdP error, a missing code), and
:func:`finish_url` sends it on to an allow-listed return address with the outcome and the
token-set id, never a secret. Nothing here does I/O, draws randomness or reads a clock.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from refresherd.errors import InvalidInput
from refresherd.model import FailureKind, Secret, State, TokenSet, validate_token_set_id
from refresherd.settings import ConnectConfig, ProviderConfig

# secrets.token_urlsafe(STATE_BYTES): 256 bits, 43 characters.
STATE_BYTES: Final = 32
# secrets.token_urlsafe(VERIFIER_BYTES): 43 characters, RFC 7636's shortest verifier, 256 bits.
VERIFIER_BYTES: Final = 32
# Parameters of the link that refresherd sets itself; a request or the config cannot.
RESERVED_PARAMS: Final = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "state",
        "code_challenge",
        "code_challenge_method",
        "response_mode",
        "scope",
        "prompt",
    }
)
# OpenID Connect Core 3.1.2.1 and Initiating User Registration 1.0.
PROMPT_VALUES: Final = ("none", "login", "consent", "select_account", "create")
RESPONSE_MODES: Final = ("query", "form_post")
MAX_PARAMS: Final = 20
MAX_VALUE_CHARS: Final = 2000
# An expired state is kept this long before it is pruned: a customer who comes back late is
# sent back to the application with outcome=expired rather than shown "unknown link".
EXPIRED_STATE_KEPT: Final = 3600.0
# A state we issued is 43 characters; anything far longer is not one (and is not hashed).
MAX_STATE_CHARS: Final = 512
# The IdP's error codes that are passed on (RFC 6749 4.1.2.1, OpenID Connect Core 3.1.2.6);
# anything else is named "other": the callback's input is anyone's.
KNOWN_ERRORS: Final = frozenset(
    {
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
        "interaction_required",
        "login_required",
        "account_selection_required",
        "consent_required",
        "invalid_request_uri",
        "invalid_request_object",
        "request_not_supported",
        "request_uri_not_supported",
        "registration_not_supported",
    }
)


def callback_path(provider: str) -> str:
    """The route of a provider's callback on refresherd's listener."""
    return f"/connect/{provider}/callback"


def state_digest(state: str) -> str:
    """What the database keeps of a state: its SHA-256 (a leaked table holds no usable state)."""
    return hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()


def code_challenge(verifier: str) -> str:
    """RFC 7636 4.2, S256: BASE64URL(SHA256(ASCII(verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# ---- asking for a link --------------------------------------------------------------------------


class LinkRefused(InvalidInput):
    """A link cannot be made; ``code`` is the API's error code, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """What a link is asked for: who, where, and what the IdP is to be asked."""

    token_set_id: str
    provider: str
    return_url: str | None = None
    scope: str | None = None
    prompt: str | None = None
    params: tuple[tuple[str, str], ...] = ()


def link_request(
    token_set_id: str,
    provider: str,
    *,
    return_url: object = None,
    scope: object = None,
    prompt: object = None,
    params: object = None,
) -> LinkRequest:
    """A link request checked field by field (from the API's JSON or the CLI's arguments);
    :class:`LinkRefused` (``invalid_request``) names the field that is wrong."""
    try:
        validate_token_set_id(token_set_id)
    except ValueError as exc:
        raise LinkRefused("invalid_request", str(exc)) from None
    return LinkRequest(
        token_set_id=token_set_id,
        provider=provider,
        return_url=_optional_text("return_url", return_url),
        scope=_optional_text("scope", scope),
        prompt=_prompt(prompt),
        params=_params("params", params, origin="the request"),
    )


def link_request_from_json(data: Mapping[str, object], *, token_set_id: str) -> LinkRequest:
    """The body of ``POST /v1/tokens/ID/connect``."""
    unknown = sorted(set(data) - {"provider", "return_url", "scope", "prompt", "params"})
    if unknown:
        raise LinkRefused(
            "invalid_request",
            f"unknown field {unknown[0]!r}; expected provider, return_url, scope, prompt, params",
        )
    provider = data.get("provider")
    if not isinstance(provider, str) or not provider:
        raise LinkRefused("invalid_request", "provider is a required non-empty string")
    return link_request(
        token_set_id,
        provider,
        return_url=data.get("return_url"),
        scope=data.get("scope"),
        prompt=data.get("prompt"),
        params=data.get("params"),
    )


def _optional_text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise LinkRefused("invalid_request", f"{name} must be a non-empty string when given")
    if len(value) > MAX_VALUE_CHARS or not value.isprintable():
        raise LinkRefused(
            "invalid_request",
            f"{name} must be printable and at most {MAX_VALUE_CHARS} characters",
        )
    return value


def _prompt(value: object) -> str | None:
    text = _optional_text("prompt", value)
    if text is None:
        return None
    words = text.split(" ")
    if not all(word in PROMPT_VALUES for word in words) or len(set(words)) != len(words):
        raise LinkRefused(
            "invalid_request",
            "prompt must be space-separated values from " + ", ".join(PROMPT_VALUES),
        )
    return text


def _params(name: str, value: object, *, origin: str) -> tuple[tuple[str, str], ...]:
    """Extra link parameters: a mapping of names to strings, none of them refresherd's own.
    ``name`` prefixes what a message names ("" for the config's table, named by its key)."""
    if value is None:
        return ()
    prefix = f"{name}: " if name else ""
    if not isinstance(value, Mapping):
        raise LinkRefused("invalid_request", f"{prefix}expected an object of strings")
    if len(value) > MAX_PARAMS:
        raise LinkRefused("invalid_request", f"{prefix}at most {MAX_PARAMS} parameters")
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        if not isinstance(key, str) or not key or not key.isprintable():
            raise LinkRefused("invalid_request", f"{prefix}names must be non-empty strings")
        where = f"{name}.{key}" if name else key
        if key in RESERVED_PARAMS:
            raise LinkRefused(
                "invalid_request",
                f"{where}: set by refresherd itself, not by {origin}"
                + (" (use the field of that name)" if key in ("scope", "prompt") else ""),
            )
        if not isinstance(item, str) or len(item) > MAX_VALUE_CHARS or not item.isprintable():
            raise LinkRefused(
                "invalid_request",
                f"{where}: expected a printable string of at most {MAX_VALUE_CHARS} characters",
            )
        pairs.append((key, item))
    return tuple(pairs)


def config_params(value: Mapping[str, object]) -> tuple[tuple[str, str], ...]:
    """A provider's ``authorization_params`` table, by the rules of a request's ``params``;
    ValueError names what is wrong (the loader adds the key)."""
    try:
        return _params("", value, origin="the config")
    except LinkRefused as exc:
        raise ValueError(exc.message) from None


# ---- the return address -------------------------------------------------------------------------


def _origin_and_path(url: str) -> tuple[str, str, int | None, str] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname.lower(), port, parts.path or "/"


def return_url_allowed(url: str, allowed: Sequence[str]) -> bool:
    """Whether ``url`` is one of ``allowed``: the same scheme, host, port and path (its own
    query is the application's; a fragment, user info or anything unparsable is refused).
    Exact, so that no crafted address turns the callback into an open redirect."""
    if any(ch.isspace() or not ch.isprintable() or ch in "\\#" for ch in url):
        return False
    mine = _origin_and_path(url)
    return mine is not None and any(mine == _origin_and_path(a) for a in allowed)


def choose_return_url(requested: str | None, connect: ConnectConfig) -> str | None:
    """The return address of a new link: the requested one if allow-listed, else the first
    allow-listed one; None when none is configured (refresherd shows the outcome itself)."""
    if requested is None:
        return connect.return_urls[0] if connect.return_urls else None
    if not connect.return_urls:
        raise LinkRefused(
            "invalid_request",
            "return_url: this provider has no return_urls configured, so the browser cannot be "
            "sent anywhere; leave it out, or configure the address",
        )
    if not return_url_allowed(requested, connect.return_urls):
        raise LinkRefused(
            "invalid_request",
            "return_url is not one of the provider's return_urls (scheme, host, port and path "
            "must match one exactly)",
        )
    return requested


# ---- the link -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingConnection:
    """A link's state as the database keeps it: found by the state's digest, used once."""

    digest: str
    provider: str
    token_set_id: str
    redirect_uri: str
    return_url: str | None
    code_verifier: Secret | None
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Link:
    """A link to hand to the customer. ``url`` holds the state: never log it (nor repr it)."""

    url: str = field(repr=False)
    pending: PendingConnection
    # The token set exists, invalidated: connecting re-authorizes it in place.
    reconnect: bool


def connect_refusal(current: TokenSet | None, provider: str) -> LinkRefused | None:
    """Whether a token set can be connected: it does not exist, or it was invalidated under
    the same provider (connecting re-authorizes it, keeping its id and history)."""
    if current is None:
        return None
    if current.provider != provider:
        return LinkRefused(
            "exists",
            f"token set {current.id!r} belongs to provider {current.provider!r}, not {provider!r}",
        )
    if current.state is not State.INVALIDATED:
        return LinkRefused(
            "exists",
            f"token set {current.id!r} exists and is {current.state.value}; only a new or an "
            "invalidated token set can be connected (remove it first to start over)",
        )
    return None


def plan_link(
    provider: ProviderConfig,
    request: LinkRequest,
    *,
    current: TokenSet | None,
    state: str,
    verifier: str,
    now: float,
) -> Link:
    """The link for ``request`` with ``state`` (and, where the provider takes PKCE,
    ``verifier``): both drawn by the caller from :mod:`secrets`."""
    connect = provider.connect
    if connect is None or provider.authorization_url is None:
        raise LinkRefused(
            "connect_unsupported",
            f"provider {provider.name!r} is not set up for connecting customers: it needs "
            "redirect_uri and an authorization endpoint (authorization_url, a preset's, or "
            "discovery's from issuer)",
        )
    refusal = connect_refusal(current, provider.name)
    if refusal is not None:
        raise refusal
    return_url = choose_return_url(request.return_url, connect)
    query: list[tuple[str, str]] = [
        ("response_type", "code"),
        ("client_id", provider.client_id),
        ("redirect_uri", connect.redirect_uri),
    ]
    scope = request.scope or connect.scope or provider.scope
    if scope:
        query.append(("scope", scope))
    query.append(("state", state))
    if connect.pkce:
        query += [("code_challenge", code_challenge(verifier)), ("code_challenge_method", "S256")]
    if connect.response_mode != "query":
        query.append(("response_mode", connect.response_mode))
    if request.prompt:
        query.append(("prompt", request.prompt))
    extra = dict(connect.params)
    extra.update(request.params)
    query += list(extra.items())
    pending = PendingConnection(
        digest=state_digest(state),
        provider=provider.name,
        token_set_id=request.token_set_id,
        redirect_uri=connect.redirect_uri,
        return_url=return_url,
        code_verifier=Secret(verifier) if connect.pkce else None,
        created_at=now,
        expires_at=now + connect.link_lifetime,
    )
    return Link(
        url=_with_query(provider.authorization_url, query),
        pending=pending,
        reconnect=current is not None,
    )


def _with_query(url: str, pairs: Sequence[tuple[str, str]]) -> str:
    """``url`` with ``pairs`` added to its query (a query it has, such as a B2C policy, kept)."""
    parts = urlsplit(url)
    query = urlencode(pairs, quote_via=quote)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, ""))


# ---- the callback -------------------------------------------------------------------------------


class Refusal(enum.StrEnum):
    """A callback refused before any connection is known: no redirect (nowhere trusted to
    send the browser), nothing stored, no code spent. Values are metric labels."""

    MISSING_STATE = "missing_state"
    DUPLICATE_PARAMETER = "duplicate_parameter"
    UNREADABLE = "unreadable"  # a POST that is not a small urlencoded form
    UNKNOWN_STATE = "unknown_state"  # never issued, used already, or pruned long after expiry
    WRONG_PROVIDER = "wrong_provider"  # issued for another provider's callback


class Outcome(enum.StrEnum):
    """What became of a connection the browser is sent back with (``outcome=``). Values are
    a stable contract and metric labels."""

    CONNECTED = "connected"  # a new token set is stored
    RECONNECTED = "reconnected"  # an invalidated token set is authorized again, in place
    ACCESS_DENIED = "access_denied"  # the user cancelled or refused consent
    IDP_ERROR = "idp_error"  # the IdP answered another error
    INVALID_CALLBACK = "invalid_callback"  # no code, or an answer from the wrong issuer
    EXPIRED = "expired"  # the link was used after it expired: ask for a new one
    EXCHANGE_FAILED = "exchange_failed"  # the IdP refused to redeem the code
    PROVIDER_UNAVAILABLE = "provider_unavailable"  # the IdP did not answer the exchange usably
    PENDING = "pending"  # issued and held until the database takes it: GET says when
    EXISTS = "exists"  # another token set took the id meanwhile; this grant is discarded
    STORAGE_ERROR = "storage_error"  # the grant could not be stored and is lost


CONNECTED_OUTCOMES: Final = frozenset({Outcome.CONNECTED, Outcome.RECONNECTED})


@dataclass(frozen=True, slots=True)
class CallbackAnswer:
    """What the IdP sent the browser back with (query or form_post)."""

    state: Secret | None
    code: Secret | None
    error: str | None
    issuer: str | None


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal


@dataclass(frozen=True, slots=True)
class Finish:
    """Send the browser back now with ``outcome``; ``detail`` is for the log (no secret)."""

    outcome: Outcome
    detail: str


@dataclass(frozen=True, slots=True)
class Exchange:
    """Redeem the code (RFC 6749 4.1.3) with the redirect_uri and verifier of the link."""

    code: Secret
    redirect_uri: str
    code_verifier: Secret | None


def read_callback(pairs: Sequence[tuple[str, str]]) -> CallbackAnswer | Refused:
    """The answer's parameters, each at most once (RFC 6749 3.1); a state is required."""
    wanted = ("state", "code", "error", "iss")
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in wanted:
            if name in seen:
                return Refused(Refusal.DUPLICATE_PARAMETER)
            seen[name] = value
    state = seen.get("state")
    if not state:
        return Refused(Refusal.MISSING_STATE)
    code = seen.get("code")
    return CallbackAnswer(
        state=Secret(state),
        code=Secret(code) if code else None,
        error=seen.get("error") or None,
        issuer=seen.get("iss") or None,
    )


def lookup_digest(answer: CallbackAnswer) -> str | None:
    """The digest to look the state up by; None for a value no state of ours can be."""
    assert answer.state is not None
    state = answer.state.reveal()
    return state_digest(state) if len(state) <= MAX_STATE_CHARS else None


def decide_callback(
    answer: CallbackAnswer,
    pending: PendingConnection | None,
    *,
    provider: ProviderConfig,
    now: float,
) -> Refused | Finish | Exchange:
    """What to do with an answer whose state was taken (used up) as ``pending``."""
    if pending is None:
        return Refused(Refusal.UNKNOWN_STATE)
    if pending.provider != provider.name:
        return Refused(Refusal.WRONG_PROVIDER)
    if now >= pending.expires_at:
        return Finish(Outcome.EXPIRED, "the link expired before the customer came back")
    if (
        answer.issuer is not None
        and provider.issuer is not None
        and answer.issuer != provider.issuer
    ):
        # RFC 9207: an answer naming another issuer is a mix-up; its code is not redeemed.
        return Finish(Outcome.INVALID_CALLBACK, "the answer names another issuer (iss)")
    if answer.error is not None:
        if answer.error == "access_denied":
            return Finish(Outcome.ACCESS_DENIED, "the customer did not authorize")
        shown = answer.error if answer.error in KNOWN_ERRORS else "other"
        return Finish(Outcome.IDP_ERROR, f"the identity provider answered error {shown}")
    if answer.code is None:
        return Finish(Outcome.INVALID_CALLBACK, "the answer has neither a code nor an error")
    return Exchange(answer.code, pending.redirect_uri, pending.code_verifier)


def exchange_failure_outcome(kind: FailureKind) -> Outcome:
    """A failed code exchange, by what it means: the IdP refused the code (used, expired, a
    verifier or redirect_uri that does not match, no refresh token), or it could not be asked
    (unreachable, overloaded, our client credentials refused)."""
    if kind in (FailureKind.INVALID_GRANT, FailureKind.OAUTH_ERROR):
        return Outcome.EXCHANGE_FAILED
    return Outcome.PROVIDER_UNAVAILABLE


def return_destination(pending: PendingConnection, provider: ProviderConfig) -> str | None:
    """Where the browser goes back: the link's return address while the provider's current
    config still allows it (a reload may have dropped it); None: refresherd shows the outcome."""
    if pending.return_url is None or provider.connect is None:
        return None
    if not return_url_allowed(pending.return_url, provider.connect.return_urls):
        return None
    return pending.return_url


def finish_url(return_url: str, outcome: Outcome, token_set_id: str) -> str:
    """``return_url`` with ``outcome`` and ``token_set`` added to its query, and nothing else:
    no code, state or token ever travels to the application's page."""
    parts = urlsplit(return_url)
    kept = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in ("outcome", "token_set")
    ]
    query = urlencode([*kept, ("outcome", outcome.value), ("token_set", token_set_id)])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


# What refresherd shows when it cannot send the browser anywhere: (HTTP status, title, text).
_REFUSAL_PAGES: Final = {
    Refusal.MISSING_STATE: "The answer from the identity provider has no state.",
    Refusal.DUPLICATE_PARAMETER: "The answer from the identity provider repeats a parameter.",
    Refusal.UNREADABLE: "The answer from the identity provider could not be read.",
    Refusal.UNKNOWN_STATE: (
        "This link was not issued here, or has been used already. Nothing was stored."
    ),
    Refusal.WRONG_PROVIDER: "This link was issued for another identity provider.",
}
_OUTCOME_PAGES: Final = {
    Outcome.CONNECTED: "Connected. You can close this window.",
    Outcome.RECONNECTED: "Connected again. You can close this window.",
    Outcome.ACCESS_DENIED: "Not connected: authorization was not given.",
    Outcome.IDP_ERROR: "Not connected: the identity provider reported an error.",
    Outcome.INVALID_CALLBACK: "Not connected: the identity provider's answer was not usable.",
    Outcome.EXPIRED: "Not connected: this link has expired. Ask for a new one.",
    Outcome.EXCHANGE_FAILED: "Not connected: the identity provider refused the authorization.",
    Outcome.PROVIDER_UNAVAILABLE: "Not connected: the identity provider is not reachable now.",
    Outcome.PENDING: "Connected; it is being saved.",
    Outcome.EXISTS: "Not connected: this account was connected in another way meanwhile.",
    Outcome.STORAGE_ERROR: "Not connected: the connection could not be saved. Try again.",
}


def refusal_page(reason: Refusal) -> tuple[int, str, str]:
    return 400, "Not connected", _REFUSAL_PAGES[reason]


def outcome_page(outcome: Outcome) -> tuple[int, str, str]:
    title = "Connected" if outcome in CONNECTED_OUTCOMES else "Not connected"
    return 200, title, _OUTCOME_PAGES[outcome]


# ---- re-connection ------------------------------------------------------------------------------


def reconnect_hint(token_set_id: str, provider: ProviderConfig | None) -> dict[str, str] | None:
    """How an invalidated set is brought back (for the API's answer, its hook event and
    ``tokens show``), where its provider is set up for connecting; None otherwise."""
    if provider is None or provider.connect is None or provider.authorization_url is None:
        return None
    return {
        "method": "POST",
        "path": f"/v1/tokens/{quote(token_set_id, safe='')}/connect",
        "provider": provider.name,
        "command": f"refresherd connect {shlex.quote(token_set_id)} --provider {provider.name}",
    }
