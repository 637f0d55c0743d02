"""Provider presets: known IdPs' token endpoints and refresh-token rules, as config defaults.

Pure data and one function. A preset holds ``[providers.NAME]`` values exactly as TOML would
spell them, so that they go through the same validation as keys a user writes; keys the user
writes override them. Where each figure comes from is in docs/providers.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    title: str
    # Provider keys as TOML values ("5s", "one_time", ...); explicit keys override them.
    values: Mapping[str, object]
    # Tenant-specific IdPs have no fixed token URL: this example says what to give instead.
    issuer_example: str | None = None


def _preset(name: str, title: str, issuer_example: str | None = None, **values: object) -> Preset:
    return Preset(name, title, MappingProxyType(values), issuer_example)


PRESETS: Final[Mapping[str, Preset]] = MappingProxyType(
    {
        p.name: p
        for p in (
            _preset(
                "visma-connect",
                "Visma Connect",
                token_url="https://connect.visma.com/connect/token",
                authorization_url="https://connect.visma.com/connect/authorize",
                # Visma Connect answers the redirect_uri with a POST (its integration guide).
                response_mode="form_post",
                auth_method="client_secret_post",
                refresh_token_usage="one_time",
                # The application's grace period is configurable from 5 to 60 s: 5 s never
                # exceeds it. Raise it to the application's own setting.
                grace_period="5s",
            ),
            _preset(
                "okta",
                "Okta",
                "https://YOUR-ORG.okta.com/oauth2/default",
                auth_method="client_secret_basic",
                refresh_token_usage="one_time",
                # Okta's default rotation grace period (configurable 0 to 60 s).
                grace_period="30s",
            ),
            _preset(
                "auth0",
                "Auth0",
                "https://YOUR-TENANT.eu.auth0.com/",
                auth_method="client_secret_post",
                refresh_token_usage="one_time",
                # Auth0's default "reuse interval" (leeway) is 0: a reused token revokes the family.
                grace_period="0s",
            ),
            _preset(
                "keycloak",
                "Keycloak",
                "https://keycloak.example.com/realms/YOUR-REALM",
                auth_method="client_secret_basic",
                # "Revoke Refresh Token" is off by default: refresh tokens may be used again.
                refresh_token_usage="reuse",
                grace_period="0s",
            ),
            _preset(
                "entra-id",
                "Microsoft Entra ID",
                "https://login.microsoftonline.com/YOUR-TENANT-ID/v2.0",
                auth_method="client_secret_post",
                # A new refresh token comes with each response; the old one stays valid until it
                # expires, so a retry with it after a lost response is safe for a good while.
                refresh_token_usage="one_time",
                grace_period="5m",
                # Unused for 90 days (the default inactivity lifetime), the refresh token dies.
                refresh_token_idle_lifetime="90d",
            ),
            _preset(
                "google",
                "Google",
                token_url="https://oauth2.googleapis.com/token",
                authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
                # Without it Google issues no refresh token.
                authorization_params=MappingProxyType({"access_type": "offline"}),
                auth_method="client_secret_post",
                # Google does not rotate refresh tokens.
                refresh_token_usage="reuse",
                grace_period="0s",
                # Unused for six months, a refresh token stops working.
                refresh_token_idle_lifetime="180d",
            ),
        )
    }
)


def apply_preset(name: str, table: Mapping[str, object]) -> dict[str, object]:
    """``table`` (a ``[providers.NAME]`` table) on top of preset ``name``'s values.

    An explicit ``issuer`` replaces the preset's token and authorization URLs, as an explicit
    ``token_url`` does.
    Raises :class:`KeyError` for an unknown preset.
    """
    values = dict(PRESETS[name].values)
    if table.get("issuer") is not None:
        values.pop("token_url", None)
        values.pop("authorization_url", None)
    values.update(table)
    values.pop("preset", None)
    return values
