"""The bare ASGI handler of ``bench/run.py reads``: GET /v1/tokens/ID answers the bytes the
daemon answered for ID (read from --bodies), with the same headers, nothing else done; served
by refresherd.web.app.serve, the daemon's own serving code, on TCP and a unix socket."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anyio

from refresherd.web.app import bind_socket, bind_unix_socket, serve

PREFIX = "/v1/tokens/"


def bare_app(bodies: dict[str, bytes]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        body = bodies.get(path[len(PREFIX) :]) if path.startswith(PREFIX) else None
        if body is None:
            body = b"{}\n" if path == "/healthz" else b'{"error": "not_found"}\n'
        await send(
            {
                "type": "http.response.start",
                "status": 200 if body != b'{"error": "not_found"}\n' else 404,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bodies", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--unix-socket", type=Path, required=True)
    args = p.parse_args()
    bodies = {k: v.encode() for k, v in json.loads(args.bodies.read_text()).items()}
    sockets = [bind_socket("127.0.0.1", args.port), bind_unix_socket(args.unix_socket, 0o600)]
    await serve(bare_app(bodies), sockets, anyio.Event())


if __name__ == "__main__":
    anyio.run(main)
