"""Reading a token response (RFC 6749 5.1, and 5.2's error fields): the rules, once.

Two readers apply them: the token endpoint (:mod:`refresherd.idp.endpoint`) to an IdP's
answer, and :mod:`refresherd.intake` to a token response handed in from outside (``tokens
add``/``import``, ``POST /v1/tokens``). What differs between the two is which fields are
required (an IdP's grant must carry an access token, a token set handed in a refresh token),
not how a field is read:

- a field that is absent or ``null`` is absent;
- a token, a token type, a scope is a non-empty string that can be stored (JSON escapes can
  spell lone surrogates, which neither SQLite nor the next request's form can encode);
- a number of seconds is a JSON number or its decimal text (``"3600"``: some IdPs send
  that), finite; a lifetime is at least 0 and at most ten years;
- the refresh token's own lifetime (``refresh_token_expires_in``, or Keycloak's
  ``refresh_expires_in``) is information only: unusable, it is ignored; 0 says the token
  does not expire.

Every message names the field and never quotes its value: values are tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from refresherd.model import Grant, Secret

# No token lives this long: a larger value is a mistake (milliseconds, most likely).
MAX_LIFETIME: Final = 10 * 365 * 86400.0
# The refresh token's own lifetime, by the names IdPs give it, the standard-track one first.
REFRESH_EXPIRY_FIELDS: Final = ("refresh_token_expires_in", "refresh_expires_in")
GRANT_FIELDS: Final = (
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "scope",
    "id_token",
    *REFRESH_EXPIRY_FIELDS,
)
ERROR_FIELDS: Final = ("error", "error_description", "error_uri")
_KNOWN_FIELDS: Final = frozenset((*GRANT_FIELDS, *ERROR_FIELDS))


def storable(value: str, key: str) -> str:
    """``value``, if it can be encoded: JSON may carry lone surrogates (``"\\ud800"``), a str
    that SQLite cannot store."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{key} must be valid Unicode text (no lone surrogates)") from None
    return value


def text(
    data: Mapping[str, Any], key: str, *, required: bool = False, may_be_empty: bool = False
) -> str | None:
    """A string field: None if absent (or null, unless ``required``). ``may_be_empty``: ""
    is a value, not an error (an IdP's ``scope``: refusing the answer would lose the
    rotated token it carries)."""
    value = data.get(key)
    if value is None and not required:
        return None
    if isinstance(value, str) and (value or may_be_empty):
        return storable(value, key)
    if required:
        raise ValueError(f"{key} is required and must be a non-empty string")
    raise ValueError(
        f"{key} must be a string" if may_be_empty else f"{key} must be a non-empty string"
    )


def number(data: Mapping[str, Any], key: str) -> float | None:
    """A number field (seconds, a time): a JSON number or its decimal text, finite."""
    value = data.get(key)
    if value is None:
        return None
    # Some IdPs send the number as a string ("3600"); accept what float() reads, nothing else.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    try:
        seconds = float(value)  # a JSON integer can be too large for a float
    except OverflowError:
        raise ValueError(f"{key} must be a finite number") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{key} must be a finite number")
    return seconds


def lifetime(data: Mapping[str, Any], key: str) -> float | None:
    """Seconds a token lives (``expires_in``): a number, at least 0, at most ten years."""
    seconds = number(data, key)
    if seconds is not None:
        if seconds < 0:
            raise ValueError(f"{key} must not be negative")
        if seconds > MAX_LIFETIME:
            raise ValueError(f"{key} is larger than ten years")
    return seconds


def refresh_lifetime(data: Mapping[str, Any]) -> float | None:
    """The refresh token's own lifetime in seconds, where the IdP states it: the first of
    :data:`REFRESH_EXPIRY_FIELDS` that holds a usable lifetime. Information only: a value
    that cannot be read is ignored, never a reason to distrust a grant that carries a rotated
    token or to refuse a token set. 0 means "does not expire" (Keycloak's offline tokens):
    None."""
    for key in REFRESH_EXPIRY_FIELDS:
        try:
            seconds = lifetime(data, key)
        except ValueError:
            continue
        if seconds is not None:
            return seconds or None
    return None


# --------------------------------------------------------------------------- an IdP's body


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # The key is IdP-supplied text: name it only if it is one we know.
            shown = repr(key) if key in _KNOWN_FIELDS else "a key"
            raise _DuplicateKey(f"the JSON object has {shown} more than once")
        result[key] = value
    return result


def load_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; ValueError saying why not (HTML, truncated, a list, a key
    twice: which access token would be the real one?).

    The messages never quote the body: it may hold tokens.
    """
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    if not decoded.strip():
        raise ValueError("the body is empty")
    try:
        value = json.loads(decoded, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise ValueError(str(exc)) from None
    except json.JSONDecodeError as exc:
        # exc.msg is json's own wording ("Expecting value", ...), never the document.
        raise ValueError(f"the body is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except (ValueError, RecursionError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"the body is JSON but not an object (a {_json_type(value)})")
    return value


def _json_type(value: object) -> str:
    match value:
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case str():
            return "string"
        case list():
            return "list"
        case None:
            return "null"
        case _:
            return "object"


def parse_grant(body: bytes) -> Grant:
    """A successful token response (RFC 6749 5.1) as a :class:`Grant`. Raises ValueError
    naming the field that is wrong."""
    data = load_json_object(body)
    access = text(data, "access_token", required=True)
    assert access is not None
    token_type = text(data, "token_type") or "Bearer"
    expires_in = lifetime(data, "expires_in")
    refresh = text(data, "refresh_token")
    scope = text(data, "scope", may_be_empty=True)
    id_token = text(data, "id_token", may_be_empty=True)
    return Grant(
        access_token=Secret(access),
        token_type=token_type,
        expires_in=expires_in,
        refresh_token=Secret(refresh) if refresh else None,
        scope=scope,
        id_token=Secret(id_token) if id_token else None,
        refresh_expires_in=refresh_lifetime(data),
    )


def error_fields(body: bytes) -> tuple[str | None, str | None]:
    """``(error, error_description)`` of an error response (RFC 6749 5.2); None for each
    that is absent or not a string, both None if the body is not a JSON object."""
    try:
        data = load_json_object(body)
    except ValueError:
        return None, None
    code, description = data.get("error"), data.get("error_description")
    return (
        code if isinstance(code, str) else None,
        description if isinstance(description, str) else None,
    )
