"""Token input (``tokens add`` / ``tokens import``): validated, planned, and never echoed back."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refresherd.intake import (
    MAX_LINE_BYTES,
    InputError,
    iter_lines,
    parse_lines,
    parse_single,
    token_set_from_json,
)
from refresherd.model import Secret
from refresherd.settings import ScheduleConfig
from refresherd.store import NewTokenSet

NOW = 1_700_000_000.0
CFG = ScheduleConfig()
PROVIDERS = {"visma": object(), "okta": object()}
REFRESH = "RT-s3cr3t-refresh-value"
ACCESS = "AT-s3cr3t-access-value"


def build(data: object, *, token_set_id: str = "customer-1", rand: float = 0.0) -> NewTokenSet:
    return token_set_from_json(
        data, token_set_id=token_set_id, provider="visma", now=NOW, schedule=CFG, rand=rand
    )


def single(text: str, *, token_set_id: str = "customer-1") -> NewTokenSet:
    return parse_single(
        text, token_set_id=token_set_id, provider="visma", now=NOW, schedule=CFG, rand=0.0
    )


def rands() -> Iterator[float]:
    while True:
        yield 0.0


def lines(text: str, *, source: str = "tokens.jsonl") -> list[NewTokenSet]:
    return parse_lines(
        io.StringIO(text), source=source, providers=PROVIDERS, now=NOW, schedule=CFG, rand=rands()
    )


def jsonl(*objects: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


def assert_no_secret(text: str) -> None:
    assert "s3cr3t" not in text, text


# ---- token_set_from_json -----------------------------------------------------------------------


def test_a_full_token_response() -> None:
    new = build(
        {
            "access_token": ACCESS,
            "refresh_token": REFRESH,
            "expires_in": 3600,
            "token_type": "Bearer",
            "scope": "openid offline_access",
            "id_token": "eyJ-ignored",
            "something_else": [1, 2, 3],
        }
    )
    assert new.id == "customer-1" and new.provider == "visma"
    assert new.refresh_token == Secret(REFRESH)
    assert new.access_token == Secret(ACCESS)
    assert new.expires_at == NOW + 3600
    assert (new.token_type, new.scope) == ("Bearer", "openid offline_access")
    # planned like any 1 h token: 80 % of its lifetime (rand 0: no jitter)
    assert new.next_refresh_at == pytest.approx(NOW + 2880)
    assert_no_secret(repr(new))


def test_jitter_moves_the_plan_earlier() -> None:
    data = {"access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 3600}
    assert build(data, rand=0.5).next_refresh_at == pytest.approx(NOW + 2880 - 144)


def test_only_a_refresh_token_is_due_at_once() -> None:
    new = build({"refresh_token": REFRESH})
    assert new.access_token is None and new.expires_at is None
    assert new.next_refresh_at == NOW
    assert new.token_type is None and new.scope is None


def test_access_token_without_expiry_is_due_at_once() -> None:
    new = build({"refresh_token": REFRESH, "access_token": ACCESS})
    assert new.access_token == Secret(ACCESS)
    assert new.expires_at is None
    assert new.next_refresh_at == NOW


def test_expiry_without_access_token_is_due_at_once() -> None:
    new = build({"refresh_token": REFRESH, "expires_in": 3600})
    assert new.access_token is None and new.expires_at is None
    assert new.next_refresh_at == NOW


@pytest.mark.parametrize("value", [None, "", 0, 1.5, True, [], {}, ["x"]])
def test_refresh_token_is_required_and_a_string(value: object) -> None:
    data: dict[str, Any] = {"access_token": ACCESS, "expires_in": 60}
    if value is not None:
        data["refresh_token"] = value
    with pytest.raises(ValueError, match="refresh_token"):
        build(data)


@pytest.mark.parametrize("key", ["access_token", "token_type", "scope"])
@pytest.mark.parametrize("value", ["", 5, True, ["a"], {"a": 1}])
def test_optional_strings_must_be_non_empty_strings(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        build({"refresh_token": REFRESH, key: value})


def test_null_optional_fields_are_absent() -> None:
    new = build(
        {
            "refresh_token": REFRESH,
            "access_token": None,
            "token_type": None,
            "scope": None,
            "expires_in": None,
            "expires_at": None,
        }
    )
    assert new.access_token is None and new.next_refresh_at == NOW


@pytest.mark.parametrize("value", [3600, 3600.0, "3600", " 3600 ", "3600.0"])
def test_expires_in_as_number_or_numeric_string(value: object) -> None:
    new = build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_in": value})
    assert new.expires_at == NOW + 3600


def test_expires_in_zero_is_due_at_once() -> None:
    new = build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_in": 0})
    assert new.expires_at == NOW
    assert new.next_refresh_at == NOW


@pytest.mark.parametrize(
    "value",
    [-1, -0.001, "-60", "abc", "", True, False, [], {}, "1e400", "nan", "inf", 10**400, 1e300],
)
def test_bad_expires_in_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="expires_in"):
        build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_in": value})


def test_expires_in_wins_over_expires_at() -> None:
    new = build(
        {
            "refresh_token": REFRESH,
            "access_token": ACCESS,
            "expires_in": 60,
            "expires_at": NOW + 9999,
        }
    )
    assert new.expires_at == NOW + 60


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (NOW + 3600, NOW + 3600),
        (int(NOW) + 3600, NOW + 3600),
        (NOW + 3600.5, NOW + 3600.5),
        (str(int(NOW) + 3600), NOW + 3600),
        (f"{NOW + 3600.25}", NOW + 3600.25),
        ("2023-11-14T23:13:20Z", NOW + 3600),
        ("2023-11-14T23:13:20z", NOW + 3600),
        ("2023-11-14T23:13:20+00:00", NOW + 3600),
        ("2023-11-15T01:13:20+02:00", NOW + 3600),
        ("2023-11-14T21:13:20-02:00", NOW + 3600),
        ("2023-11-14T23:13:20.500Z", NOW + 3600.5),
        (" 2023-11-14T23:13:20Z ", NOW + 3600),
        ("2023-11-14 23:13:20Z", NOW + 3600),
    ],
)
def test_expires_at_unix_seconds_or_rfc3339(value: object, expected: float) -> None:
    new = build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_at": value})
    assert new.expires_at == pytest.approx(expected)
    # planned from the time left: 1 h (or a half second more) ahead
    assert NOW + 2592 <= new.next_refresh_at <= NOW + 2881


@pytest.mark.parametrize(
    "value",
    [
        "2023-11-14T23:13:20",  # no zone: ambiguous
        "2023-11-14",
        "tomorrow",
        "",
        "2023-13-40T00:00:00Z",
        [],
        {},
        True,
        10**400,
        "1e400",
    ],
)
def test_bad_expires_at_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="expires_at"):
        build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_at": value})


def test_expires_at_in_milliseconds_is_refused() -> None:
    # A common mistake: planned from it, the token would not be refreshed for 50,000 years.
    with pytest.raises(ValueError, match="expires_at"):
        build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_at": NOW * 1000})
    with pytest.raises(ValueError, match="expires_at"):
        build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_at": "9999-01-01T00Z"})
    with pytest.raises(ValueError, match="expires_in"):
        build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_in": 3600 * 1000 * 1e6})


def test_expires_at_in_the_past_is_due_at_once() -> None:
    new = build({"refresh_token": REFRESH, "access_token": ACCESS, "expires_at": NOW - 10})
    assert new.expires_at == NOW - 10
    assert new.next_refresh_at == NOW


@pytest.mark.parametrize("data", [None, [], "text", 5, True, [{"refresh_token": REFRESH}]])
def test_not_an_object(data: object) -> None:
    with pytest.raises(ValueError, match="object"):
        build(data)


@pytest.mark.parametrize("token_set_id", ["", "two words", "x" * 201, "tab\t"])
def test_token_set_id_is_validated(token_set_id: str) -> None:
    with pytest.raises(ValueError, match="id"):
        build({"refresh_token": REFRESH}, token_set_id=token_set_id)


@pytest.mark.parametrize("key", ["refresh_token", "access_token", "token_type", "scope"])
def test_lone_surrogates_are_refused(key: str) -> None:
    # valid JSON, a valid Python str, but not storable text: refused here, not in SQLite
    data = json.loads('{"refresh_token": "RT-s3cr3t", "%s": "x\\ud800y"}' % key)  # noqa: UP031
    with pytest.raises(ValueError, match=key) as info:
        build(data)
    assert_no_secret(str(info.value))
    assert "\ud800" not in str(info.value)


def test_errors_never_carry_token_values() -> None:
    cases: list[object] = [
        {"refresh_token": REFRESH, "access_token": ACCESS, "expires_in": REFRESH},
        {"refresh_token": REFRESH, "access_token": ACCESS, "expires_at": ACCESS},
        {"refresh_token": REFRESH, "access_token": ACCESS, "scope": 5},
        {"refresh_token": REFRESH + " ", "access_token": [ACCESS]},
        {"refresh_token": [REFRESH]},
    ]
    for data in cases:
        with pytest.raises(ValueError) as info:
            build(data)
        assert_no_secret(str(info.value))


# ---- parse_single ------------------------------------------------------------------------------


def test_parse_single() -> None:
    new = single(json.dumps({"refresh_token": REFRESH, "access_token": ACCESS, "expires_in": 60}))
    assert new.refresh_token == Secret(REFRESH) and new.expires_at == NOW + 60


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "{",
        '{"refresh_token": "RT-s3cr3t-refresh-value"',
        '{"refresh_token": "RT-s3cr3t-refresh-value",}',
        "refresh_token=RT-s3cr3t-refresh-value",
        '{"refresh_token": "RT-s3cr3t-refresh-value"} trailing',
        "[" * 100_000,
        '{"a":' * 100_000,
    ],
)
def test_parse_single_bad_json(text: str) -> None:
    with pytest.raises(InputError) as info:
        single(text)
    assert info.value.where == "stdin"
    assert str(info.value).startswith("stdin: ")
    assert_no_secret(str(info.value))


def test_parse_single_bad_fields() -> None:
    with pytest.raises(InputError) as info:
        single(json.dumps({"refresh_token": REFRESH, "expires_in": -5}))
    assert info.value.where == "stdin"
    assert "expires_in" in str(info.value)
    assert_no_secret(str(info.value))
    with pytest.raises(InputError, match="id"):
        single(json.dumps({"refresh_token": REFRESH}), token_set_id="bad id")


# ---- parse_lines -------------------------------------------------------------------------------


def line(token_set_id: str, provider: str = "visma", **fields: object) -> dict[str, object]:
    return {"id": token_set_id, "provider": provider, "refresh_token": REFRESH, **fields}


def test_parse_lines() -> None:
    text = jsonl(
        line("a", access_token=ACCESS, expires_in=3600),
        line("b", "okta"),
        line("c", expires_at="2023-11-14T23:13:20Z", access_token=ACCESS),
    )
    items = lines(text)
    assert [(n.id, n.provider) for n in items] == [("a", "visma"), ("b", "okta"), ("c", "visma")]
    assert items[0].next_refresh_at == pytest.approx(NOW + 2880)
    assert items[1].next_refresh_at == NOW
    assert items[2].expires_at == NOW + 3600


def test_each_line_gets_its_own_rand() -> None:
    draws = iter([0.0, 0.5, 0.999])
    items = parse_lines(
        io.StringIO(jsonl(*(line(x, access_token=ACCESS, expires_in=3600) for x in "abc"))),
        source="s",
        providers=PROVIDERS,
        now=NOW,
        schedule=CFG,
        rand=draws,
    )
    plans = [n.next_refresh_at for n in items]
    assert plans == sorted(plans, reverse=True) and len(set(plans)) == 3


def test_blank_lines_are_skipped_and_still_counted() -> None:
    text = "\n   \n" + json.dumps(line("a")) + "\n\t\n\n" + json.dumps({"id": "b"}) + "\n"
    with pytest.raises(InputError) as info:
        lines(text)
    assert info.value.where == "tokens.jsonl:6"
    assert lines("\n\n" + json.dumps(line("a")) + "\n\n")[0].id == "a"
    assert lines("") == []
    assert lines("\n \n") == []


def test_last_line_without_newline() -> None:
    assert [n.id for n in lines(json.dumps(line("a")) + "\n" + json.dumps(line("b")))] == ["a", "b"]


def test_crlf_lines() -> None:
    text = json.dumps(line("a")) + "\r\n" + json.dumps(line("b")) + "\r\n"
    assert [n.id for n in lines(text)] == ["a", "b"]


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "object"),
        ('"a string"', "object"),
        ("42", "object"),
        ("null", "object"),
        (json.dumps({"provider": "visma", "refresh_token": REFRESH}), "id"),
        (json.dumps({"id": 5, "provider": "visma", "refresh_token": REFRESH}), "id"),
        (json.dumps({"id": "x", "refresh_token": REFRESH}), "provider"),
        (json.dumps({"id": "x", "provider": ["visma"], "refresh_token": REFRESH}), "provider"),
        (json.dumps({"id": "x", "provider": "google", "refresh_token": REFRESH}), "google"),
        (json.dumps({"id": "x", "provider": "visma"}), "refresh_token"),
        (json.dumps(line("x", expires_in=-1)), "expires_in"),
        (json.dumps(line("bad id")), "id"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_a_bad_line_is_reported_with_its_number(bad: str, fragment: str) -> None:
    text = jsonl(line("a"), line("b")) + bad + "\n" + jsonl(line("c"))
    with pytest.raises(InputError) as info:
        lines(text, source="import.jsonl")
    assert info.value.where == "import.jsonl:3"
    message = str(info.value)
    assert message.startswith("import.jsonl:3: ")
    assert fragment in message
    assert_no_secret(message)


@pytest.mark.parametrize("newline", ["\n", "\r\n", ""])
def test_a_cut_short_line_is_reported_at_its_end(newline: str) -> None:
    # With its line end, json.loads would put the mistake at line 2, column 1 (past it).
    cut = json.dumps(line("b", access_token=ACCESS))[:-1]
    with pytest.raises(InputError) as info:
        lines(jsonl(line("a")) + cut + newline)
    assert str(info.value) == (
        f"tokens.jsonl:2: not valid JSON: Expecting ',' delimiter at column {len(cut) + 1}; "
        "the line ends there (cut short?)"
    )
    cut_in_a_string = cut[: cut.index("AT-") + 2]
    with pytest.raises(InputError) as info:
        lines(cut_in_a_string + newline)
    assert str(info.value) == (
        "tokens.jsonl:1: not valid JSON: Unterminated string starting at column "
        f"{len(cut_in_a_string) - 2}; the line ends inside it (cut short?)"
    )


def test_a_mistake_inside_a_line_is_reported_at_its_column() -> None:
    with pytest.raises(InputError) as info:
        lines('  {"id": "a", "provider" "visma"}\n')
    assert str(info.value) == (
        "tokens.jsonl:1: not valid JSON: Expecting ':' delimiter at column 26"
    )


def test_a_single_response_cut_short_is_reported_on_its_last_line() -> None:
    text = '{\n  "refresh_token": "' + REFRESH + '",\n  "expires_in": 3600\n'
    with pytest.raises(InputError) as info:
        single(text)
    assert str(info.value) == (
        "stdin: not valid JSON: Expecting ',' delimiter at line 3 column 21; "
        "the input ends there (cut short?)"
    )
    assert_no_secret(str(info.value))


def test_lines_read_as_bytes_are_utf8_and_a_bad_byte_names_its_line() -> None:
    good = [(json.dumps(line(x)) + "\n").encode() for x in ("a", "é")]
    items = parse_lines_from(good)
    assert [n.id for n in items] == ["a", "é"]
    bad = [good[0], b'{"id": "x\xff", "provider": "visma"}\n']
    with pytest.raises(InputError) as info:
        parse_lines_from(bad)
    assert str(info.value) == "import:2: not UTF-8 text: byte 10 of the line is invalid"


def parse_lines_from(raw: list[bytes]) -> list[NewTokenSet]:
    return [
        item
        for _, item in iter_lines(
            raw, source="import", providers=PROVIDERS, now=NOW, schedule=CFG, rand=rands()
        )
    ]


def test_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(InputError) as info:
        lines(jsonl(line("a", "google")))
    assert "'google'" in str(info.value) and "okta, visma" in str(info.value)


def test_duplicate_ids_in_the_input() -> None:
    text = jsonl(line("a"), line("b"), line("a", "okta"))
    with pytest.raises(InputError) as info:
        lines(text)
    assert info.value.where == "tokens.jsonl:3"
    assert "'a'" in str(info.value) and "twice" in str(info.value)


def test_an_overlong_line_is_refused_without_parsing() -> None:
    huge = json.dumps(line("a", scope="x" * (MAX_LINE_BYTES + 10)))
    with pytest.raises(InputError) as info:
        lines(jsonl(line("z")) + huge + "\n")
    assert info.value.where == "tokens.jsonl:2"
    assert "longer" in str(info.value)


def test_input_errors_are_value_errors() -> None:
    # callers that only know ValueError (argparse-style error paths) still catch them
    assert issubclass(InputError, ValueError)


# ---- hostile input ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**320)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(
        st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udc00"]), max_size=40
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = (
    json_values
    | st.sampled_from(
        [
            "2023-11-14T23:13:20Z",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-23:59",
            "1e400",
            "-1",
            "-",
            ".",
            "-.",
            "١٢٣",
            "²",
            " 12 ",
            "12.5.5",
            "NaN",
            REFRESH,
        ]
    )
    | st.floats()
    | st.integers(min_value=-(10**400), max_value=10**400)
)
token_fields = st.dictionaries(
    st.sampled_from(
        ["refresh_token", "access_token", "expires_in", "expires_at", "token_type", "scope", "x"]
    ),
    field_values,
)


@settings(deadline=None, max_examples=300)
@given(data=json_values | token_fields, rand=st.floats(min_value=0.0, max_value=1.0))
def test_arbitrary_json_raises_only_value_error(data: object, rand: float) -> None:
    try:
        new = build(data, rand=min(rand, 0.999999))
    except ValueError as exc:
        assert_no_secret(str(exc))
        return
    assert isinstance(new.refresh_token, Secret) and new.refresh_token.reveal()
    assert math.isfinite(new.next_refresh_at)
    assert new.next_refresh_at >= NOW
    if new.expires_at is not None:
        assert math.isfinite(new.expires_at)
        assert new.next_refresh_at <= max(new.expires_at, NOW)


@settings(deadline=None, max_examples=200)
@given(st.lists(st.text(max_size=200) | token_fields.map(json.dumps), max_size=5))
def test_arbitrary_lines_raise_only_input_error(raw_lines: list[str]) -> None:
    text = "\n".join(s.replace("\n", " ") for s in raw_lines)
    try:
        items = lines(text)
    except InputError as exc:
        assert exc.where.startswith("tokens.jsonl:")
        number = int(exc.where.rsplit(":", 1)[1])
        assert 1 <= number <= max(len(raw_lines), 1)
        return
    assert len({n.id for n in items}) == len(items)


@settings(deadline=None, max_examples=200)
@given(st.text(max_size=300))
def test_arbitrary_text_to_parse_single_raises_only_input_error(text: str) -> None:
    try:
        single(text)
    except InputError as exc:
        assert exc.where == "stdin"
