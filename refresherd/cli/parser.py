"""The argparse tree of the ``refresherd`` command: spellings, arguments and help, nothing else.

It imports argparse alone, so that ``refresherd --help`` and a mistyped command cost no more
than the interpreter's start (tests/test_cli.py).

The global options (``--config``) are accepted before and after the subcommand: every parser of
the tree gets them from one parent parser. Below the top they default to SUPPRESS, so that a
subcommand that was not given one leaves the top-level value in place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import refresherd
from refresherd.cli.endings import ADD_INTERRUPTED, IMPORT_INTERRUPTED

# Written out here, so that tests/test_cli.py can check each state the store knows is listed.
TOKEN_STATES = ("active", "failing", "invalidated")
COMPLETION_SHELLS = ("bash", "zsh", "tcsh")


def _global_options(*, top: bool) -> argparse.ArgumentParser:
    """The options every (sub)command takes, wherever on the line they are written."""
    parent = argparse.ArgumentParser(add_help=False)
    config = parent.add_argument(
        "--config",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help="config file (default: $REFRESHERD_CONFIG, else /etc/refresherd/config.toml)",
    )
    _completes_files(config)
    return parent


def _completes_files(action: argparse.Action) -> None:
    # Read by shtab (``refresherd completion``): complete this argument with file names.
    action.complete = "file"  # type: ignore[attr-defined]


class _Version(argparse.Action):
    """``--version``: the package's version, printed and exit 0 (argparse's own version action
    wants the text when the parser is built; this reads it only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        sys.stdout.write(f"{parser.prog} {refresherd.__version__}\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refresherd",
        description="Keep OAuth 2.0 token sets fresh; never lose a rotated refresh token.",
        parents=[_global_options(top=True)],
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    shared = [_global_options(top=False)]

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
    ) -> argparse.ArgumentParser:
        return group.add_parser(name, help=help, description=help, parents=shared)

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = command(sub, "run", "run the daemon")
    # Started by the primary itself for [daemon] workers > 1 (refresherd.workers).
    run.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # INDEX/COUNT
    command(sub, "check-config", "validate the config file and exit")

    tokens = command(sub, "tokens", "manage stored token sets")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    add = command(tsub, "add", "add a token set; the token response JSON comes on stdin")
    add.add_argument(
        "id", help="the new token set's id (printable, no spaces, at most 200 characters)"
    )
    add.add_argument(
        "--provider", required=True, metavar="NAME", help="the configured provider it belongs to"
    )
    add.set_defaults(interrupted=ADD_INTERRUPTED)
    imp = command(tsub, "import", "add token sets from JSON Lines, all or nothing")
    _completes_files(
        imp.add_argument(
            "file",
            nargs="?",
            default="-",
            help='a file of one JSON object per line with "id", "provider" and the token '
            "response; - for stdin (default)",
        )
    )
    imp.set_defaults(interrupted=IMPORT_INTERRUPTED)
    lst = command(tsub, "list", "list token sets (no token values unless --reveal)")
    lst.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    lst.add_argument("--reveal", action="store_true", help="include token values")
    lst.add_argument(
        "--state",
        choices=TOKEN_STATES,
        action="append",
        help="only sets in this state (repeat for several)",
    )
    lst.add_argument(
        "--provider",
        metavar="NAME",
        action="append",
        help="only sets of this provider (repeat for several)",
    )
    lst.add_argument(
        "--expiring-within",
        metavar="DURATION",
        help='only sets whose refresh token reaches its absolute expiry within DURATION ("14d")',
    )
    show = command(tsub, "show", "show one token set")
    show.add_argument("id", help="the token set's id")
    show.add_argument("--json", action="store_true", help="a JSON object instead of lines")
    show.add_argument("--reveal", action="store_true", help="include token values")
    rm = command(tsub, "remove", "remove a token set")
    rm.add_argument("id", help="the token set's id")

    refresh = command(sub, "refresh", "refresh one token set now (same path as the daemon)")
    refresh.add_argument("id", help="the token set's id")
    link = command(
        sub,
        "connect",
        "print a link that connects a customer (or reconnects an invalidated token set) "
        "through the provider's login and consent; single use, expiring",
    )
    link.add_argument("id", help="the token set's id (new, or invalidated)")
    link.add_argument("--provider", required=True, metavar="NAME", help="a configured provider")
    link.add_argument("--return-url", help="one of the provider's return_urls (default: first)")
    link.add_argument("--scope", help="default: the provider's authorization_scope, else scope")
    link.add_argument("--prompt", help='OpenID Connect prompt, such as "login"')
    link.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="more for the IdP"
    )
    link.add_argument("--json", action="store_true", help="a JSON object instead of the link")
    command(
        sub,
        "rekey",
        "seal every stored token with [encryption]'s current key (after a key rotation, "
        "or to encrypt rows stored before encryption was turned on)",
    )

    mig = command(
        sub,
        "migrate",
        "move every token set, the journal and the hook queue to another database "
        "(SQLite <-> PostgreSQL) while no daemon runs",
    )
    for side, dest, what in (
        ("from", "source", "the database to copy from"),
        ("to", "target", "the empty database to copy to"),
    ):
        mig.add_argument(
            f"--{side}",
            dest=dest,
            required=True,
            metavar="DATABASE",
            help=f"{what}: a SQLite file or a postgresql:// URL, as [daemon] database is written",
        )
    for side in ("from", "to"):
        _completes_files(
            mig.add_argument(
                f"--{side}-password-file",
                metavar="PATH",
                help=f"the PostgreSQL password for --{side} (or PGPASSWORD / ~/.pgpass)",
            )
        )

    demo = command(
        sub, "demo", "run the daemon against the built-in fake IdP on loopback (no config needed)"
    )
    demo.add_argument(
        "--token-sets", type=int, default=20, metavar="N", help="how many (default: 20)"
    )
    demo.add_argument(
        "--lifetime",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="access token lifetime (default: 20)",
    )
    demo.add_argument(
        "--listen",
        default="127.0.0.1:9469",
        metavar="HOST:PORT",
        help="where /metrics and the token API answer (default: 127.0.0.1:9469)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds (default: until Ctrl-C)",
    )

    completion = command(sub, "completion", "print a shell completion script")
    completion.add_argument(
        "shell",
        choices=COMPLETION_SHELLS,
        help="the shell: bash (source <(refresherd completion bash)), zsh or tcsh",
    )
    return parser
