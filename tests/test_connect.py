"""refresherd.connect, the pure decisions of connecting a customer, and its configuration.

No I/O: links, return addresses and callbacks are judged from values (tests/test_connect_api.py
runs them through a real daemon, tests/test_connect_browser.py through a real browser).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refresherd.config import ConfigError, load_config
from refresherd.connect import (
    CallbackAnswer,
    Exchange,
    Finish,
    LinkRefused,
    Outcome,
    PendingConnection,
    Refusal,
    Refused,
    callback_path,
    code_challenge,
    connect_refusal,
    decide_callback,
    exchange_failure_outcome,
    finish_url,
    link_request,
    link_request_from_json,
    lookup_digest,
    plan_link,
    read_callback,
    reconnect_hint,
    return_destination,
    return_url_allowed,
    state_digest,
)
from refresherd.model import FailureKind, Secret, State, TokenSet
from refresherd.settings import ConnectConfig, ProviderConfig

REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0
STATE = "st-" + "A" * 40
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RETURN = "https://app.example.com/connected"


def provider(**connect: object) -> ProviderConfig:
    settings: dict[str, object] = {
        "redirect_uri": "https://refresherd.example.com/connect/visma/callback",
        "return_urls": (RETURN, "http://127.0.0.1:8080/back"),
    }
    settings.update(connect)
    return ProviderConfig(
        name="visma",
        token_url="https://connect.visma.com/connect/token",
        client_id="isv_example",
        client_secret=Secret("cs"),
        authorization_url="https://connect.visma.com/connect/authorize",
        connect=ConnectConfig(**settings),  # type: ignore[arg-type]
    )


def token_set(state: State = State.INVALIDATED, provider: str = "visma") -> TokenSet:
    return TokenSet(
        id="customer-1",
        provider=provider,
        refresh_token=Secret("rt"),
        access_token=None,
        expires_at=None,
        state=state,
        version=7,
        next_refresh_at=NOW,
        created_at=NOW - 86400,
        updated_at=NOW,
    )


def query(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


# ---- the link -----------------------------------------------------------------------------------


def test_the_pkce_challenge_is_rfc_7636_s256() -> None:
    # RFC 7636, appendix B.
    assert code_challenge(VERIFIER) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_a_link_carries_exactly_the_authorization_request() -> None:
    p = provider(scope="openid offline_access", params=(("ui_locales", "da"),))
    request = link_request(
        "customer-1", "visma", prompt="login", params={"login_hint": "a@b.example"}
    )
    link = plan_link(p, request, current=None, state=STATE, verifier=VERIFIER, now=NOW)
    parts = urlsplit(link.url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "connect.visma.com",
        "/connect/authorize",
    )
    assert query(link.url) == [
        ("response_type", "code"),
        ("client_id", "isv_example"),
        ("redirect_uri", "https://refresherd.example.com/connect/visma/callback"),
        ("scope", "openid offline_access"),
        ("state", STATE),
        ("code_challenge", code_challenge(VERIFIER)),
        ("code_challenge_method", "S256"),
        ("prompt", "login"),
        ("ui_locales", "da"),
        ("login_hint", "a@b.example"),
    ]
    # The verifier is the secret half of PKCE: kept, never in the link.
    assert VERIFIER not in link.url
    pending = link.pending
    assert pending.digest == hashlib.sha256(STATE.encode()).hexdigest() == state_digest(STATE)
    assert pending.code_verifier == Secret(VERIFIER)
    assert (pending.provider, pending.token_set_id, pending.return_url) == (
        "visma",
        "customer-1",
        RETURN,
    )
    assert (pending.created_at, pending.expires_at) == (NOW, NOW + 600)
    assert not link.reconnect


def test_form_post_no_pkce_a_tenant_query_and_the_scope_s_precedence() -> None:
    p = provider(response_mode="form_post", pkce=False, link_lifetime=60.0)
    p = ProviderConfig(
        **{
            **{f: getattr(p, f) for f in p.__dataclass_fields__},
            "authorization_url": "https://login.example.com/authorize?p=b2c_1_signin",
            "scope": "refresh-scope",
        }
    )
    link = plan_link(
        p,
        link_request("c", "visma", scope="asked"),
        current=None,
        state=STATE,
        verifier=VERIFIER,
        now=NOW,
    )
    pairs = dict(query(link.url))
    assert query(link.url)[0] == ("p", "b2c_1_signin")
    assert pairs["response_mode"] == "form_post" and pairs["scope"] == "asked"
    assert "code_challenge" not in pairs and link.pending.code_verifier is None
    assert link.pending.expires_at == NOW + 60
    # Without a scope in the request, the provider's authorization_scope, then its scope.
    plain = plan_link(p, link_request("c", "visma"), current=None, state=STATE, verifier="v", now=0)
    assert dict(query(plain.url))["scope"] == "refresh-scope"


def test_only_a_new_or_an_invalidated_set_of_that_provider_can_be_connected() -> None:
    assert connect_refusal(None, "visma") is None
    assert connect_refusal(token_set(), "visma") is None
    for current in (token_set(State.ACTIVE), token_set(State.FAILING), token_set(provider="x")):
        refusal = connect_refusal(current, "visma")
        assert refusal is not None and refusal.code == "exists", current
    link = plan_link(
        provider(),
        link_request("customer-1", "visma"),
        current=token_set(),
        state=STATE,
        verifier=VERIFIER,
        now=NOW,
    )
    assert link.reconnect


def test_a_provider_without_connect_settings_is_refused() -> None:
    p = provider()
    bare = ProviderConfig(name="x", token_url="https://t", client_id="c", client_secret=Secret("s"))
    for unset in (bare, ProviderConfig(**{**_fields(p), "authorization_url": None})):
        with pytest.raises(LinkRefused) as info:
            plan_link(unset, link_request("c", "x"), current=None, state=STATE, verifier="v", now=0)
        assert info.value.code == "connect_unsupported"


def _fields(p: ProviderConfig) -> dict[str, object]:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({}, "provider"),
        ({"provider": ""}, "provider"),
        ({"provider": "visma", "bogus": 1}, "bogus"),
        ({"provider": "visma", "scope": 3}, "scope"),
        ({"provider": "visma", "prompt": "login please"}, "prompt"),
        ({"provider": "visma", "prompt": "login login"}, "prompt"),
        ({"provider": "visma", "params": ["a"]}, "params"),
        ({"provider": "visma", "params": {"state": "mine"}}, "params.state"),
        ({"provider": "visma", "params": {"redirect_uri": "https://evil"}}, "params.redirect_uri"),
        ({"provider": "visma", "params": {"x": 1}}, "params.x"),
        ({"provider": "visma", "params": {"x": "a\nb"}}, "params.x"),
        ({"provider": "visma", "return_url": "x" * 3000}, "return_url"),
    ],
)
def test_a_bad_link_request_names_what_is_wrong(body: dict[str, object], names: str) -> None:
    with pytest.raises(LinkRefused) as info:
        link_request_from_json(body, token_set_id="c")
    assert info.value.code == "invalid_request" and names in info.value.message


def test_a_bad_token_set_id_is_refused() -> None:
    with pytest.raises(LinkRefused) as info:
        link_request("has space", "visma")
    assert "whitespace" in info.value.message


# ---- the return address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        RETURN,
        RETURN + "?customer=42",
        "HTTPS://APP.EXAMPLE.COM/connected",
        "https://app.example.com:443/connected",
        "http://127.0.0.1:8080/back?x=1&y=2",
    ],
)
def test_an_allow_listed_return_address(url: str) -> None:
    assert return_url_allowed(url, provider().connect.return_urls)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/connected",
        "https://app.example.com.evil.example/connected",
        "https://app.example.com@evil.example/connected",
        "https://evil.example\\@app.example.com/connected",
        "http://app.example.com/connected",
        "https://app.example.com:8443/connected",
        "https://app.example.com/connected/../admin",
        "https://app.example.com/connected/more",
        "https://app.example.com/connectedx",
        "https://app.example.com/",
        "https://app.example.com/connected#frag",
        "//evil.example/connected",
        "/connected",
        "javascript:alert(1)//app.example.com/connected",
        "https://app.example.com/connected\n",
        "http://127.0.0.1:8081/back",
        "",
    ],
)
def test_any_other_return_address_is_refused(url: str) -> None:
    connect = provider().connect
    assert connect is not None
    assert not return_url_allowed(url, connect.return_urls)
    with pytest.raises(LinkRefused) as info:
        link_request_from_json({"provider": "visma", "return_url": url or None}, token_set_id="c")
        plan_link(
            provider(),
            link_request("c", "visma", return_url=url),
            current=None,
            state=STATE,
            verifier=VERIFIER,
            now=NOW,
        )
    assert "return_url" in info.value.message


@given(st.text(max_size=60))
def test_no_address_of_another_origin_or_path_is_ever_allowed(tail: str) -> None:
    for url in (RETURN + tail, "https://app.example.com" + tail, tail):
        if return_url_allowed(url, [RETURN]):
            parts = urlsplit(url)
            assert (parts.scheme.lower(), parts.hostname, parts.port or 443, parts.path) == (
                "https",
                "app.example.com",
                443,
                "/connected",
            )
            assert not parts.fragment and "@" not in parts.netloc


def test_the_default_return_address_and_none_configured() -> None:
    link = plan_link(
        provider(), link_request("c", "visma"), current=None, state=STATE, verifier="v", now=0
    )
    assert link.pending.return_url == RETURN
    bare = provider(return_urls=())
    link = plan_link(
        bare, link_request("c", "visma"), current=None, state=STATE, verifier="v", now=0
    )
    assert link.pending.return_url is None
    with pytest.raises(LinkRefused):
        plan_link(
            bare,
            link_request("c", "visma", return_url=RETURN),
            current=None,
            state=STATE,
            verifier="v",
            now=0,
        )


def test_a_return_address_dropped_from_the_config_is_not_used() -> None:
    pending = plan_link(
        provider(), link_request("c", "visma"), current=None, state=STATE, verifier="v", now=0
    ).pending
    assert return_destination(pending, provider()) == RETURN
    assert return_destination(pending, provider(return_urls=("https://other.example/x",))) is None


def test_the_return_url_carries_the_outcome_and_the_id_only() -> None:
    url = finish_url(RETURN + "?customer=42&outcome=forged", Outcome.CONNECTED, "customer-1")
    assert query(url) == [("customer", "42"), ("outcome", "connected"), ("token_set", "customer-1")]
    assert urlsplit(url).path == "/connected"


# ---- the callback -------------------------------------------------------------------------------


def pending(**changes: object) -> PendingConnection:
    values: dict[str, object] = {
        "digest": state_digest(STATE),
        "provider": "visma",
        "token_set_id": "customer-1",
        "redirect_uri": "https://refresherd.example.com/connect/visma/callback",
        "return_url": RETURN,
        "code_verifier": Secret(VERIFIER),
        "created_at": NOW,
        "expires_at": NOW + 600,
    }
    values.update(changes)
    return PendingConnection(**values)  # type: ignore[arg-type]


def answer(**params: str) -> CallbackAnswer:
    read = read_callback(list({"state": STATE, **params}.items()))
    assert isinstance(read, CallbackAnswer)
    return read


def test_reading_a_callback() -> None:
    assert read_callback([("code", "c")]) == Refused(Refusal.MISSING_STATE)
    assert read_callback([("state", "")]) == Refused(Refusal.MISSING_STATE)
    for name in ("state", "code", "error", "iss"):
        pairs = [("state", STATE), ("code", "c"), (name, "x"), (name, "again")]
        assert read_callback(pairs) == Refused(Refusal.DUPLICATE_PARAMETER), name
    read = answer(code="the-code", iss="https://idp", session_state="ignored")
    assert read.code == Secret("the-code") and read.state == Secret(STATE)
    assert read.issuer == "https://idp" and read.error is None
    assert "the-code" not in repr(read) and STATE not in repr(read)
    assert lookup_digest(read) == state_digest(STATE)
    assert lookup_digest(answer(state="x" * 600)) is None


def test_deciding_a_callback() -> None:
    p = provider()
    decide = decide_callback
    code = answer(code="the-code")
    assert decide(code, None, provider=p, now=NOW) == Refused(Refusal.UNKNOWN_STATE)
    assert decide(code, pending(provider="google"), provider=p, now=NOW) == Refused(
        Refusal.WRONG_PROVIDER
    )
    expired = decide(code, pending(), provider=p, now=NOW + 600)
    assert isinstance(expired, Finish) and expired.outcome is Outcome.EXPIRED
    assert decide(code, pending(), provider=p, now=NOW + 599.9) == Exchange(
        Secret("the-code"),
        "https://refresherd.example.com/connect/visma/callback",
        Secret(VERIFIER),
    )
    denied = decide(answer(error="access_denied"), pending(), provider=p, now=NOW)
    assert isinstance(denied, Finish) and denied.outcome is Outcome.ACCESS_DENIED
    scoped = decide(answer(error="invalid_scope"), pending(), provider=p, now=NOW)
    assert isinstance(scoped, Finish) and scoped.outcome is Outcome.IDP_ERROR
    assert "invalid_scope" in scoped.detail
    made_up = decide(answer(error="<script>"), pending(), provider=p, now=NOW)
    assert isinstance(made_up, Finish) and "<script>" not in made_up.detail
    nothing = decide(answer(), pending(), provider=p, now=NOW)
    assert isinstance(nothing, Finish) and nothing.outcome is Outcome.INVALID_CALLBACK
    # RFC 9207: a provider known by its issuer refuses an answer naming another one.
    with_issuer = ProviderConfig(**{**_fields(p), "issuer": "https://idp.example"})
    mixed = decide(answer(code="c", iss="https://evil"), pending(), provider=with_issuer, now=NOW)
    assert isinstance(mixed, Finish) and mixed.outcome is Outcome.INVALID_CALLBACK
    same = decide(
        answer(code="c", iss="https://idp.example"), pending(), provider=with_issuer, now=NOW
    )
    assert isinstance(same, Exchange)


def test_a_failed_exchange_s_outcome() -> None:
    assert exchange_failure_outcome(FailureKind.INVALID_GRANT) is Outcome.EXCHANGE_FAILED
    assert exchange_failure_outcome(FailureKind.OAUTH_ERROR) is Outcome.EXCHANGE_FAILED
    for kind in (
        FailureKind.NOT_SENT,
        FailureKind.AMBIGUOUS,
        FailureKind.RATE_LIMITED,
        FailureKind.CLIENT_REJECTED,
    ):
        assert exchange_failure_outcome(kind) is Outcome.PROVIDER_UNAVAILABLE


def test_the_way_back_for_an_invalidated_set() -> None:
    hint = reconnect_hint("customer 1;x", provider())
    assert hint == {
        "method": "POST",
        "path": "/v1/tokens/customer%201%3Bx/connect",
        "provider": "visma",
        "command": "refresherd connect 'customer 1;x' --provider visma",
    }
    bare = ProviderConfig(name="x", token_url="https://t", client_id="c", client_secret=Secret("s"))
    assert reconnect_hint("c", bare) is None and reconnect_hint("c", None) is None
    assert callback_path("visma") == "/connect/visma/callback"


# ---- configuration ------------------------------------------------------------------------------

CONFIG = """\
[daemon]
database = "tokens.db"

