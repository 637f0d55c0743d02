"""The nouns: Secret never shows itself, token-set ids are safe to print, RFC 3339 times."""

from __future__ import annotations

import copy
import logging
import pickle
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refresherd.model import (
    MAX_ID_LENGTH,
    Attempt,
    Grant,
    Secret,
    State,
    TokenSet,
    rfc3339,
    validate_token_set_id,
)

VALUE = "rt-Zq8v-SECRET-value-3f1c"


# ---- Secret ----------------------------------------------------------------------------------


def renderings(secret: Secret) -> list[str]:
    """Every ordinary way a value ends up in text."""
    return [
        repr(secret),
        str(secret),
        format(secret),
        format(secret, ""),
        format(secret, ">80"),
        format(secret, "s"),
        f"{secret}",
        f"{secret!r}",
        f"{secret!s}",
        f"{secret!a}",
        f"{secret:<40}",
        f"{secret=}",
        "%s" % secret,  # noqa: UP031
        "%r" % secret,  # noqa: UP031
        "%a" % (secret,),  # noqa: UP031
        "{}".format(secret),  # noqa: UP032
        "{0!r}".format(secret),  # noqa: UP030, UP032
        str([secret]),
        repr({"token": secret}),
        str((secret,)),
        str(ValueError(secret)),
        repr(ValueError("refresh failed", secret)),
    ]


def test_secret_never_shows_its_value() -> None:
    secret = Secret(VALUE)
    for text in renderings(secret):
        assert VALUE not in text, text
        assert "SECRET" not in text, text
    assert repr(secret) == "Secret('**********')"
    assert str(secret) == "**********"


@settings(deadline=None)
@given(st.text(st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\x00"])))
def test_renderings_do_not_depend_on_the_value(value: str) -> None:
    # The strongest form of "never shows its value": the text is the same whatever the value.
    assert renderings(Secret(value)) == renderings(Secret("a different value"))


def test_secret_reveals_only_on_request() -> None:
    assert Secret(VALUE).reveal() == VALUE


def test_secret_in_a_log_record_stays_masked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("refresherd.test").info("token %s %r", Secret(VALUE), Secret(VALUE))
    assert VALUE not in caplog.text
    assert "**********" in caplog.text


def test_secret_wraps_only_str() -> None:
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Secret(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_cannot_be_pickled(protocol: int) -> None:
    with pytest.raises(TypeError) as info:
        pickle.dumps(Secret(VALUE), protocol=protocol)
    assert VALUE not in str(info.value)


def test_secret_cannot_be_copied_out() -> None:
    with pytest.raises(TypeError):
        copy.copy(Secret(VALUE))
    with pytest.raises(TypeError):
        copy.deepcopy(Secret(VALUE))


def test_secret_has_no_instance_dict() -> None:
    assert not hasattr(Secret(VALUE), "__dict__")


def test_secret_compares_by_value() -> None:
    assert Secret(VALUE) == Secret(VALUE)
    assert Secret(VALUE) != Secret(VALUE + "x")
    assert Secret("") == Secret("")
    assert Secret("ü") == Secret("ü")
    assert Secret("ü") != Secret("u")
    # Never equal to the bare string: comparing a secret with text is a bug, not a match.
    assert Secret(VALUE) != VALUE
    assert VALUE != Secret(VALUE)  # noqa: SIM300 (the reflected comparison)
    assert hash(Secret(VALUE)) == hash(Secret(VALUE))
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2


def test_secret_equality_never_raises_on_lone_surrogates() -> None:
    # json.loads('"\\ud800"') is a valid str that UTF-8 cannot encode
    assert Secret("\ud800") == Secret("\ud800")
    assert Secret("a\ud800") != Secret("a\udc00")
    assert Secret("\ud800") != Secret("x")
    assert hash(Secret("\ud800")) == hash(Secret("\ud800"))


any_text = st.text(
    st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00"])
)


@settings(deadline=None)
@given(any_text, any_text)
def test_secret_equality_matches_value_equality(a: str, b: str) -> None:
    assert (Secret(a) == Secret(b)) == (a == b)
    if a == b:
        assert hash(Secret(a)) == hash(Secret(b))


def test_secret_truthiness() -> None:
    assert Secret("x")
    assert not Secret("")


def test_dataclasses_holding_secrets_do_not_show_them() -> None:
    access, refresh, id_token = "AT-SECRET-1", "RT-SECRET-2", "IDT-SECRET-3"
    grant = Grant(
        access_token=Secret(access),
        token_type="Bearer",
        expires_in=3600.0,
        refresh_token=Secret(refresh),
        id_token=Secret(id_token),
    )
    token_set = TokenSet(
        id="customer-1",
        provider="visma",
        refresh_token=Secret(refresh),
        access_token=Secret(access),
        expires_at=1.0,
        state=State.ACTIVE,
        version=1,
        next_refresh_at=0.0,
        created_at=0.0,
        updated_at=0.0,
        attempt=Attempt(version=1, started_at=0.0, owner="o", sends=1),
    )
    for text in (repr(grant), str(grant), repr(token_set), str(token_set), f"{token_set}"):
        for value in (access, refresh, id_token):
            assert value not in text
    assert "customer-1" in repr(token_set)


# ---- token-set ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "customer-42", "tenant.1:user/7", "ÆØÅ-kunde", "x" * MAX_ID_LENGTH, "0"],
)
def test_valid_ids_pass_unchanged(value: str) -> None:
    assert validate_token_set_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * (MAX_ID_LENGTH + 1),
        "two words",
        " leading",
        "trailing ",
        "tab\there",
        "new\nline",
        "cr\r",
        "nul\x00",
        "del\x7f",
        "esc\x1b[31m",
        "nbsp\xa0x",
        "line\u2028sep",
        "zero\u200bwidth",
    ],
)
def test_invalid_ids_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        validate_token_set_id(value)


@settings(deadline=None)
@given(st.text(max_size=MAX_ID_LENGTH + 20))
def test_accepted_ids_are_printable_bounded_and_without_whitespace(value: str) -> None:
    try:
        validate_token_set_id(value)
    except ValueError:
        return
    assert 0 < len(value) <= MAX_ID_LENGTH
    assert value.isprintable()
    assert not any(ch.isspace() for ch in value)


# ---- rfc3339 ---------------------------------------------------------------------------------


def test_rfc3339() -> None:
    assert rfc3339(None) is None
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(0.0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1_700_000_000) == "2023-11-14T22:13:20Z"
    # Fractions are cut, not rounded: a time is never printed later than it is.
    assert rfc3339(1_700_000_000.999) == "2023-11-14T22:13:20Z"
    assert rfc3339(-1) == "1969-12-31T23:59:59Z"
    assert rfc3339(253402300799) == "9999-12-31T23:59:59Z"


@settings(deadline=None)
@given(st.floats(min_value=0, max_value=253402300799, allow_nan=False))
def test_rfc3339_round_trips_to_the_second(ts: float) -> None:
    text = rfc3339(ts)
    assert text is not None and text.endswith("Z") and len(text) == 20
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None and parsed.utcoffset() == UTC.utcoffset(None)
    assert 0 <= ts - parsed.timestamp() < 1
