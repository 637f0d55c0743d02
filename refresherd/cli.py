"""The ``refresherd`` command. Subcommand spellings are a public contract (README).

Exit codes follow sysexits.h where one fits: 65 bad input data, 66 no such token set,
75 temporarily impossible (another process holds the lease), 78 configuration error.
No secret is ever taken from argv: token responses come on stdin or from a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import anyio

from refresherd import logs, policy
from refresherd.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    ProviderConfig,
    load_config,
    parse_duration,
    resolve_config_path,
)
from refresherd.daemon import Daemon, open_runtime
from refresherd.discovery import EX_UNAVAILABLE, DiscoveryError
from refresherd.encryption import cipher_for
from refresherd.intake import InputError, iter_lines, parse_single
from refresherd.migrate import MigrateRefused, migrate
from refresherd.model import Secret, State, TokenSet, rfc3339
from refresherd.store import (
    DatabaseMisconfigured,
    Location,
    NewTokenSet,
    StoreError,
    TokenSetExists,
    TokenStore,
    has_password,
    location_problem,
    open_store,
    parse_location,
)
from refresherd.workers import PRIMARY_DATABASE_ENV, worker_config

EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOINPUT: Final = 66
EX_TEMPFAIL: Final = 75
EX_FAILURE: Final = 1


def _fail(message: str, code: int) -> int:
    print(f"refresherd: {message}", file=sys.stderr)
    return code


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from refresherd.demo import run_demo

        logs.configure("info", "auto")
        return anyio.run(
            lambda: run_demo(
                token_sets=args.token_sets,
                lifetime=args.lifetime,
                listen=args.listen,
                duration=args.duration,
            )
        )
    if args.command == "migrate":
        return _migrate(args)
    path = resolve_config_path(args.config, os.environ)
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _fail(str(exc), EX_CONFIG)
    if args.command == "check-config":
        warnings = list(config.warnings)
        if isinstance(config.daemon.database, Path):
            problem = location_problem(config.daemon.database)
            if problem is not None and problem.for_everyone:
                return _fail(f"{path}: daemon.database: {problem}", EX_CONFIG)
            if problem is not None:
                # Perhaps this user's alone: the daemon may run as another one.
                warnings.append(f"daemon.database: {problem} (as the user running check-config)")
        for warning in warnings:
            print(f"refresherd: warning: {warning}", file=sys.stderr)
        print(f"{path}: ok ({len(config.providers)} provider(s))")
        return 0
    if args.command == "run":
        logs.configure(config.log.level, config.log.format)
        worker = None
        if args.worker is not None:
            try:
                worker, config = worker_config(
                    config, args.worker, os.environ.get(PRIMARY_DATABASE_ENV)
                )
            except ValueError as exc:
                return _fail(f"{path}: {exc}", EX_CONFIG)
        # What start-up made (modules, config) lives as long as the process: out of the
        # collector's sight, so that its full collections, which walk every object it tracks,
        # do not walk them too. Measured at 1,500 refreshes/s: the collector's share of the
        # daemon's CPU from 19 % to 14 % (docs/benchmarks.md, "The garbage collector").
        gc.freeze()
        return anyio.run(Daemon(config, config_path=path, worker=worker).run)
    # One-shot commands: logs go to stderr, results to stdout.
    logs.configure(config.log.level if args.command == "refresh" else "warning", config.log.format)
    try:
        if args.command == "refresh":
            return anyio.run(_refresh, config, args.id)
        if args.command == "rekey":
            return anyio.run(_rekey, config)
        return anyio.run(_tokens, config, args)
    except DatabaseMisconfigured as exc:
        return _fail(str(exc), EX_CONFIG)
    except StoreError as exc:
        return _fail(str(exc), EX_FAILURE)
    except DiscoveryError as exc:
        return _fail(str(exc), EX_UNAVAILABLE)


def _migrate(args: argparse.Namespace) -> int:
    locations: list[Location] = []
    for flag, text, password_file in (
        ("--from", args.source, args.from_password_file),
        ("--to", args.target, args.to_password_file),
    ):
        if has_password(text):
            # argv is visible to every user of the machine (ps, /proc).
            return _fail(
                f"migrate: {flag}: the URL holds a password, which must not be on the command "
                f"line: use {flag}-password-file, PGPASSWORD or ~/.pgpass",
                EX_USAGE,
            )
        password = None
        if password_file is not None:
            try:
                with open(password_file, encoding="utf-8") as f:
                    password = Secret(f.read().strip())
            except OSError as exc:
                return _fail(
                    f"migrate: {flag}-password-file {password_file}: {exc.strerror}", EX_NOINPUT
                )
        try:
            locations.append(parse_location(text, base_dir=Path.cwd(), password=password))
        except ValueError as exc:
            return _fail(f"migrate: {flag}: {exc}", EX_USAGE)
    source, target = locations
    if str(source) == str(target):
        return _fail("migrate: --from and --to name the same database", EX_USAGE)
    logs.configure("warning", "auto")
    try:
        report = anyio.run(migrate, source, target)
    except MigrateRefused as exc:
        return _fail(f"migrate: {exc}", EX_TEMPFAIL)
    except StoreError as exc:
        return _fail(f"migrate: {exc}", EX_FAILURE)
    for table, count in report.moved.items():
        print(f"moved {count} row(s) of {table}")
    print(f"verified: {target} holds what {source} holds")
    return 0


async def _rekey(config: Config) -> int:
    cipher = cipher_for(config.encryption)
    if cipher is None:
        return _fail("rekey: the config has no [encryption] key_file or key_credential", EX_CONFIG)
    store = await open_store(config.daemon.database, create=False, cipher=cipher)
    try:
        changed = await store.rekey()
        left = await store.sealed_key_ids()
    finally:
        await store.close()
    print(f"sealed {changed} token set(s) with key {cipher.current_id}")
    print(f"keys in use now: {', '.join(sorted(left)) or 'none'}")
    return 0


async def _refresh(config: Config, token_set_id: str) -> int:
    async with open_runtime(config) as rt:
        result = await rt.refresher.refresh(token_set_id)
        # The set as stored now, not as the refresh began: an invalid_grant stored it
        # invalidated, and "active" would tell the operator the opposite.
        ts = result.token_set
        if ts is not None:
            try:
                ts = await rt.store.get(token_set_id)
            except StoreError as exc:
                print(f"refresherd: cannot read the token set back: {exc}", file=sys.stderr)
                ts = None
    summary: dict[str, Any] = {"id": token_set_id, "outcome": result.outcome}
    if result.reason:
        summary["reason"] = result.reason
    if result.detail:
        summary["detail"] = result.detail
    if ts is not None:
        summary.update(state=ts.state.value, expires_at=rfc3339(ts.expires_at))
    print(json.dumps(summary))
    if result.ok:
        return 0
    if result.outcome == "not_found":
        return _fail(f"no token set with id {token_set_id!r}", EX_NOINPUT)
    if result.outcome == "leased":
        return _fail(
            f"refresh {token_set_id}: another refresherd process holds its lease "
            f"({result.detail or 'leased'}) and is refreshing it; try again later",
            EX_TEMPFAIL,
        )
    if result.outcome == "circuit_open":
        return _fail(
            f"refresh {token_set_id}: the IdP refused our client credentials "
            f"({result.reason or 'invalid_client'}); check the provider's client_id and secret",
            EX_TEMPFAIL,
        )
    why = ": ".join(part for part in (result.reason, result.detail) if part)
    message = f"refresh {token_set_id}: {result.outcome}" + (f" ({why})" if why else "")
    return _fail(message, EX_FAILURE)


def token_set_json(
    ts: TokenSet, *, reveal: bool, provider: ProviderConfig | None = None
) -> dict[str, Any]:
    """``provider``: the token set's provider config, for the effective policy (the set's own
    values where it has them, else the provider's) and the refresh token's expiry, which counts
    from the set's creation where the IdP did not state it. None: the provider is no longer
    configured, so only the set's own values are known."""
    refresh_expires = _refresh_token_expires_at(ts, provider)
    data: dict[str, Any] = {
        "id": ts.id,
        "provider": ts.provider,
        "state": ts.state.value,
        "expires_at": rfc3339(ts.expires_at),
        "next_refresh_at": rfc3339(ts.next_refresh_at),
        "last_refresh_at": rfc3339(ts.last_refresh_at),
        "last_error": ts.last_error,
        "failures": ts.failures,
        "invalid_reason": ts.invalid_reason,
        "token_type": ts.token_type,
        "scope": ts.scope,
        "version": ts.version,
        "created_at": rfc3339(ts.created_at),
        "updated_at": rfc3339(ts.updated_at),
        "leased_by": ts.lease_owner if ts.lease_until and ts.lease_until > time.time() else None,
        "unresolved_attempt_since": rfc3339(ts.attempt.started_at) if ts.attempt else None,
        "refresh_token_expires_at": rfc3339(refresh_expires),
        "policy": policy_json(ts, provider),
    }
    if reveal:
        data["access_token"] = ts.access_token.reveal() if ts.access_token else None
        data["refresh_token"] = ts.refresh_token.reveal()
    return data


