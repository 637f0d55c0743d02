"""One fake IdP process for the benchmarks: mint N token sets, write them to a file, serve.

The first stdout line is JSON: the token URL and the file holding the minted token responses
(JSON Lines, ``tokens import`` format without ``id``/``provider``). The IdP runs in its own
process so that its CPU is not the benchmarked client's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import anyio

from refresherd.testing import FakeIdP


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--usage", choices=["one_time", "reuse"], default="reuse")
    p.add_argument("--access-token-lifetime", type=float, default=3600.0)
    p.add_argument("--client-secret", default="bench-client-secret")
    args = p.parse_args()
    idp = FakeIdP(
        clients={"bench": args.client_secret},
        usage=args.usage,
        latency=args.latency,
        access_token_lifetime=args.access_token_lifetime,
        grace_period=30.0,
    )
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for i in range(args.tokens):
            out.write(json.dumps(idp.issue(f"u{i}")) + "\n")
    anyio.run(_serve, idp)
    return 0


async def _serve(idp: FakeIdP) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(idp.serve)
            print(json.dumps({"token_url": idp.token_url}), flush=True)
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
