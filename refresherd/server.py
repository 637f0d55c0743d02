"""One ASGI app on one listener: /metrics, /healthz, /readyz — served by Hypercorn.

Hypercorn runs inside the daemon's root task group with a shutdown trigger of ours, so it
installs no signal handlers and ends when the daemon does.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import anyio.abc
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from refresherd.logs import get_logger
from refresherd.metrics import Metrics

log = get_logger("refresherd.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ReadinessCheck = Callable[[], Awaitable[list[str]]]
LivenessCheck = Callable[[], list[str]]


async def _respond(
    send: Send, status: int, body: bytes, content_type: str = "application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _json(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, sort_keys=True) + "\n").encode()


class App:
    """The ASGI application. Routes are few and fixed, so no framework is needed yet."""

    def __init__(
        self, *, metrics: Metrics, liveness: LivenessCheck, readiness: ReadinessCheck
    ) -> None:
        self.metrics = metrics
        self.liveness = liveness
        self.readiness = readiness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, _json({"error": "method_not_allowed"}))
        elif path == "/metrics":
            body = generate_latest(self.metrics.registry)
            await _respond(send, 200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            dead = self.liveness()
            await _respond(
                send,
                200 if not dead else 503,
                _json({"status": "ok" if not dead else "unhealthy", "problems": dead}),
            )
        elif path == "/readyz":
            problems: list[str] = []
            with anyio.move_on_after(5.0) as scope_:
                problems = await self.readiness()
            if scope_.cancelled_caught:
                problems = ["readiness check timed out (database not answering)"]
            self.metrics.ready.set(0 if problems else 1)
            status = 200 if not problems else 503
            await _respond(
                send,
                status,
                _json({"status": "ready" if not problems else "not_ready", "problems": problems}),
            )
        else:
            await _respond(send, 404, _json({"error": "not_found"}))


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listener ourselves so that port 0 works and the real port can be reported."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(
    app: App,
    sock: socket.socket,
    shutdown: anyio.Event,
) -> None:
    """Serve ``app`` on ``sock`` until ``shutdown`` is set or the task is cancelled."""
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 5.0
    host, port = sock.getsockname()[:2]
    log.info("listening", address=f"{host}:{port}")
    try:
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
            config,
            sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
            shutdown_trigger=shutdown.wait,
        )
    except asyncio.InvalidStateError:
        # Hypercorn raises this instead of CancelledError when it is cancelled while waiting
        # for open connections in its graceful shutdown. The daemon waits for the listener
        # before cancelling, so this is a second stop signal: the process is ending anyway.
        if not shutdown.is_set():
            raise
