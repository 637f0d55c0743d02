"""Test instrumentation around DOT, none of which changes what DOT answers, and the one piece
of an IdP that DOT does not have.

- A token ledger: every access and refresh token and authorization code DOT stores is appended
  to ``$DOT_LEDGER``.
- :class:`TokenEndpointMiddleware`: logs one line per token request as soon as DOT has
  answered it (``token endpoint: grant_type=refresh_token status=200``; runserver's own request
  line is lost when the client is gone before the answer is written), then holds the answer for
  ``$DOT_RESPONSE_DELAY`` seconds: DOT has rotated and committed, the client still waits.
- :class:`FormPostMiddleware` (ours, not DOT's): OAuth 2.0 Form Post Response Mode, which
  DOT (oauthlib) does not implement. An authorization request with ``response_mode=form_post``
  is remembered (its state, in the customer's session); when DOT then answers the consent with
  its redirect to the redirect_uri (``?code=...&state=...`` or ``?error=access_denied&state=...``),
  the middleware answers instead what a form_post IdP (Visma Connect, IdentityServer) does: a page
  whose form the browser posts at once, with those parameters, to the redirect_uri.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from django.apps import AppConfig
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

_ledger_lock = threading.Lock()
log = logging.getLogger("dot_server")


def _record_token(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    path = os.environ.get("DOT_LEDGER")
    # Access and refresh tokens have .token; authorization codes (Grant) have .code.
    value = getattr(instance, "token", "") or getattr(instance, "code", "")
    if not (path and created and value):
        return
    with _ledger_lock, open(path, "a", encoding="utf-8") as fh:
        fh.write(value + "\n")


class DotServerConfig(AppConfig):
    name = "dot_server"
    label = "dot_server"

    def ready(self) -> None:
        from django.db.models.signals import post_save
        from oauth2_provider.models import (
            get_access_token_model,
            get_grant_model,
            get_refresh_token_model,
        )

        for model in (get_access_token_model(), get_refresh_token_model(), get_grant_model()):
            post_save.connect(_record_token, sender=model, weak=False, dispatch_uid=model.__name__)


class TokenEndpointMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.delay = float(os.environ.get("DOT_RESPONSE_DELAY", "0"))

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path == "/o/token/" and request.method == "POST":
            grant_type = request.POST.get("grant_type", "-")
            log.info("token endpoint: grant_type=%s status=%s", grant_type, response.status_code)
            if self.delay > 0:
                time.sleep(self.delay)
        return response


class FormPostMiddleware:
    """response_mode=form_post for DOT's authorization endpoint (see the module docstring)."""

    AUTHORIZE = "/o/authorize/"
    SESSION_KEY = "form_post_states"

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path != self.AUTHORIZE:
            return self.get_response(request)
        if (
            request.method == "GET"
            and request.GET.get("response_mode") == "form_post"
            and request.GET.get("state")
            and request.user.is_authenticated
        ):
            # The consent page is about to be shown: its answer is to be posted.
            states = request.session.get(self.SESSION_KEY, [])
            request.session[self.SESSION_KEY] = [*states, request.GET["state"]]
        response = self.get_response(request)
        if request.method != "POST" or response.status_code not in (301, 302, 303):
            return response
        location = urlsplit(response["Location"])
        params = parse_qsl(location.query, keep_blank_values=True)
        state = dict(params).get("state")
        states = request.session.get(self.SESSION_KEY, [])
        if state not in states:
            return response
        request.session[self.SESSION_KEY] = [s for s in states if s != state]
        redirect_uri = urlunsplit((location.scheme, location.netloc, location.path, "", ""))
        log.info("authorization answered by form_post to %s", redirect_uri)
        return render(
            request,
            "dot_server/form_post.html",
            {"redirect_uri": redirect_uri, "params": params},
        )
