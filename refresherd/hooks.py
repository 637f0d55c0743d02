"""Notifications of token-set events: an HMAC-signed webhook and/or a command, at least once.

Events are queued in the database by whichever process observes them (refresherd.events: a
daemon with or without ``[hooks]``, ``refresherd refresh``, the API). The dispatcher of a
daemon with ``[hooks]`` takes them into ``hook_deliveries``, one row per target of its own
config (``hooks.events`` filters the types), before anything is sent, so a receiver that is
down, or a restart, loses nothing: it retries with backoff (``policy.hook_retry_at``) until
the receiver answers 2xx (the command exits 0) or the event is older than
``hooks.give_up_after``. Every event carries an ``id``: a receiver dedupes on it, because
at-least-once means a retry after a lost answer is delivered twice. Daemons of a fleet that
deliver should have the same ``[hooks]``: an event is taken once, by one of them.

Events (``type``): ``token_set.invalidated``, ``token_set.recovered``,
``refresh_token.expiring``, ``token_set.connected``. Payloads name the token set and provider,
never a token.

Webhook: ``POST`` of the event JSON with ``X-Refresherd-Signature: sha256=<hex HMAC-SHA256 of
the body with hooks.webhook_secret>``, ``X-Refresherd-Event`` and ``X-Refresherd-Event-Id``.
Command: run (no shell) with the event JSON on stdin, bounded by ``hooks.command_timeout``;
nothing secret is put in its argv or environment.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import subprocess
from typing import Final

import anyio
import anyio.abc
import httpx

from refresherd import policy
from refresherd.clock import Clock, SystemClock
from refresherd.errors import RefresherdError
from refresherd.events import EVENT_TYPES, EventQueue
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.settings import HooksConfig
from refresherd.store import HookDelivery, StoreError, TokenStore

log = get_logger("refresherd.hooks")

__all__ = ["EVENT_TYPES", "SIGNATURE_HEADER", "DeliveryFailed", "Hooks", "signature"]

SIGNATURE_HEADER: Final = "X-Refresherd-Signature"
# Deliveries in flight at once; a queue of thousands drains in order, a few at a time.
CONCURRENCY: Final = 4
# The dispatcher looks at the queue at least this often (another process may have queued).
POLL_INTERVAL: Final = 5.0
# Queued events taken into the delivery queue per transaction.
EXPAND_BATCH: Final = 100
# Claimed deliveries stay invisible this long past their own timeout (a dead dispatcher's
# claim lapses then, and another one takes over).
CLAIM_MARGIN: Final = 5.0


def signature(secret: bytes, body: bytes) -> str:
    """The value of the signature header: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class DeliveryFailed(RefresherdError):
    """One attempt failed; the message is safe to log (no payload, no secret)."""