def _refresh_token_expires_at(ts: TokenSet, provider: ProviderConfig | None) -> float | None:
    """The absolute refresh-token expiry that `tokens show` prints and `list --expiring-within`
    selects by; without the provider's config only the set's own values count."""
    if provider is not None:
        return policy.refresh_token_expires_at(ts, policy.effective_policy(ts, provider))
    if ts.refresh_expires_at is None and ts.refresh_token_lifetime is not None:
        return ts.created_at + ts.refresh_token_lifetime
    return ts.refresh_expires_at


def policy_json(ts: TokenSet, provider: ProviderConfig | None) -> dict[str, Any]:
    """The policy the daemon refreshes ``ts`` under, and where each value comes from: a set
    authorized after an IdP setting change carries its own values (``token_set``)."""
    own: dict[str, Any] = {
        "refresh_token_usage": ts.refresh_token_usage.value if ts.refresh_token_usage else None,
        "grace_period": ts.grace_period,
        "refresh_token_lifetime": ts.refresh_token_lifetime,
        "refresh_token_idle_lifetime": ts.refresh_token_idle_lifetime,
        "refresh_mode": ts.refresh_mode.value if ts.refresh_mode else None,
    }
    if provider is not None:
        eff = policy.effective_policy(ts, provider)
        values: dict[str, Any] = {
            "refresh_token_usage": eff.usage.value,
            "grace_period": eff.grace_period,
            "refresh_token_lifetime": eff.refresh_token_lifetime,
            "refresh_token_idle_lifetime": eff.refresh_token_idle_lifetime,
            # keep_alive without a known idle lifetime runs on the access token's cadence.
            "refresh_mode": eff.mode.value,
        }
    else:
        values = dict(own)
    sources = {
        key: "token_set" if own[key] is not None else ("provider" if provider else None)
        for key in own
    }
    return {**values, "source": sources}


