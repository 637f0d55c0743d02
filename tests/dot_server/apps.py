"""Test instrumentation around DOT, none of which changes what DOT answers.

- A token ledger: every access and refresh token DOT stores is appended to ``$DOT_LEDGER``.
- :class:`TokenEndpointMiddleware`: logs one line per token request as soon as DOT has
  answered it (``token endpoint: grant_type=refresh_token status=200``; runserver's own request
  line is lost when the client is gone before the answer is written), then holds the answer for
  ``$DOT_RESPONSE_DELAY`` seconds: DOT has rotated and committed, the client still waits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from django.apps import AppConfig
from django.http import HttpRequest, HttpResponse

_ledger_lock = threading.Lock()
log = logging.getLogger("dot_server")


def _record_token(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    path = os.environ.get("DOT_LEDGER")
    value = getattr(instance, "token", "")
    if not (path and created and value):
        return
    with _ledger_lock, open(path, "a", encoding="utf-8") as fh:
        fh.write(value + "\n")


class DotServerConfig(AppConfig):
    name = "dot_server"
    label = "dot_server"

    def ready(self) -> None:
        from django.db.models.signals import post_save
        from oauth2_provider.models import get_access_token_model, get_refresh_token_model

        for model in (get_access_token_model(), get_refresh_token_model()):
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
