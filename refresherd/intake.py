"""Token sets coming in from outside (``tokens add``, ``tokens import``): validate, plan, build.

Pure: input is the decoded JSON and ``now``; output is a :class:`NewTokenSet` or a ValueError
that says which field is wrong. The token response's own fields are read by the rules the
token endpoint reads an IdP's answer by (:mod:`refresherd.idp.token_response`); added here are
``expires_at``, the per-set policy fields and the lines of an import. Fields not read
(``id_token``, the extras a real IdP sends) are ignored, so a token response can be piped in
as it came; except one that looks like a misspelt per-set policy field
(``refersh_token_usage``), which is refused with a suggestion: ignored, it would leave the set
under its provider's policy without a word.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import IO, Any, Final, NamedTuple, TypeVar

from refresherd import policy
from refresherd.errors import InvalidInput
from refresherd.idp import token_response
from refresherd.model import RefreshMode, RefreshTokenUsage, Secret, validate_token_set_id
from refresherd.settings import ConfigError, ScheduleConfig, did_you_mean, parse_duration
from refresherd.store import NewTokenSet

_E = TypeVar("_E", bound=enum.StrEnum)

MAX_LINE_BYTES = 1024 * 1024


class InputError(InvalidInput, ValueError):
    """Bad token input; ``where`` names the line (import) or the source."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"{where}: {message}")


# The same bounds the provider config puts on these settings (config.py).
MAX_GRACE_PERIOD = 600.0


def _duration(data: Mapping[str, Any], key: str) -> float | None:
    """A per-set policy duration: seconds as a JSON number, or a string such as ``"30s"``
    read exactly as the config file reads durations (config.parse_duration)."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            seconds = parse_duration(value, file="input", key=key)
        except ConfigError as exc:
            # ConfigError names a file; here the caller's InputError names the line.
            raise ValueError(f"{key}: {exc.message}") from None
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f'{key} must be a number of seconds or a duration such as "30s"')
        finite = token_response.number(data, key)  # finite, and fits a float
        assert finite is not None
        seconds = finite
    if seconds < 0:
        raise ValueError(f"{key} must not be negative")
    return seconds


class SetPolicy(NamedTuple):
    """The optional per-set policy of a token response; None: the provider's value applies."""

    usage: RefreshTokenUsage | None
    grace_period: float | None
    lifetime: float | None
    idle_lifetime: float | None
    mode: RefreshMode | None


def _choice(data: Mapping[str, Any], key: str, kind: type[_E]) -> _E | None:
    raw = data.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str) or raw not in {m.value for m in kind}:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"{key} must be one of {choices}")
    return kind(raw)


def _lifetime(data: Mapping[str, Any], key: str) -> float | None:
    lifetime = _duration(data, key)
    if lifetime is not None:
        if lifetime <= 0:
            raise ValueError(f"{key} must be positive")
        if lifetime > token_response.MAX_LIFETIME:
            raise ValueError(f"{key} is larger than ten years")
    return lifetime


# The per-set policy fields (SetPolicy), and every other field read here or by the callers.
POLICY_FIELDS: Final = (
    "refresh_token_usage",
    "grace_period",
    "refresh_token_lifetime",
    "refresh_token_idle_lifetime",
    "refresh_mode",
)
_KNOWN_FIELDS: Final = frozenset(
    {*POLICY_FIELDS, *token_response.GRANT_FIELDS, "id", "provider", "expires_at"}
)
# How alike a field must be to a policy field to be taken for its misspelling (difflib's
# ratio; the config file's suggestions use 0.6). Higher than there: a token response carries
# fields of its own, and x_refresh_token_expires_in (Intuit), 0.71 like refresh_token_lifetime,
# must pass. A typo of one or two letters scores 0.9 and more.
_MISSPELT_CUTOFF: Final = 0.85


def _refuse_misspelt_policy(data: Mapping[str, Any]) -> None:
    for key in data:
        if key in _KNOWN_FIELDS:
            continue
        # refreshTokenUsage and refresh-token-usage are the same mistake as a typo.
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).replace("-", "_").lower()
        close = did_you_mean(snake, POLICY_FIELDS, cutoff=_MISSPELT_CUTOFF)
        if close is not None:
            # The key is echoed: it is a near copy of a public field name, not a value.
            raise ValueError(f'unknown field "{key}"; did you mean "{close}"?')


