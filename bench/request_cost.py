"""What one token request costs the client, by the layers around aiohttp: CPU per request.

A canned HTTP/1.1 server (its own process, keep-alive, the same token response every time)
answers POSTs from ``--concurrency`` anyio tasks on uvloop, as the daemon's runners are; each
variant sends ``--requests`` of them and the process CPU per request is printed. Variants, in
the order given, repeated ``--repeat`` times (alternating, so that drift of the shared machine
shows as spread rather than as a difference):

- ``aiohttp``: ``session.post`` and ``read``, nothing around them;
- ``anyio-scope``: the same inside an ``anyio.CancelScope``;
- ``deadline``: the same inside ``refresherd.deadlines.fail_after``;
- ``transport``: ``refresherd.idp.transport.Transport.post``, what a refresh sends through.

    python bench/request_cost.py --requests 20000 --variants aiohttp,anyio-scope,deadline,transport
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import anyio

from refresherd import deadlines
from refresherd.idp.transport import Transport

BODY = b"grant_type=refresh_token&refresh_token=" + b"r" * 40 + b"&client_id=c&client_secret=s"
HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
ANSWER = (
    b'{"access_token":"' + b"a" * 900 + b'","token_type":"Bearer","expires_in":3600,'
    b'"refresh_token":"' + b"r" * 40 + b'"}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)


class _Canned(asyncio.Protocol):
    """One keep-alive connection: each complete request (headers and a Content-Length body)
    gets RESPONSE."""

    def connection_made(self, transport: Any) -> None:
        # uvloop's transport: not a subclass of asyncio.Transport, but it writes.
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            if (at := head.find(b"content-length:")) >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(RESPONSE)


@contextmanager
def canned_idp(backlog: int = 1024) -> Iterator[str]:
    """The canned server in a process of its own, for as long as the block runs: its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/token"
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(sock,), daemon=True)
    server.start()
    try:
        yield url
    finally:
        server.terminate()
        server.join()
        sock.close()


def _serve(sock: socket.socket) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Canned, sock=sock)
        await server.serve_forever()

    uvloop.run(main())


async def _drive(requests: int, concurrency: int, one: Callable[[], Awaitable[Any]]) -> None:
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


async def _variant(name: str, url: str, requests: int, concurrency: int) -> None:
    if name == "transport":
        transport = Transport(max_connections=concurrency, connect_timeout=5.0)

        async def through_transport() -> None:
            await transport.post(url, BODY, dict(HEADERS), timeout=30.0)

        try:
            await _drive(requests, concurrency, through_transport)
        finally:
            await transport.aclose()
        return
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> None:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                await response.read()

        async def in_scope() -> None:
            with anyio.CancelScope():
                await post()

        async def in_deadline() -> None:
            async with deadlines.fail_after(30.0):
                await post()

        one = {"aiohttp": post, "anyio-scope": in_scope, "deadline": in_deadline}[name]
        await _drive(requests, concurrency, one)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--variants", default="aiohttp,anyio-scope,deadline,transport")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - {"aiohttp", "anyio-scope", "deadline", "transport"}
    if unknown:
        p.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    # As the daemon runs (refresherd.cli.run): no young collections every 700 allocations.
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
    with canned_idp() as url:
        print("| variant | run | CPU µs/request | requests/s |\n|---|---:|---:|---:|")
        for run in range(1, args.repeat + 1):
            for name in variants:
                cpu, wall = time.process_time(), time.perf_counter()
                anyio.run(
                    _variant,
                    name,
                    url,
                    args.requests,
                    args.concurrency,
                    backend_options={"use_uvloop": True},
                )
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                print(
                    f"| {name} | {run} | {cpu / args.requests * 1e6:.1f} "
                    f"| {args.requests / wall:,.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
