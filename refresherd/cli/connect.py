"""``refresherd connect ID --provider NAME``: a link for support staff to hand a customer, the
same as ``POST /v1/tokens/ID/connect`` makes (refresherd.connect): its state kept in the
database, so whichever daemon receives the callback takes it. The link is printed on stdout,
nowhere else: it holds the state."""

from __future__ import annotations

import argparse
import json
import time

from refresherd.cli.common import EX_DATAERR, EX_USAGE, configured, fail, one_shot
from refresherd.connect import LinkRefused, link_request
from refresherd.encryption import cipher_for
from refresherd.idp.discovery import EX_UNAVAILABLE, DiscoveryError, resolve_providers
from refresherd.model import rfc3339
from refresherd.settings import Config
from refresherd.store import open_store
from refresherd.web.connect import issue_link, link_json


def command(args: argparse.Namespace) -> int:
    loaded = configured(args)
    if isinstance(loaded, int):
        return loaded
    _, config = loaded
    try:
        return one_shot(config, _connect, config, args)
    except DiscoveryError as exc:
        return fail(str(exc), EX_UNAVAILABLE)


async def _connect(config: Config, args: argparse.Namespace) -> int:
    if args.provider not in config.providers:
        known = ", ".join(sorted(config.providers))
        return fail(f"provider {args.provider!r} is not configured (known: {known})", EX_USAGE)
    params: dict[str, str] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            return fail(f"--param {item!r}: expected NAME=VALUE", EX_USAGE)
        params[name] = value
    try:
        request = link_request(
            args.id,
            args.provider,
            return_url=args.return_url,
            scope=args.scope,
            prompt=args.prompt,
            params=params,
        )
    except LinkRefused as exc:
        return fail(exc.message, EX_USAGE)
    # Only this provider's issuer is asked for its authorization endpoint.
    resolved = await resolve_providers({args.provider: config.providers[args.provider]})
    store = await open_store(config.daemon.database, cipher=cipher_for(config.encryption))
    try:
        link = await issue_link(store, resolved[args.provider], request, now=time.time())
    except LinkRefused as exc:
        return fail(exc.message, EX_DATAERR)
    finally:
        await store.close()
    if args.json:
        print(json.dumps(link_json(link), sort_keys=True))
        return 0
    pending = link.pending
    print(link.url)
    what = "reconnects the invalidated" if link.reconnect else "connects the new"
    print(
        f"# {what} token set {pending.token_set_id!r}; single use, expires "
        f"{rfc3339(pending.expires_at)}; the IdP answers {pending.redirect_uri}"
    )
    return 0