def _policy(data: Mapping[str, Any]) -> SetPolicy:
    _refuse_misspelt_policy(data)
    grace = _duration(data, "grace_period")
    if grace is not None and grace > MAX_GRACE_PERIOD:
        raise ValueError("grace_period must be at most 10m")
    return SetPolicy(
        usage=_choice(data, "refresh_token_usage", RefreshTokenUsage),
        grace_period=grace,
        lifetime=_lifetime(data, "refresh_token_lifetime"),
        idle_lifetime=_lifetime(data, "refresh_token_idle_lifetime"),
        mode=_choice(data, "refresh_mode", RefreshMode),
    )


def _expires_at(data: Mapping[str, Any], now: float) -> tuple[float | None, float | None]:
    """(expires_at, lifetime) from ``expires_in`` (preferred) or ``expires_at``."""
    expires_in = token_response.lifetime(data, "expires_in")
    if expires_in is not None:
        return now + expires_in, expires_in
    raw = data.get("expires_at")
    if raw is None:
        return None, None
    if isinstance(raw, str) and not raw.strip().lstrip("-").replace(".", "", 1).isdigit():
        try:
            text = raw.strip()
            if text[-1:] in ("Z", "z"):  # RFC 3339 allows a lower-case z
                text = text[:-1] + "+00:00"
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("expires_at must be Unix seconds or an RFC 3339 time") from None
        if parsed.tzinfo is None:
            raise ValueError("expires_at must carry a time zone (e.g. a trailing Z)")
        value: float | None = parsed.timestamp()
    else:
        value = token_response.number(data, "expires_at")
    assert value is not None
    if value > now + token_response.MAX_LIFETIME:
        # Most likely milliseconds: planned from it, the token would never be refreshed.
        raise ValueError("expires_at is more than ten years ahead (Unix seconds expected)")
    return value, None


def token_set_from_json(
    data: object,
    *,
    token_set_id: str,
    provider: str,
    now: float,
    schedule: ScheduleConfig,
    rand: float,
    imported: bool = False,
) -> NewTokenSet:
    """``imported``: one of many added together (``tokens import``), whose first refreshes
    are spread out (policy.plan_imported_refresh)."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object (a token response)")
    refresh = token_response.text(data, "refresh_token", required=True)
    assert refresh is not None
    access = token_response.text(data, "access_token")
    token_type = token_response.text(data, "token_type")
    scope = token_response.text(data, "scope")
    expires_at, lifetime = _expires_at(data, now)
    set_policy = _policy(data)
    # Without an access token there is nothing to keep fresh yet: due at once.
    plan_expiry = expires_at if access is not None else None
    plan = policy.plan_imported_refresh if imported else policy.plan_next_refresh
    next_at = plan(now=now, expires_at=plan_expiry, lifetime=lifetime, cfg=schedule, rand=rand)
    return NewTokenSet(
        id=validate_token_set_id(token_set_id),
        provider=provider,
        refresh_token=Secret(refresh),
        access_token=Secret(access) if access is not None else None,
        expires_at=expires_at if access is not None else None,
        next_refresh_at=next_at,
        token_type=token_type,
        scope=scope,
        refresh_expires_at=_refresh_expires_at(data, now),
        refresh_token_usage=set_policy.usage,
        grace_period=set_policy.grace_period,
        refresh_token_lifetime=set_policy.lifetime,
        refresh_token_idle_lifetime=set_policy.idle_lifetime,
        refresh_mode=set_policy.mode,
    )


def _refresh_expires_at(data: Mapping[str, Any], now: float) -> float | None:
    """The refresh token's own expiry, where the token response states its lifetime."""
    seconds = token_response.refresh_lifetime(data)
    return now + seconds if seconds is not None else None


