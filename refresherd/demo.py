"""`refresherd demo`: the real daemon against the built-in fake IdP on loopback, no config needed.

A newcomer sees refreshes happen in the log and /metrics move within a minute: token sets with
short access tokens (20 s by default) and rotating refresh tokens with a 5 s grace period.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import anyio

from refresherd import logs
from refresherd.daemon import Daemon
from refresherd.intake import token_set_from_json
from refresherd.model import RefreshTokenUsage, Secret
from refresherd.settings import (
    Config,
    DaemonConfig,
    LogConfig,
    ProviderConfig,
    ScheduleConfig,
    ServerConfig,
)
from refresherd.store import open_store
from refresherd.testing import FakeIdP

log = logs.get_logger("refresherd.demo")

DEMO_CLIENT_ID = "refresherd-demo"


def demo_config(database: Path, token_url: str, client_secret: str, listen: str) -> Config:
    host, _, port = listen.rpartition(":")
    return Config(
        source="<demo>",
        daemon=DaemonConfig(database=database, concurrency=16, shutdown_timeout=5.0),
        server=ServerConfig(host=host.strip("[]") or "127.0.0.1", port=int(port)),
        log=LogConfig(level="info", format="auto"),
        # Short lifetimes need a short margin: refresh at 80 % of 20 s, never spinning.
        schedule=ScheduleConfig(min_margin=5.0),
        providers={
            "demo": ProviderConfig(
                name="demo",
                token_url=token_url,
                client_id=DEMO_CLIENT_ID,
                client_secret=Secret(client_secret),
                refresh_token_usage=RefreshTokenUsage.ONE_TIME,
                grace_period=5.0,
                request_timeout=5.0,
            )
        },
    )


async def run_demo(*, token_sets: int, lifetime: float, listen: str, duration: float | None) -> int:
    # A fresh random client secret per run: the demo never ships a fixed credential.
    import secrets

    client_secret = secrets.token_urlsafe(24)
    idp = FakeIdP(
        clients={DEMO_CLIENT_ID: client_secret},
        usage="one_time",
        grace_period=5.0,
        access_token_lifetime=lifetime,
    )
    with tempfile.TemporaryDirectory(prefix="refresherd-demo-") as tmp:
        async with anyio.create_task_group() as tg:
            await tg.start(idp.serve)
            config = demo_config(Path(tmp) / "tokens.db", idp.token_url, client_secret, listen)
            store = await open_store(config.daemon.database)
            now = time.time()
            rng = random.Random()
            # Planned as if the customers had authorized at different moments of the last
            # lifetime, so that refreshes start at once and keep a steady pace, as in a real
            # deployment, instead of all waiting for the first lifetime to run out. (Their
            # recorded expiry is then earlier than the fake IdP's, which only errs on the safe
            # side.)
            try:
                await store.add_many(
                    [
                        token_set_from_json(
                            idp.issue(f"customer-{i:04d}"),
                            token_set_id=f"customer-{i:04d}",
                            provider="demo",
                            now=now - lifetime * (i - 1) / token_sets,
                            schedule=config.schedule,
                            rand=rng.random(),
                        )
                        for i in range(1, token_sets + 1)
                    ],
                    now=now,
                )
            finally:
                await store.close()
            daemon = Daemon(config)
            print(
                f"refresherd demo: {token_sets} token sets, {lifetime:g}s access tokens, "
                f"fake IdP at {idp.token_url}\n"
                f"  metrics: curl -s http://{listen}/metrics | grep refresherd_refresh_success\n"
                "  stop with Ctrl-C",
                file=sys.stderr,
            )
            if duration is not None:

                async def stop_later() -> None:
                    await anyio.sleep(duration)
                    daemon.request_stop()

                tg.start_soon(stop_later)
            code = await daemon.run()
            ledger = idp.ledger
            print(
                f"refresherd demo: done; the IdP saw {ledger.refreshes} refreshes, "
                f"{ledger.reuses_in_grace} grace reuses, {ledger.reuses_outside_grace} "
                f"reuses outside grace, {ledger.concurrent_uses} concurrent uses",
                file=sys.stderr,
            )
            tg.cancel_scope.cancel()
    return code
