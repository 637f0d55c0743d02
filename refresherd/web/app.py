"""One ASGI app (Starlette) on one server (uvicorn, httptools): /metrics, /healthz, /readyz
and the token API, on the TCP listener and, if configured, a unix socket too.

uvicorn runs inside the daemon's root task group, on sockets we bound, ended by an event of
ours: it installs no signal handlers and ends when the daemon does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote_plus

import anyio
import anyio.abc
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from refresherd.logs import exception_fields, get_logger
from refresherd.metrics import Metrics

log = get_logger("refresherd.web.app")

ReadinessCheck = Callable[[], Awaitable[list[str]]]
LivenessCheck = Callable[[], list[str]]


def render_json(content: Any) -> bytes:
    """The API's JSON bodies: sorted keys and a trailing newline (curl-friendly)."""
    return (json.dumps(content, sort_keys=True) + "\n").encode()


class JSON(JSONResponse):
    """Sorted keys and a trailing newline (curl-friendly); never cached: it may hold a token."""

    def render(self, content: Any) -> bytes:
        return render_json(content)

    def __init__(self, content: Any, status_code: int = 200, **kw: Any) -> None:
        super().__init__(content, status_code, **kw)
        self.headers["cache-control"] = "no-store"


def error(
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> JSON:
    """The API's error shape: a stable ``error`` code and a human ``message``."""
    return JSON({"error": code, "message": message, **fields}, status, headers=headers)


# A request body is a token response or a code: a few kilobytes. More is not one of those.
MAX_BODY: Final = 64 * 1024


async def json_body(request: Request) -> dict[str, Any] | Response:
    """A request's body as a JSON object, or the 413/400 answer that says why it is not one
    (never echoing the body: it holds tokens)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return error(413, "invalid_request", f"the body is larger than {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return error(400, "invalid_request", "the body is not valid JSON")
    if not isinstance(data, dict):
        return error(400, "invalid_request", "the body must be a JSON object")
    return data


_HTTP_ERRORS: Final = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_ERRORS.get(exc.status_code, "http_error")
    return JSON({"error": code}, exc.status_code, headers=exc.headers)


# Of a request's body, this much is kept for scrubbing a failure's log line: more than any
# body the API takes (MAX_BODY).
KEPT_BODY: Final = MAX_BODY + 1
# A request's values shorter than this are not scrubbed: no token, code or bearer is so short,
# and replacing short words ("idp") would garble the traceback.
MIN_SECRET: Final = 8
# Runs (of MIN_SECRET or more) of characters that are not JSON punctuation or space: every
# value a body holds, JSON or not.
_VALUES: Final = re.compile(r'[^\s"{}\[\],:\\]{8,}')
_SECRET_HEADERS: Final = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


class HandlerFailures:
    """ASGI middleware around every route: an exception escaping a handler becomes one log
    line, a count (refresherd_http_internal_errors_total) and a JSON 500 in the API's error
    shape. Without it Starlette answers a bare 500 and re-raises to the server, which logs the
    traceback as it is (unscrubbed).

    The line names the method and the route template, the exception and its traceback, with
    every value the request carried that could be a secret (the credentials' headers, the
    query's and the body's values) scrubbed out: the exception was not expected, so neither
    was what its message quotes. The body is kept for that, up to KEPT_BODY bytes."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        started = False

        async def keep() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < KEPT_BODY:
                body.extend(message.get("body", b"")[: KEPT_BODY - len(body)])
            return message

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, keep, watch)
        except ClientDisconnect:
            return  # the client left while its body was read: nobody to answer, no fault here
        except Exception as exc:
            route = getattr(scope.get("route"), "path", None)
            self.metrics.http_internal_errors.labels(route or "unmatched").inc()
            path_params = scope.get("path_params") or {}
            log.error(
                "api handler failed",
                method=scope["method"],
                route=route,
                token_set=path_params.get("id"),
                **exception_fields(exc, request_values(scope, bytes(body))),
            )
            if not started:
                response = error(500, "internal_error", "an unexpected error; it has been logged")
                await response(scope, receive, send)


