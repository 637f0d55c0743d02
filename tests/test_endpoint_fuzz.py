"""The token-response parser and the error classifier under fuzzed input (hypothesis), with
secrets planted anywhere in the body: the outcome is a Grant or the documented typed error, and
no message ever carries a planted token (DESIGN.md: a secret never reaches an exception)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from refresherd.idp.endpoint import _oauth_error
from refresherd.idp.failures import EndpointError
from refresherd.idp.token_response import parse_grant
from refresherd.model import Secret

# Token-like values no generated text contains by chance.
PRESENTED = "rt_presented_8f3a9c1d2e7b4f60"
MINTED = "at_minted_0c9b8a7d6e5f4a3b"
MARKERS = (PRESENTED, MINTED)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(MARKERS),
    # A marker inside other text, as an IdP's error_description might echo it.
    st.builds(
        lambda a, m, b: a + m + b,
        st.text(max_size=5),
        st.sampled_from(MARKERS),
        st.text(max_size=5),
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.one_of(st.text(max_size=6), st.sampled_from(MARKERS)), inner, max_size=3
        )
    ),
    max_leaves=8,
)
_keys = st.one_of(
    st.sampled_from(
        [
            "access_token",
            "refresh_token",
            "id_token",
            "token_type",
            "expires_in",
            "scope",
            "error",
            "error_description",
            "error_uri",
        ]
    ),
    st.sampled_from(MARKERS),
    st.text(max_size=6),
)
_objects = st.dictionaries(_keys, _values, max_size=6)


def _bodies() -> st.SearchStrategy[bytes]:
    """JSON objects, duplicated keys, truncations and non-objects: all with markers inside."""

    def duplicate(data: dict[str, Any]) -> bytes:
        text = json.dumps(data)
        return (text[:-1] + (", " if data else "") + f'"refresh_token": "{MINTED}"}}').encode()

    def truncate(data: dict[str, Any], cut: int) -> bytes:
        raw = json.dumps(data).encode()
        return raw[: cut % (len(raw) + 1)]

    return st.one_of(
        _objects.map(lambda d: json.dumps(d).encode()),
        _objects.map(duplicate),
        st.builds(truncate, _objects, st.integers(min_value=0)),
        st.lists(_values, max_size=3).map(lambda v: json.dumps(v).encode()),
    )


def _assert_clean(text: str) -> None:
    for marker in MARKERS:
        assert marker not in text, "a token from the body in an error message"


@settings(max_examples=500, deadline=None)
@given(_bodies())
@example(f'{{"access_token": "{MINTED}", "access_token": "{MINTED}"}}'.encode())
@example(f'{{"access_token": {{"{MINTED}": 1}}}}'.encode())
@example(f'{{"{MINTED}": "{MINTED}"'.encode())
def test_parse_grant_gives_a_grant_or_a_value_error_without_a_token(body: bytes) -> None:
    try:
        grant = parse_grant(body)
    except ValueError as exc:
        _assert_clean(str(exc))
        _assert_clean(repr(exc.args))
        return
    assert grant.access_token.reveal()
    _assert_clean(repr(grant))


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=300, max_value=599), _bodies())
@example(400, json.dumps({"error": "invalid_grant", "error_description": PRESENTED}).encode())
@example(400, json.dumps({"error": PRESENTED}).encode())
@example(401, json.dumps({"error_description": "x" * 190 + PRESENTED}).encode())
def test_error_answers_classify_without_the_presented_token(status: int, body: bytes) -> None:
    error = _oauth_error(status, body, (Secret(PRESENTED), Secret("cs_client_secret_value")))
    assert isinstance(error, EndpointError)
    for text in (str(error), error.failure.detail, repr(error.failure)):
        assert PRESENTED not in text and "cs_client_secret_value" not in text
    assert error.failure.reason in (
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "oauth_error",
        "http_error",
    )
