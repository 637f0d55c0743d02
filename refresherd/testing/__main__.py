"""``python -m refresherd.testing``: serve a fake IdP until SIGINT or SIGTERM.

The first stdout line is JSON with the endpoint URLs (and, with ``--issue``, the token sets
minted at start), so a script can read one line and go. The client secret comes from a file,
never from argv, where other users of the host could read it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from refresherd.testing.server import FakeIdP


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m refresherd.testing", description="Serve a fake OAuth 2.0 IdP."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--usage", choices=["one_time", "reuse"], default="one_time")
    p.add_argument("--grace-period", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--access-token-lifetime", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("--refresh-token-lifetime", type=float, default=None, metavar="SECONDS")
    p.add_argument("--refresh-token-idle-lifetime", type=float, default=None, metavar="SECONDS")
    p.add_argument("--max-refresh-tokens-per-user", type=int, default=None, metavar="N")
    p.add_argument(
        "--grace-answer",
        choices=["sibling", "same_pair"],
        default="sibling",
        help="a re-send inside the grace period mints a new sibling refresh token "
        "(IdentityServer, Auth0) or gets the first answer again (django-oauth-toolkit)",
    )
    p.add_argument(
        "--reuse-revokes",
        choices=["none", "family", "user"],
        default="family",
        help="what a consumed token presented after its grace period revokes",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay every token request by this much, as a distant IdP's round trip",
    )
    p.add_argument("--client-id", default=None, help="default: refresherd")
    p.add_argument(
        "--client-secret-file",
        type=Path,
        default=None,
        help="file holding the client secret (default secret: refresherd-secret)",
    )
    p.add_argument(
        "--issue",
        action="append",
        default=[],
        metavar="USER",
        help="authorize USER at start and include its token response in the JSON line",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    clients: dict[str, str] | None = None
    if args.client_secret_file is not None:
        secret = args.client_secret_file.read_text(encoding="utf-8").strip("\r\n")
        if not secret:
            print("error: the client secret file is empty", file=sys.stderr)
            return 2
        clients = {args.client_id or "refresherd": secret}
    elif args.client_id is not None:
        print("error: --client-id needs --client-secret-file", file=sys.stderr)
        return 2
    idp = FakeIdP(
        host=args.host,
        port=args.port,
        clients=clients,
        usage=args.usage,
        grace_period=args.grace_period,
        access_token_lifetime=args.access_token_lifetime,
        refresh_token_lifetime=args.refresh_token_lifetime,
        refresh_token_idle_lifetime=args.refresh_token_idle_lifetime,
        max_refresh_tokens_per_user=args.max_refresh_tokens_per_user,
        grace_answer=args.grace_answer,
        reuse_revokes=args.reuse_revokes,
        latency=args.latency,
    )
    anyio.run(_serve, idp, list(args.issue))
    return 0


async def _serve(idp: FakeIdP, users: list[str]) -> None:
    # Listen for signals before announcing the URL, so that a SIGTERM sent right after the
    # line is read still ends the process cleanly.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(idp.serve)
            line: dict[str, object] = {
                "token_url": idp.token_url,
                "revocation_url": idp.revocation_url,
            }
            if users:
                line["issued"] = {user: idp.issue(user) for user in users}
            print(json.dumps(line), flush=True)
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
