"""Django settings for a throwaway django-oauth-toolkit server, configured from the environment.

- ``DOT_DB``: path of the SQLite database (required).
- ``DOT_ACCESS_TOKEN_SECONDS``: ACCESS_TOKEN_EXPIRE_SECONDS (default 20).
- ``DOT_GRACE_SECONDS``: REFRESH_TOKEN_GRACE_PERIOD_SECONDS (default 0: unset).
- ``DOT_REUSE_PROTECTION``: "1" turns REFRESH_TOKEN_REUSE_PROTECTION on (default off).
- ``DOT_LEDGER``: if set, every access and refresh token DOT mints is appended to this file, one
  per line, so the test can make sure none of them ever appears in refresherd's output.
- ``DOT_RESPONSE_DELAY``: seconds to hold every token endpoint answer *after* DOT has processed
  the request (rotation committed), like a slow network on the way back (default 0).
- ``DOT_OIDC``: "1" turns OpenID Connect on (OIDC_ENABLED: the discovery document at
  /o/.well-known/openid-configuration) and RFC 9207's ``iss`` in authorization responses.

Customers log in through Django's own LoginView (/accounts/login/, a template of ours) and give
consent on DOT's authorization page (/o/authorize/, DOT's template): tests/test_connect_browser.py
drives both in a real browser. ``response_mode=form_post`` is ours, not DOT's: see
``apps.FormPostMiddleware``.
"""

from __future__ import annotations

import os
from pathlib import Path

import django

DB_OPTIONS: dict[str, object] = {"timeout": 30}
if django.VERSION >= (5, 1):
    # runserver is threaded: take SQLite's write lock at BEGIN, so that two concurrent token
    # requests serialize instead of failing with "database is locked" on lock upgrade, and
    # let readers (the test) see a consistent database while DOT writes.
    DB_OPTIONS["transaction_mode"] = "IMMEDIATE"
    DB_OPTIONS["init_command"] = "PRAGMA journal_mode=WAL;"

SECRET_KEY = "dot-interop-tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
    "dot_server.apps.DotServerConfig",
]
# Sessions, CSRF and authentication for the login and consent pages (DOT's token and revocation
# endpoints are exempt from CSRF, as clients post to them without a session).
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "dot_server.apps.FormPostMiddleware",
    "dot_server.apps.TokenEndpointMiddleware",
]
ROOT_URLCONF = "dot_server.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ]
        },
    }
]
LOGIN_URL = "/accounts/login/"
# DOT's templates load their stylesheet with {% static %}; it is not served (no styling needed).
STATIC_URL = "/static/"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["DOT_DB"],
        "OPTIONS": DB_OPTIONS,
    }
}
# Client secrets and user passwords are still hashed (DOT's default hash_client_secret=True),
# but with a cheap hasher: the default PBKDF2 costs ~0.5 s of CPU per token request, which a
# 2-core test machine running several servers cannot afford.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

OAUTH2_PROVIDER = {
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("DOT_ACCESS_TOKEN_SECONDS", "20")),
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": int(os.environ.get("DOT_GRACE_SECONDS", "0")),
    "REFRESH_TOKEN_REUSE_PROTECTION": os.environ.get("DOT_REUSE_PROTECTION") == "1",
    "SCOPES": {"read": "Reading scope", "write": "Writing scope"},
    # The tests authorize their customers through the password grant. DOT discourages it
    # (RFC 9700) and plans to refuse it by default from 4.0 on: keep it allowed, explicitly.
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": False,
    "OIDC_ENABLED": os.environ.get("DOT_OIDC") == "1",
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": os.environ.get("DOT_OIDC") == "1",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django.server": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        # One line per token request, with its grant type and status: the test reads them.
        "dot_server": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "oauth2_provider": {"handlers": ["stderr"], "level": "WARNING"},
    },
}