def _show_text(data: dict[str, Any]) -> None:
    """``key  value`` lines; the policy object flattened to ``policy.<key>  value (source)``."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key == "policy":
            for name, item in value.items():
                if name != "source":
                    where = value["source"][name]
                    shown = "" if item is None else item
                    rows.append((f"policy.{name}", f"{shown} ({where})" if where else shown))
        else:
            rows.append((key, value))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {'' if value is None else value}")


_COLUMNS = (
    "id",
    "provider",
    "state",
    "expires_at",
    "last_refresh_at",
    "refresh_token_expires_at",
    "last_error",
)


def _read_input(config: Config, args: argparse.Namespace) -> list[NewTokenSet] | int:
    """Parse what `tokens add` was given, before touching the database."""
    if args.provider not in config.providers:
        known = ", ".join(sorted(config.providers))
        return _fail(f"provider {args.provider!r} is not configured (known: {known})", EX_CONFIG)
    try:
        return [
            parse_single(
                sys.stdin.read(),
                token_set_id=args.id,
                provider=args.provider,
                now=time.time(),
                schedule=config.schedule,
                rand=random.random(),
            )
        ]
    except ValueError as exc:
        return _fail(f"tokens add {args.id}: {exc}", EX_DATAERR)


async def _import(config: Config, args: argparse.Namespace) -> int:
    """`tokens import`: streamed into the database all or nothing, in bounded memory, so that a
    million lines need no more memory than a hundred."""
    source = "stdin" if args.file == "-" else args.file
    try:
        # Blocking reads are fine here: the CLI does nothing else meanwhile.
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: ASYNC230, SIM115
    except OSError as exc:
        return _fail(f"tokens import: cannot read {args.file}: {exc.strerror}", EX_NOINPUT)
    now = time.time()
    rng = random.Random()
    items = iter_lines(
        stream,
        source=source,
        providers=config.providers,
        now=now,
        schedule=config.schedule,
        rand=iter(rng.random, None),
    )
    try:
        store = await open_store(config.daemon.database, cipher=cipher_for(config.encryption))
        try:
            count = await store.import_stream(items, now=now)
        finally:
            await store.close()
    except (InputError, UnicodeDecodeError) as exc:
        return _fail(f"tokens import: {exc}; nothing was imported", EX_DATAERR)
    except TokenSetExists as exc:
        return _fail(f"tokens import: {exc}; nothing was imported", EX_DATAERR)
    finally:
        if stream is not sys.stdin:
            stream.close()
    print(f"imported {count} token set(s)")
    return 0


async def _tokens(config: Config, args: argparse.Namespace) -> int:
    action = args.tokens_command
    if action == "import":
        return await _import(config, args)
    if action == "add":
        items = _read_input(config, args)
        if isinstance(items, int):
            return items
        store = await open_store(config.daemon.database, cipher=cipher_for(config.encryption))
        try:
            count = await store.add_many(items, now=time.time())
        except TokenSetExists:
            taken = await _first_existing(store, items)
            which = f"id {taken!r}" if taken is not None else "an id"
            return _fail(
                f"tokens {action}: {which} exists already (remove it first); nothing was added",
                EX_DATAERR,
            )
        finally:
            await store.close()
        if action == "add":
            new = items[0]
            print(
                f"added {new.id} (provider {new.provider}, "
                f"next refresh {rfc3339(new.next_refresh_at)})"
            )
        else:
            print(f"imported {count} token set(s)")
        return 0

    store = await open_store(
        config.daemon.database, create=False, cipher=cipher_for(config.encryption)
    )
    try:
        if action == "list":
            within = None
            if args.expiring_within is not None:
                try:
                    within = parse_duration(
                        args.expiring_within, file="tokens list", key="--expiring-within"
                    )
                except ConfigError as exc:
                    return _fail(str(exc), EX_USAGE)
            await _list(store, config, as_json=args.json, reveal=args.reveal, within=within)
            return 0
        if action == "show":
            ts = await store.get(args.id)
            if ts is None:
                return _fail(f"no token set with id {args.id!r}", EX_NOINPUT)
            data = token_set_json(
                ts, reveal=args.reveal, provider=config.providers.get(ts.provider)
            )
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                _show_text(data)
            return 0
        if action == "remove":
            if not await store.remove(args.id):
                return _fail(f"no token set with id {args.id!r}", EX_NOINPUT)
            print(f"removed {args.id}")
            return 0
    finally:
        await store.close()
    raise AssertionError(action)


async def _first_existing(store: TokenStore, items: Sequence[NewTokenSet]) -> str | None:
    """The first id of ``items`` that the store holds already (to name it in the error)."""
    for item in items:
        if await store.get(item.id) is not None:
            return item.id
    return None


async def _list(
    store: TokenStore, config: Config, *, as_json: bool, reveal: bool, within: float | None = None
) -> None:
    """Stream page by page: never every token set in memory at once. ``within``: only the sets
    whose refresh token's absolute expiry is that close (or past)."""
    out = sys.stdout
    horizon = None if within is None else time.time() + within

    async def selected() -> AsyncIterator[TokenSet]:
        async for ts in store.iterate():
            if horizon is not None:
                expires = _refresh_token_expires_at(ts, config.providers.get(ts.provider))
                if expires is None or expires > horizon or ts.state is State.INVALIDATED:
                    continue
            yield ts

    if as_json:
        out.write("[")
        first = True
        async for ts in selected():
            data = token_set_json(ts, reveal=reveal, provider=config.providers.get(ts.provider))
            out.write(("\n" if first else ",\n") + json.dumps(data))
            first = False
        out.write("\n]\n" if not first else "]\n")
        return
    columns = _COLUMNS + (("access_token", "refresh_token") if reveal else ())
    out.write("\t".join(columns) + "\n")
    async for ts in selected():
        row = token_set_json(ts, reveal=reveal, provider=config.providers.get(ts.provider))
        out.write("\t".join("" if row[c] is None else str(row[c]) for c in columns) + "\n")


def entrypoint() -> None:
    sys.exit(main())


# `python -m refresherd.cli` and the console script share one entry point.
if __name__ == "__main__":
    entrypoint()
