"""Provider presets: each parses with the fewest keys; explicit keys win; unknown names help."""

from __future__ import annotations

from pathlib import Path

import pytest

from refresherd.config import ConfigError, parse_config
from refresherd.model import AuthMethod, RefreshTokenUsage
from refresherd.presets import PRESETS, apply_preset
from refresherd.settings import ProviderConfig

ENV = {"SECRET": "s3cr3t-value"}


def provider(body: str, name: str = "p") -> ProviderConfig:
    text = f"""
[daemon]
database = "tokens.db"

[providers.{name}]
client_id = "client"
client_secret_env = "SECRET"
{body}
"""
    config = parse_config(text, source="test.toml", base_dir=Path("/tmp"), env=ENV)
    return config.providers[name]


def error(body: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        provider(body)
    return info.value


def test_visma_connect_preset() -> None:
    p = provider('preset = "visma-connect"')
    assert p.token_url == "https://connect.visma.com/connect/token"
    assert p.auth_method is AuthMethod.CLIENT_SECRET_POST
    assert p.refresh_token_usage is RefreshTokenUsage.ONE_TIME
    # Within Visma Connect's configurable 5 to 60 s.
    assert 5.0 <= p.grace_period <= 60.0
    assert p.issuer is None
    assert p.preset == "visma-connect"


def test_google_preset() -> None:
    p = provider('preset = "google"')
    assert p.token_url == "https://oauth2.googleapis.com/token"
    assert p.refresh_token_usage is RefreshTokenUsage.REUSE


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_with_the_minimum(name: str) -> None:
    preset = PRESETS[name]
    body = f'preset = "{name}"'
    if preset.issuer_example is not None:
        body += f'\nissuer = "{preset.issuer_example}"'
    p = provider(body)
    assert p.auth_method.value == preset.values["auth_method"]
    assert p.refresh_token_usage.value == preset.values["refresh_token_usage"]
    if preset.issuer_example is None:
        assert p.token_url == preset.values["token_url"]
        assert p.issuer is None
    else:
        assert p.token_url == ""
        assert p.issuer == preset.issuer_example


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.issuer_example))
def test_tenant_presets_need_issuer_or_token_url(name: str) -> None:
    exc = error(f'preset = "{name}"')
    assert exc.key == "providers.p.token_url"
    assert f'preset "{name}" needs issuer = "{PRESETS[name].issuer_example}"' in exc.message
    assert "token_url" in exc.message
    # A token_url instead of the issuer is enough.
    p = provider(f'preset = "{name}"\ntoken_url = "https://idp.example.com/token"')
    assert p.token_url == "https://idp.example.com/token"


def test_explicit_keys_override_the_preset() -> None:
    p = provider(
        """preset = "visma-connect"
token_url = "https://connect.test.example/connect/token"
auth_method = "client_secret_basic"
refresh_token_usage = "reuse"
grace_period = "45s"
refresh_token_lifetime = "365d"
"""
    )
    assert p.token_url == "https://connect.test.example/connect/token"
    assert p.auth_method is AuthMethod.CLIENT_SECRET_BASIC
    assert p.refresh_token_usage is RefreshTokenUsage.REUSE
    assert p.grace_period == 45.0
    assert p.refresh_token_lifetime == 365 * 86400.0


def test_an_explicit_issuer_replaces_a_preset_token_url() -> None:
    p = provider('preset = "google"\nissuer = "https://accounts.google.com"')
    assert p.token_url == ""
    assert p.issuer == "https://accounts.google.com"


def test_unknown_preset_suggests_the_closest() -> None:
    exc = error('preset = "visma"')
    assert exc.key == "providers.p.preset"
    assert 'did you mean "visma-connect"?' in exc.message
    for name in PRESETS:
        assert f'"{name}"' in exc.message


def test_unknown_preset_without_a_close_match_lists_the_known() -> None:
    exc = error('preset = "zzzzzz"')
    assert "did you mean" not in exc.message
    assert '"okta"' in exc.message


def test_preset_values_are_validated_like_explicit_ones() -> None:
    # A bad explicit value over a preset is reported under its own key.
    exc = error('preset = "okta"\nissuer = "https://o.example.com"\ngrace_period = "forever"')
    assert exc.key == "providers.p.grace_period"


def test_token_url_and_issuer_together_are_refused() -> None:
    exc = error('token_url = "https://a.example/token"\nissuer = "https://a.example"')
    assert exc.key == "providers.p"
    assert "not both" in exc.message


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        ("http://idp.example.com", "plain http is allowed only for loopback"),
        ("https://idp.example.com/#x", "#fragment"),
        ("https://idp.example.com/?tenant=1", "?query"),
        ("https://user:pw@idp.example.com", "without a user name"),
    ],
)
def test_issuer_checked_like_token_url(issuer: str, expected: str) -> None:
    exc = error(f'issuer = "{issuer}"')
    assert exc.key == "providers.p.issuer"
    assert expected in exc.message


def test_loopback_http_issuer_accepted() -> None:
    assert provider('issuer = "http://127.0.0.1:8080"').issuer == "http://127.0.0.1:8080"


def test_apply_preset_is_pure() -> None:
    table = {"preset": "google", "client_id": "c"}
    merged = apply_preset("google", table)
    assert "preset" not in merged
    assert merged["client_id"] == "c"
    assert table == {"preset": "google", "client_id": "c"}
    with pytest.raises(KeyError):
        apply_preset("nope", {})
