"""A ``requests`` auth that sends a token set's access token, from the refresherd sidecar.

``requests`` is not a dependency of refresherd: this module is imported only when it is used
(``refresherd.client.SidecarRequestsAuth``). The sidecar is reached through httpx, as by
:class:`~refresherd.client.SidecarAuth`; only the upstream API's requests go through requests.
On a 401 from the upstream API it asks the sidecar once more and, if that gives another token,
re-sends the request once with it (as ``requests.auth.HTTPDigestAuth`` re-sends); a second 401
is the answer. A body requests cannot send twice (a file, a generator) is not re-sent.
"""

from __future__ import annotations

import functools
from typing import Any

try:
    import requests
    from requests.auth import AuthBase
    from requests.cookies import extract_cookies_to_jar
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "refresherd.client.SidecarRequestsAuth needs requests (pip install requests); "
        "for httpx use refresherd.client.SidecarAuth"
    ) from exc

from refresherd.client.tokens import SidecarTokens


class SidecarRequestsAuth(AuthBase):
    """``session.auth = SidecarRequestsAuth(tokens)``: ``Authorization: Bearer`` from
    ``tokens``; thread-safe as ``tokens`` is."""

    def __init__(self, tokens: SidecarTokens) -> None:
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"SidecarRequestsAuth({self.tokens!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.tokens.get()
        request.headers["Authorization"] = f"Bearer {token}"
        if request.body is None or isinstance(request.body, bytes | str):
            hook = functools.partial(self._on_response, token)
            request.register_hook("response", hook)  # type: ignore[no-untyped-call]
        return request

    def _on_response(self, token: str, response: requests.Response, **kwargs: Any) -> Any:
        if response.status_code != 401:
            return response
        fresh = self.tokens.renew(token)
        if fresh == token:
            return response  # refresherd has nothing newer: the 401 is the answer
        # Read and release the refused answer's connection, so the retry may reuse it.
        _ = response.content
        response.close()
        retry = response.request.copy()
        jar = retry._cookies  # type: ignore[attr-defined]
        extract_cookies_to_jar(jar, response.request, response.raw)  # type: ignore[no-untyped-call]
        retry.prepare_cookies(jar)
        retry.headers["Authorization"] = f"Bearer {fresh}"
        # The adapter's send runs no hooks: this one is not called for the retry's answer.
        answer = response.connection.send(retry, **kwargs)
        answer.history.append(response)
        answer.request = retry
        return answer
