"""``refresherd refresh ID``: one refresh now, by the daemon's own path (its runtime, without the
scheduler): single-flight, lease, journal, send, persist."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from refresherd.cli.common import (
    EX_FAILURE,
    EX_NOINPUT,
    EX_TEMPFAIL,
    configured,
    fail,
    one_shot,
)
from refresherd.daemon import open_runtime
from refresherd.idp.discovery import EX_UNAVAILABLE, DiscoveryError
from refresherd.model import rfc3339
from refresherd.settings import Config
from refresherd.store import StoreError


def command(args: argparse.Namespace) -> int:
    loaded = configured(args)
    if isinstance(loaded, int):
        return loaded
    _, config = loaded
    try:
        return one_shot(config, _refresh, config, args.id, level=config.log.level)
    except DiscoveryError as exc:
        return fail(str(exc), EX_UNAVAILABLE)


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
        return fail(f"no token set with id {token_set_id!r}", EX_NOINPUT)
    if result.outcome == "leased":
        return fail(
            f"refresh {token_set_id}: another refresherd process holds its lease "
            f"({result.detail or 'leased'}) and is refreshing it; try again later",
            EX_TEMPFAIL,
        )
    if result.outcome == "circuit_open":
        return fail(
            f"refresh {token_set_id}: the IdP refused our client credentials "
            f"({result.reason or 'invalid_client'}); check the provider's client_id and secret",
            EX_TEMPFAIL,
        )
    why = ": ".join(part for part in (result.reason, result.detail) if part)
    message = f"refresh {token_set_id}: {result.outcome}" + (f" ({why})" if why else "")
    return fail(message, EX_FAILURE)
