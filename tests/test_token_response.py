"""The token-response rules (refresherd.idp.token_response), applied by both of their readers.

The token endpoint reads an IdP's answer with ``parse_grant``; intake reads a token response
handed in from outside with ``token_set_from_json``. A field both read is read the same way,
with the same verdict and the same words; what differs (which fields are required, whether an
IdP's ``scope`` may be empty) is pinned here too, so that a difference is a decision.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from refresherd.idp.token_response import error_fields, parse_grant
from refresherd.intake import token_set_from_json
from refresherd.settings import ScheduleConfig
from refresherd.store import NewTokenSet

NOW = 1_700_000_000.0
ACCESS = "at-s3cr3t-access"
REFRESH = "rt-s3cr3t-refresh"
TEN_YEARS = 10 * 365 * 86400


def response(**fields: Any) -> dict[str, Any]:
    return {"access_token": ACCESS, "refresh_token": REFRESH, **fields}


def intake(data: dict[str, Any]) -> NewTokenSet:
    return token_set_from_json(
        data, token_set_id="s", provider="p", now=NOW, schedule=ScheduleConfig(), rand=0.0
    )


def grant_error(data: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        parse_grant(json.dumps(data).encode())
    return str(info.value)


def intake_error(data: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        intake(data)
    return str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("expires_in", "soon", "expires_in must be a number"),
        ("expires_in", True, "expires_in must be a number"),
        ("expires_in", [60], "expires_in must be a number"),
        ("expires_in", "nan", "expires_in must be a finite number"),
        ("expires_in", 10**400, "expires_in must be a finite number"),
        ("expires_in", -1, "expires_in must not be negative"),
        ("expires_in", "-60", "expires_in must not be negative"),
        ("expires_in", TEN_YEARS + 1, "expires_in is larger than ten years"),
        ("token_type", "", "token_type must be a non-empty string"),
        ("token_type", 5, "token_type must be a non-empty string"),
        ("refresh_token", "x\ud800", "refresh_token must be valid Unicode text"),
        ("access_token", "x\udfff", "access_token must be valid Unicode text"),
        ("token_type", "\ud800", "token_type must be valid Unicode text"),
    ],
)
def test_both_readers_refuse_a_bad_field_in_the_same_words(
    key: str, value: object, message: str
) -> None:
    data = response(**{key: value})
    assert grant_error(data).startswith(message)
    assert intake_error(data).startswith(message)
    for text in (grant_error(data), intake_error(data)):
        assert "s3cr3t" not in text


@pytest.mark.parametrize("value", [3600, 3600.0, "3600", " 3600 ", "3600.0", 0])
def test_both_readers_take_expires_in_as_a_number_or_its_text(value: object) -> None:
    data = response(expires_in=value)
    seconds = float(str(value).strip())
    assert parse_grant(json.dumps(data).encode()).expires_in == seconds
    assert intake(data).expires_at == NOW + seconds


@pytest.mark.parametrize(
    ("fields", "seconds"),
    [
        ({"refresh_token_expires_in": 7200}, 7200.0),
        ({"refresh_expires_in": "1800"}, 1800.0),
        ({"refresh_token_expires_in": 7200, "refresh_expires_in": 1800}, 7200.0),
        # Unusable: ignored, the other name is read.
        ({"refresh_token_expires_in": "soon", "refresh_expires_in": 1800}, 1800.0),
        ({"refresh_token_expires_in": None, "refresh_expires_in": 1800}, 1800.0),
        # 0: does not expire (Keycloak's offline tokens).
        ({"refresh_expires_in": 0}, None),
        ({"refresh_token_expires_in": -5}, None),
        ({"refresh_token_expires_in": TEN_YEARS + 1}, None),
        ({"refresh_token_expires_in": True}, None),
        ({}, None),
    ],
)
def test_both_readers_read_the_refresh_tokens_lifetime_alike(
    fields: dict[str, Any], seconds: float | None
) -> None:
    data = response(**fields)
    assert parse_grant(json.dumps(data).encode()).refresh_expires_in == seconds
    expected = NOW + seconds if seconds is not None else None
    assert intake(data).refresh_expires_at == expected


def test_what_each_reader_requires_differs_and_says_so() -> None:
    # An IdP's grant without an access token is no grant; a token set handed in needs the
    # refresh token, not an access token (it is then due at once).
    assert grant_error({"refresh_token": REFRESH}) == (
        "access_token is required and must be a non-empty string"
    )
    assert intake_error({"access_token": ACCESS}) == (
        "refresh_token is required and must be a non-empty string"
    )
    assert parse_grant(json.dumps({"access_token": ACCESS}).encode()).refresh_token is None
    assert intake({"refresh_token": REFRESH}).access_token is None


def test_an_idps_empty_scope_is_kept_a_handed_in_one_is_refused() -> None:
    # Refusing the IdP's answer for its scope would lose the rotated token it carries.
    assert parse_grant(json.dumps(response(scope="")).encode()).scope == ""
    assert intake_error(response(scope="")) == "scope must be a non-empty string"
    assert grant_error(response(scope=5)) == "scope must be a string"


def test_a_null_field_is_absent_for_both() -> None:
    data = response(token_type=None, scope=None, expires_in=None)
    grant = parse_grant(json.dumps(data).encode())
    assert (grant.token_type, grant.scope, grant.expires_in) == ("Bearer", None, None)
    new = intake(data)
    assert (new.token_type, new.scope, new.expires_at) == (None, None, None)


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b'{"error": "invalid_grant", "error_description": "gone"}', ("invalid_grant", "gone")),
        (b'{"error": 5, "error_description": ["x"]}', (None, None)),
        (b'{"error": "invalid_client"}', ("invalid_client", None)),
        (b"<html>Bad gateway</html>", (None, None)),
        (b'["invalid_grant"]', (None, None)),
        (b'{"error": "a", "error": "b"}', (None, None)),
        (b"", (None, None)),
    ],
)
def test_error_fields_are_strings_or_none(body: bytes, fields: tuple[object, object]) -> None:
    assert error_fields(body) == fields