class Hooks:
    """The dispatcher (:meth:`run`); :meth:`enqueue` queues as refresherd.events does, and
    wakes it."""

    def __init__(
        self,
        *,
        store: TokenStore,
        config: HooksConfig,
        metrics: Metrics,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._client = httpx.AsyncClient(
            transport=transport, follow_redirects=False, trust_env=False
        )
        self._wake = anyio.Event()
        self._active = 0  # deliveries in flight
        self._queue = EventQueue(
            store=store, metrics=metrics, clock=self.clock, on_queued=self.wake
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def targets(self) -> list[str]:
        targets = []
        if self.config.webhook_url is not None:
            targets.append("webhook")
        if self.config.command:
            targets.append("command")
        return targets

    def wake(self) -> None:
        """Look at the queue now (an event was queued in this process)."""
        self._wake.set()

    async def enqueue(
        self, event_type: str, token_set_id: str, provider: str, **fields: object
    ) -> str | None:
        """Queue an event (refresherd.events.EventQueue.enqueue) and deliver it soon; None if
        the database refused it (logged and counted, never raised)."""
        return await self._queue.enqueue(event_type, token_set_id, provider, **fields)

    # ---- the dispatcher ---------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver what is due, sleep until the next is due (or :meth:`enqueue` wakes it)."""
        task_status.started()
        async with anyio.create_task_group() as tg:
            while True:
                self._wake = anyio.Event()
                delay = POLL_INTERVAL
                try:
                    await self._expand()
                    free = CONCURRENCY - self._active
                    now = self.clock.wall()
                    # Only as many as can start now: a claim must not lapse while it waits.
                    claimed = (
                        await self.store.claim_hook_deliveries(
                            now=now, until=now + self._claim_for(), limit=free
                        )
                        if free
                        else []
                    )
                    for delivery in claimed:
                        self._active += 1
                        tg.start_soon(self._deliver_one, delivery)
                    if claimed and len(claimed) == free:
                        # Full: a finishing delivery wakes us.
                        await self._wake.wait()
                        continue
                    # (refresherd_hook_queue is database-wide: the exporting daemon counts it.)
                    next_at = await self.store.next_hook_due()
                    if next_at is not None:
                        delay = min(max(next_at - self.clock.wall(), 0.0), POLL_INTERVAL)
                except StoreError as exc:
                    self.metrics.storage_errors.inc()
                    log.warning("cannot read the hook queue", error=str(exc))
                with anyio.move_on_after(delay):
                    await self._wake.wait()

    async def _expand(self) -> None:
        """Take the events queued by any process into the delivery queue, for our targets."""
        targets = self.targets()
        if not targets:
            return  # taking them would drop them: leave them to a daemon that delivers
        while (
            await self.store.expand_events(
                targets=targets,
                event_types=self.config.events,
                now=self.clock.wall(),
                limit=EXPAND_BATCH,
            )
            == EXPAND_BATCH
        ):
            pass

    def _claim_for(self) -> float:
        return max(self.config.webhook_timeout, self.config.command_timeout) + CLAIM_MARGIN

    async def _deliver_one(self, delivery: HookDelivery) -> None:
        try:
            try:
                if delivery.target == "webhook":
                    await self._post(delivery)
                else:
                    await self._run_command(delivery)
            except DeliveryFailed as exc:
                await self._failed(delivery, str(exc))
            else:
                await self.store.hook_delivered(delivery.id, now=self.clock.wall())
                self.metrics.hook_deliveries.labels(delivery.target, "delivered").inc()
                log.info(
                    "notification delivered",
                    target=delivery.target,
                    event_type=delivery.event_type,
                    event_id=delivery.event_id,
                    attempt=delivery.attempts,
                )
        except StoreError as exc:
            # The claim lapses and the delivery is tried again: at least once.
            self.metrics.storage_errors.inc()
            log.warning("cannot record a notification attempt", error=str(exc))
        finally:
            self._active -= 1
            self._wake.set()

    async def _failed(self, delivery: HookDelivery, error: str) -> None:
        now = self.clock.wall()
        retry_at = policy.hook_retry_at(
            attempts=delivery.attempts,
            created_at=delivery.created_at,
            now=now,
            initial=self.config.backoff_initial,
            maximum=self.config.backoff_max,
            give_up_after=self.config.give_up_after,
            rand=self.rng.random(),
        )
        await self.store.hook_failed(delivery.id, error=error, next_attempt_at=retry_at, now=now)
        outcome = "failed" if retry_at is not None else "given_up"
        self.metrics.hook_deliveries.labels(delivery.target, outcome).inc()
        fields = {
            "target": delivery.target,
            "event_type": delivery.event_type,
            "event_id": delivery.event_id,
            "attempt": delivery.attempts,
            "error": error,
        }
        if retry_at is None:
            log.error("notification given up", **fields)
        else:
            log.warning(
                "notification failed, will retry", retry_in=round(retry_at - now, 1), **fields
            )
        if retry_at is not None:
            self._wake.set()

    async def _post(self, delivery: HookDelivery) -> None:
        url = self.config.webhook_url
        assert url is not None
        body = delivery.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "refresherd-hooks/0.1",
            "X-Refresherd-Event": delivery.event_type,
            "X-Refresherd-Event-Id": delivery.event_id,
        }
        if self.config.webhook_secret is not None:
            headers[SIGNATURE_HEADER] = signature(
                self.config.webhook_secret.reveal().encode(), body
            )
        timeout = self.config.webhook_timeout
        try:
            with anyio.fail_after(timeout + 1.0):
                response = await self._client.post(
                    url, content=body, headers=headers, timeout=timeout
                )
        except (httpx.HTTPError, TimeoutError) as exc:
            raise DeliveryFailed(f"webhook: {type(exc).__name__}") from None
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"webhook: HTTP {response.status_code}")

    async def _run_command(self, delivery: HookDelivery) -> None:
        command = list(self.config.command)
        try:
            with anyio.fail_after(self.config.command_timeout):
                result = await anyio.run_process(
                    command,
                    input=delivery.payload.encode() + b"\n",
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
        except TimeoutError:
            raise DeliveryFailed(
                f"command: still running after {self.config.command_timeout:g}s, killed"
            ) from None
        except OSError as exc:
            raise DeliveryFailed(f"command: cannot run {command[0]}: {exc.strerror}") from None
        if result.returncode != 0:
            raise DeliveryFailed(f"command: exit status {result.returncode}")
