"""The argparse tree of the ``refresherd`` command: spellings, arguments and help, nothing else.

It imports argparse alone, so that ``refresherd --help`` and a mistyped command cost no more
than the interpreter's start (tests/test_cli.py).
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refresherd",
        description="Keep OAuth 2.0 token sets fresh; never lose a rotated refresh token.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $REFRESHERD_CONFIG, else /etc/refresherd/config.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon")
    # Started by the primary itself for [daemon] workers > 1 (refresherd.workers).
    run.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # INDEX/COUNT
    sub.add_parser("check-config", help="validate the config file and exit")

    tokens = sub.add_parser("tokens", help="manage stored token sets")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    add = tsub.add_parser("add", help="add a token set; the token response JSON comes on stdin")
    add.add_argument("id")
    add.add_argument("--provider", required=True)
    imp = tsub.add_parser("import", help="add token sets from JSON Lines, all or nothing")
    imp.add_argument("file", nargs="?", default="-", help="a file, or - for stdin (default)")
    lst = tsub.add_parser("list", help="list token sets (no token values unless --reveal)")
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--reveal", action="store_true", help="include token values")
    lst.add_argument(
        "--expiring-within",
        metavar="DURATION",
        help='only sets whose refresh token reaches its absolute expiry within DURATION ("14d")',
    )
    show = tsub.add_parser("show", help="show one token set")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--reveal", action="store_true", help="include token values")
    rm = tsub.add_parser("remove", help="remove a token set")
    rm.add_argument("id")

    refresh = sub.add_parser("refresh", help="refresh one token set now (same path as the daemon)")
    refresh.add_argument("id")
    link = sub.add_parser(
        "connect",
        help="print a link that connects a customer (or reconnects an invalidated token set) "
        "through the provider's login and consent; single use, expiring",
    )
    link.add_argument("id", help="the token set's id (new, or invalidated)")
    link.add_argument("--provider", required=True)
    link.add_argument("--return-url", help="one of the provider's return_urls (default: first)")
    link.add_argument("--scope", help="default: the provider's authorization_scope, else scope")
    link.add_argument("--prompt", help='OpenID Connect prompt, such as "login"')
    link.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="more for the IdP"
    )
    link.add_argument("--json", action="store_true")
    sub.add_parser(
        "rekey",
        help="seal every stored token with [encryption]'s current key (after a key rotation, "
        "or to encrypt rows stored before encryption was turned on)",
    )

    mig = sub.add_parser(
        "migrate",
        help="move every token set, the journal and the hook queue to another database "
        "(SQLite <-> PostgreSQL) while no daemon runs",
    )
    mig.add_argument("--from", dest="source", required=True, metavar="DATABASE")
    mig.add_argument("--to", dest="target", required=True, metavar="DATABASE")
    for side in ("from", "to"):
        mig.add_argument(
            f"--{side}-password-file",
            metavar="PATH",
            help=f"the PostgreSQL password for --{side} (or PGPASSWORD / ~/.pgpass)",
        )

    demo = sub.add_parser(
        "demo", help="run the daemon against the built-in fake IdP on loopback (no config needed)"
    )
    demo.add_argument("--token-sets", type=int, default=20)
    demo.add_argument("--lifetime", type=float, default=20.0, help="access token seconds")
    demo.add_argument("--listen", default="127.0.0.1:9469")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    return parser