def _decode(text: str, where: str, *, one_line: bool = False) -> object:
    """JSON text as a value; InputError naming ``where``, why and the place (its column, and
    its line unless ``where`` names the line) if it is not JSON. Trailing white space is cut
    first, so that a document cut short is reported where it ends, not on the line after."""
    text = text.rstrip()
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(where, "not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as exc:
        raise InputError(where, _json_problem(exc, text, one_line=one_line)) from None
    except ValueError as exc:  # a number too long to convert, say
        raise InputError(where, f"not valid JSON ({exc})") from None


def _json_problem(exc: json.JSONDecodeError, text: str, *, one_line: bool) -> str:
    """Why and where ``text`` is not JSON."""
    where = f"column {exc.colno}" if one_line else f"line {exc.lineno} column {exc.colno}"
    what = "line" if one_line else "input"
    ends = ""
    if exc.pos >= len(text):
        ends = f"; the {what} ends there (cut short?)"
    elif exc.msg.startswith("Unterminated string"):
        ends = f"; the {what} ends inside it (cut short?)"
    # Some of json's messages end in "at" already ("Unterminated string starting at").
    return f"not valid JSON: {exc.msg.removesuffix(' at')} at {where}{ends}"


def parse_single(
    text: str,
    *,
    token_set_id: str,
    provider: str,
    now: float,
    schedule: ScheduleConfig,
    rand: float,
) -> NewTokenSet:
    data = _decode(text, "stdin")
    try:
        return token_set_from_json(
            data,
            token_set_id=token_set_id,
            provider=provider,
            now=now,
            schedule=schedule,
            rand=rand,
        )
    except ValueError as exc:
        raise InputError("stdin", str(exc)) from None


def parse_lines(
    stream: IO[str],
    *,
    source: str,
    providers: Mapping[str, object],
    now: float,
    schedule: ScheduleConfig,
    rand: Iterator[float],
) -> list[NewTokenSet]:
    """JSON Lines of ``{"id", "provider", ...token response}``; the first bad line raises."""
    return [
        item
        for _, item in iter_lines(
            stream,
            source=source,
            providers=providers,
            now=now,
            schedule=schedule,
            rand=rand,
            seen=set(),
        )
    ]


def iter_lines(
    stream: Iterable[str | bytes],
    *,
    source: str,
    providers: Mapping[str, object],
    now: float,
    schedule: ScheduleConfig,
    rand: Iterator[float],
    seen: set[str] | None = None,
) -> Iterator[tuple[str, NewTokenSet]]:
    """:func:`parse_lines` one ``(where, token set)`` at a time, for inputs too large to hold
    in memory. An id repeated in the input is reported here only where ``seen`` is given (it
    grows with the input); otherwise the store's import reports it, with its ``where``. Lines
    may come as bytes, read as UTF-8 (an invalid byte is reported with its line)."""
    for number, raw in enumerate(stream, start=1):
        where = f"{source}:{number}"
        if len(raw) > MAX_LINE_BYTES:
            raise InputError(where, f"line longer than {MAX_LINE_BYTES} bytes")
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                # Not the bytes themselves: the line may hold a token.
                raise InputError(
                    where, f"not UTF-8 text: byte {exc.start + 1} of the line is invalid"
                ) from None
        else:
            line = raw
        if not line.strip():
            continue
        data = _decode(line, where, one_line=True)
        try:
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            token_set_id = data.get("id")
            if not isinstance(token_set_id, str):
                raise ValueError("id is required and must be a string")
            provider = data.get("provider")
            if not isinstance(provider, str):
                raise ValueError("provider is required and must be a string")
            if provider not in providers:
                known = ", ".join(sorted(providers))
                raise ValueError(f"provider {provider!r} is not configured (known: {known})")
            if seen is not None:
                if token_set_id in seen:
                    raise ValueError(f"id {token_set_id!r} appears twice in the input")
                seen.add(token_set_id)
            item = token_set_from_json(
                data,
                token_set_id=token_set_id,
                provider=provider,
                now=now,
                schedule=schedule,
                rand=next(rand),
                imported=True,
            )
        except ValueError as exc:
            raise InputError(where, str(exc)) from None
        yield where, item
