"""``refresherd tokens add|list|show|remove``: the stored token sets, read and written through
the store alone (no daemon, no IdP). ``tokens import`` is :mod:`refresherd.cli.importing`."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from refresherd import policy
from refresherd.cli.common import (
    EX_DATAERR,
    EX_NOINPUT,
    EX_USAGE,
    configured,
    fail,
    one_shot,
)
from refresherd.cli.endings import read_stdin
from refresherd.connect import reconnect_hint
from refresherd.encryption import cipher_for
from refresherd.intake import parse_single
from refresherd.model import State, TokenSet, rfc3339
from refresherd.settings import EX_CONFIG, Config, ConfigError, ProviderConfig, parse_duration
from refresherd.store import NewTokenSet, TokenSetExists, TokenStore, open_store


def command(args: argparse.Namespace) -> int:
    loaded = configured(args)
    if isinstance(loaded, int):
        return loaded
    _, config = loaded
    if args.tokens_command == "add":
        # Read before the event loop starts: a Ctrl-C while we wait is then a plain
        # KeyboardInterrupt out of the read, which main() reports in one line.
        items = _read_input(config, args)
        if isinstance(items, int):
            return items
        return one_shot(config, _add, config, items)
    return one_shot(config, _tokens, config, args)


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
    if ts.state is State.INVALIDATED:
        # The way back (a connect link), where the provider is set up for connecting.
        data["reconnect"] = reconnect_hint(ts.id, provider)
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
        elif isinstance(value, dict):  # reconnect: the way back, one line per part
            rows += [(f"{key}.{name}", item) for name, item in value.items()]
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
        return fail(f"provider {args.provider!r} is not configured (known: {known})", EX_CONFIG)
    if sys.stdin.isatty():
        # Else a person at a terminal sees nothing happen, and cannot tell what is awaited.
        print(
            f"Paste the token response JSON for {args.id!r} (provider {args.provider}), "
            "then press Ctrl-D on a line of its own (Ctrl-C to cancel):",
            file=sys.stderr,
        )
    text = read_stdin()
    try:
        return [
            parse_single(
                text,
                token_set_id=args.id,
                provider=args.provider,
                now=time.time(),
                schedule=config.schedule,
                rand=random.random(),
            )
        ]
    except ValueError as exc:
        return fail(f"tokens add {args.id}: {exc}", EX_DATAERR)


async def _add(config: Config, items: list[NewTokenSet]) -> int:
    store = await open_store(config.daemon.database, cipher=cipher_for(config.encryption))
    try:
        await store.add_many(items, now=time.time())
    except TokenSetExists:
        taken = await _first_existing(store, items)
        which = f"id {taken!r}" if taken is not None else "an id"
        return fail(
            f"tokens add: {which} exists already (remove it first); nothing was added",
            EX_DATAERR,
        )
    finally:
        await store.close()
    new = items[0]
    print(f"added {new.id} (provider {new.provider}, next refresh {rfc3339(new.next_refresh_at)})")
    return 0


async def _tokens(config: Config, args: argparse.Namespace) -> int:
    action = args.tokens_command
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
                    return fail(str(exc), EX_USAGE)
            providers = args.provider or ()
            for name in sorted(set(providers) - set(config.providers)):
                print(f"refresherd: warning: provider {name!r} is not configured", file=sys.stderr)
            await _list(
                store,
                config,
                as_json=args.json,
                reveal=args.reveal,
                within=within,
                states=args.state or (),
                providers=providers,
            )
            return 0
        if action == "show":
            ts = await store.get(args.id)
            if ts is None:
                return fail(f"no token set with id {args.id!r}", EX_NOINPUT)
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
                return fail(f"no token set with id {args.id!r}", EX_NOINPUT)
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
    store: TokenStore,
    config: Config,
    *,
    as_json: bool,
    reveal: bool,
    within: float | None = None,
    states: Sequence[str] = (),
    providers: Sequence[str] = (),
) -> None:
    """Stream page by page: never every token set in memory at once. ``within``: only the sets
    whose refresh token's absolute expiry is that close (or past); ``states``, ``providers``:
    only those (the database selects them)."""
    out = sys.stdout
    horizon = None if within is None else time.time() + within

    async def selected() -> AsyncIterator[TokenSet]:
        async for ts in store.iterate(states=states, providers=providers):
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
    # Each column as wide as its longest value, known before the first row is printed: the
    # times have one width, the stored text columns' longest values come from one aggregate.
    stored = await store.longest(
        [c for c in columns if c not in _TIME_COLUMNS], states=states, providers=providers
    )
    widths = [max(len(c), _TIME_WIDTH if c in _TIME_COLUMNS else stored[c]) for c in columns]
    out.write(_table_row(columns, widths))
    async for ts in selected():
        row = token_set_json(ts, reveal=reveal, provider=config.providers.get(ts.provider))
        out.write(_table_row([_cell(row[c]) for c in columns], widths))


_TIME_COLUMNS: Final = frozenset(
    {"expires_at", "last_refresh_at", "refresh_token_expires_at", "next_refresh_at"}
)
_TIME_WIDTH: Final = len("2000-01-01T00:00:00Z")  # model.rfc3339


def _cell(value: object) -> str:
    """A value as the table shows it: "-" for none, any run of white space (a newline in an
    error message) as one space, so that one token set stays one line; never longer than the
    value, so that the column widths still hold."""
    return "-" if value is None else " ".join(str(value).split()) or "-"


def _table_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [cell.ljust(width) for cell, width in zip(cells[:-1], widths, strict=False)]
    return "  ".join([*padded, cells[-1]]) + "\n"
