"""Stands in for your application in deploy/kubernetes: asks its refresherd sidecar for the access
token of one token set, through the token API on the unix socket the two containers share
(README.md, "Token API"), and reports when it expires. It never prints the token itself.
Standard library only.

    REFRESHERD_SOCKET       the API's unix socket (default /run/refresherd/api.sock)
    REFRESHERD_BEARER_FILE  the file holding the API's bearer token
                            (default /run/secrets/refresherd-api/api-bearer)
    TOKEN_SET_ID            the token set to ask for (default customer-42)
    READ_INTERVAL           seconds between requests (default 30)
    --once                  ask once; exit 0 if a usable access token came, else 1
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
import time
from types import FrameType
from urllib.parse import quote

# Longer than the API's own wait for a refresh it triggers ([api] wait_timeout, 10 s by default).
REQUEST_TIMEOUT = 30.0


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket; the host name only fills the Host header."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("refresherd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch_access_token(socket_path: str, bearer: str, token_set_id: str) -> dict[str, object]:
    """The API's answer for the token set; LookupError (with the API's message) if unusable."""
    conn = UnixHTTPConnection(socket_path, REQUEST_TIMEOUT)
    try:
        conn.request(
            "GET",
            f"/v1/tokens/{quote(token_set_id, safe='')}",
            headers={"Authorization": f"Bearer {bearer}"},
        )
        response = conn.getresponse()
        body = json.loads(response.read() or b"{}")
    finally:
        conn.close()
    if response.status != 200 or not body.get("access_token"):
        # 409 "invalidated": send the customer to log in again; 404: not added yet.
        raise LookupError(
            f"{token_set_id}: no usable access token ({response.status} "
            f"{body.get('error', '?')}: {body.get('message', '')})"
        )
    answer: dict[str, object] = body
    return answer


def stop(signum: int, frame: FrameType | None) -> None:
    # The container's PID 1 gets no default action for SIGTERM: without this handler the
    # kubelet would wait the whole grace period, and refresherd, which stops after the
    # application, would be left too little of it to drain.
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    socket_path = os.environ.get("REFRESHERD_SOCKET", "/run/refresherd/api.sock")
    bearer_file = os.environ.get("REFRESHERD_BEARER_FILE", "/run/secrets/refresherd-api/api-bearer")
    token_set_id = os.environ.get("TOKEN_SET_ID", "customer-42")
    interval = float(os.environ.get("READ_INTERVAL", "30"))
    once = "--once" in argv
    signal.signal(signal.SIGTERM, stop)
    with open(bearer_file, encoding="utf-8") as fh:
        bearer = fh.read().strip()
    while True:
        status = 1
        try:
            answer = fetch_access_token(socket_path, bearer, token_set_id)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            print(f"cannot ask refresherd at {socket_path}: {exc}", file=sys.stderr, flush=True)
        except LookupError as exc:
            print(exc, file=sys.stderr, flush=True)
        else:
            # Use it here: headers = {"Authorization": f"Bearer {answer['access_token']}"}
            token = str(answer["access_token"])
            print(
                f"{token_set_id}: access token ({len(token)} chars) valid until "
                f"{answer.get('expires_at_rfc3339')} (in {answer.get('expires_in')}s)",
                flush=True,
            )
            status = 0
        if once:
            return status
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