[providers.visma]
preset = "visma-connect"
client_id = "isv_example"
client_secret = "s3cr3t"
"""


def load(tmp_path: Path, extra: str) -> ProviderConfig:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG + extra, encoding="utf-8")
    return load_config(path, env={}).providers["visma"]


def error(tmp_path: Path, extra: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    return info.value


def test_the_visma_preset_connects_with_form_post(tmp_path: Path) -> None:
    p = load(tmp_path, "")
    assert p.authorization_url == "https://connect.visma.com/connect/authorize"
    assert p.connect is None  # no redirect_uri: no links
    p = load(
        tmp_path,
        'redirect_uri = "https://rd.example.com/connect/visma/callback"\n'
        'return_urls = ["https://app.example.com/connected"]\n'
        'authorization_scope = "openid offline_access"\n'
        'link_lifetime = "5m"\n',
    )
    assert p.connect == ConnectConfig(
        redirect_uri="https://rd.example.com/connect/visma/callback",
        return_urls=("https://app.example.com/connected",),
        response_mode="form_post",
        pkce=True,
        scope="openid offline_access",
        link_lifetime=300.0,
    )


def test_google_s_preset_asks_for_offline_access(tmp_path: Path) -> None:
    google = CONFIG.replace("visma-connect", "google")
    redirect = 'redirect_uri = "https://rd.example.com/connect/visma/callback"\n'
    path = tmp_path / "config.toml"
    path.write_text(google + redirect, encoding="utf-8")
    p = load_config(path, env={}).providers["visma"]
    assert p.authorization_url == "https://accounts.google.com/o/oauth2/v2/auth"
    assert p.connect is not None and p.connect.params == (("access_type", "offline"),)
    # A table of one's own replaces the preset's.
    path.write_text(google + redirect + 'authorization_params = { hd = "example.com" }\n')
    p = load_config(path, env={}).providers["visma"]
    assert p.connect is not None and p.connect.params == (("hd", "example.com"),)


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ('redirect_uri = "http://rd.example.com/cb"\n', "redirect_uri", "loopback"),
        ('redirect_uri = "https://rd.example.com/cb?x=1"\n', "redirect_uri", "?query"),
        (
            'redirect_uri = "https://rd.example.com/connect/visma/callback"\n'
            'return_urls = ["https://app.example.com/#x"]\n',
            "return_urls[0]",
            "#fragment",
        ),
        (
            'redirect_uri = "https://rd.example.com/connect/visma/callback"\n'
            'return_urls = "https://app.example.com/"\n',
            "return_urls",
            "array",
        ),
        (
            'redirect_uri = "https://rd.example.com/connect/visma/callback"\n'
            'response_mode = "fragment"\n',
            "response_mode",
            "form_post",
        ),
        (
            'redirect_uri = "https://rd.example.com/connect/visma/callback"\n'
            'authorization_params = { state = "x" }\n',
            "authorization_params",
            "set by refresherd",
        ),
        (
            'redirect_uri = "https://rd.example.com/connect/visma/callback"\n'
            'link_lifetime = "2d"\n',
            "link_lifetime",
            "from 1s to 1d",
        ),
        ('authorization_url = "ftp://x/authorize"\n', "authorization_url", "https"),
    ],
)
def test_connect_settings_are_checked(tmp_path: Path, extra: str, key: str, expected: str) -> None:
    exc = error(tmp_path, extra)
    assert exc.key == f"providers.visma.{key}", str(exc)
    assert expected in exc.message, exc.message
    assert "s3cr3t" not in str(exc)


def test_a_redirect_uri_needs_an_authorization_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        CONFIG.replace('preset = "visma-connect"', 'token_url = "https://idp.example/token"')
        + 'redirect_uri = "https://rd.example.com/connect/visma/callback"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == "providers.visma.redirect_uri"
    assert "authorization endpoint" in info.value.message


def test_a_redirect_uri_the_callback_route_does_not_end_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG + 'redirect_uri = "https://rd.example.com/oauth/visma"\n')
    config = load_config(path, env={})
    assert any("/connect/visma/callback" in w for w in config.warnings), config.warnings


def test_the_example_config_shows_every_connect_key() -> None:
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    for key in (
        "authorization_url",
        "redirect_uri",
        "return_urls",
        "response_mode",
        "pkce",
        "authorization_scope",
        "authorization_params",
        "link_lifetime",
    ):
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), key


def test_no_secret_shows_in_a_repr() -> None:
    link = plan_link(
        provider(), link_request("c", "visma"), current=None, state=STATE, verifier=VERIFIER, now=0
    )
    exchange = decide_callback(
        answer(code="the-code-value"), link.pending, provider=provider(), now=0
    )
    for value in (link, link.pending, answer(code="the-code-value"), exchange):
        text = repr(value)
        assert STATE not in text and VERIFIER not in text and "the-code-value" not in text, text


def test_every_connect_mistake_is_reported_in_one_run(tmp_path: Path) -> None:
    from refresherd.config import ConfigProblems

    exc = error(
        tmp_path,
        'redirect_uri = "https://rd.example.com/connect/visma/callback?x=1"\n'
        'return_urls = ["https://app.example.com/ok", "https://app.example.com/#x"]\n'
        'response_mode = "fragment"\n'
        'authorization_params = { client_id = "x" }\n'
        'link_lifetime = "0s"\n',
    )
    assert isinstance(exc, ConfigProblems)
    assert [p.key for p in exc.problems] == [
        f"providers.visma.{key}"
        for key in (
            "redirect_uri",
            "return_urls[1]",
            "authorization_params",
            "response_mode",
            "link_lifetime",
        )
    ]