def request_values(scope: Scope, body: bytes) -> set[str]:
    """Every value of a request that could be a secret, for scrubbing: the credentials'
    headers (whole, and word by word), the query's values and every value in the body, as
    written and, where it is JSON, as decoded (escapes resolved)."""
    found: set[str] = set()
    for name, value in scope["headers"]:
        if name.lower() in _SECRET_HEADERS:
            text = value.decode("latin-1")
            found.add(text)
            found.update(text.split())
    query = scope.get("query_string", b"").decode("latin-1")
    found.update(unquote_plus(part) for part in re.split("[&=]", query))
    found.update(_VALUES.findall(body.decode("utf-8", "replace")))
    with contextlib.suppress(ValueError, RecursionError):  # not JSON: the runs above
        found.update(_strings(json.loads(body)))
    return {value for value in found if len(value) >= MIN_SECRET}


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def build_app(
    *,
    metrics: Metrics,
    liveness: LivenessCheck,
    readiness: ReadinessCheck,
    api_routes: Sequence[BaseRoute] = (),
    middleware: Sequence[Middleware] = (),
    exposed: CollectorRegistry | None = None,
) -> Starlette:
    """The one ASGI app: health, metrics and, when enabled, the token API (refresherd.web.tokens).

    ``exposed`` is what /metrics shows when it is more than ``metrics`` (worker processes'
    values merged in: refresherd.worker_metrics)."""
    registry = exposed if exposed is not None else metrics.registry

    async def metrics_endpoint(request: Request) -> Response:
        body = generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"cache-control": "no-store"})

    async def healthz(request: Request) -> Response:
        dead = liveness()
        return JSON(
            {"status": "ok" if not dead else "unhealthy", "problems": dead},
            200 if not dead else 503,
        )

    async def readyz(request: Request) -> Response:
        problems: list[str] = []
        with anyio.move_on_after(5.0) as scope_:
            problems = await readiness()
        if scope_.cancelled_caught:
            problems = ["readiness check timed out (database not answering)"]
        metrics.ready.set(0 if problems else 1)
        return JSON(
            {"status": "ready" if not problems else "not_ready", "problems": problems},
            200 if not problems else 503,
        )

    get = ["GET", "HEAD"]
    routes: list[BaseRoute] = [
        Route("/metrics", metrics_endpoint, methods=get),
        Route("/healthz", healthz, methods=get),
        Route("/readyz", readyz, methods=get),
        *api_routes,
    ]
    for route in routes:
        # Every route's series from the start, so that increase() sees a first failure too.
        metrics.http_internal_errors.labels(getattr(route, "path", "unmatched"))
    return Starlette(
        routes=routes,
        middleware=[Middleware(HandlerFailures, metrics=metrics), *middleware],
        exception_handlers={HTTPException: _http_error},
    )


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


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` with permission bits ``mode`` (0600 or 0660).

    A stale socket file (left by a killed daemon) is replaced; anything else at ``path`` is
    an error rather than deleted. The socket is created under a umask that already gives
    ``mode``, so there is no moment in which others could connect.
    """
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # nobody listens: stale
            else:
                raise OSError(f"{path}: another process is listening on this socket")
            finally:
                probe.close()
        else:
            raise OSError(f"{path}: exists and is not a socket")
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, without its signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP
    and ends the server by ``should_exit`` (serve's ``shutdown``)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    app: ASGIApp,
    sockets: Sequence[socket.socket],
    shutdown: anyio.Event,
) -> None:
    """Serve ``app`` on ``sockets`` until ``shutdown`` is set or the task is cancelled.

    uvicorn with httptools: measured against Hypercorn on the same app, 100 readers of the
    token API, it served 5x and more the GETs/s at a sixth of the CPU per GET (docs/benchmarks.md,
    "Token reads"). Once ``shutdown`` is set it stops accepting, closes idle keep-alive
    connections, lets requests in progress finish for up to 2 s, then cancels them."""
    for sock in sockets:
        if sock.family == socket.AF_UNIX:
            log.info("listening", socket=sock.getsockname())
        else:
            host, port = sock.getsockname()[:2]
            log.info("listening", address=f"{host}:{port}")
    config = uvicorn.Config(
        app,
        http="httptools",
        ws="none",
        lifespan="off",
        interface="asgi3",
        # No access log: request lines are not needed, and a query string could carry
        # anything. uvicorn's own warnings go through the daemon's logging (logs.py).
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)

    async def stop() -> None:
        await shutdown.wait()
        server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop)
        await server.serve(sockets=list(sockets))
        tg.cancel_scope.cancel()
