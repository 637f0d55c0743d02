"""Which token sets are due, handed to the refresher under a concurrency limit.

The database is the queue: a due-time index, batched claims of at most as many rows as there
are free slots, and a sleep until the next planned refresh. The slots are each provider's
adaptive limit (refresherd.concurrency, fed by the refresher with the IdP's answer times),
under [daemon] concurrency for the whole process: a provider at its limit is left out of the
claim. With several providers one claim may lease up to the roomiest provider's free slots of
another's rows (the claim cannot say how many of each): a provider's limit may be overrun by
one batch, and its hard caps (``max_concurrent_refreshes``, ``max_requests_per_second``,
refresherd.throttle) still hold exactly. A refresh started elsewhere in this
process (the token API, the CLI path) shares the refresher's single-flight; another process is
kept out by the lease.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Final

import anyio
import anyio.abc

from refresherd.clock import Clock
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import TokenSet
from refresherd.refresh.leases import Leases
from refresherd.refresh.providers import Providers
from refresherd.refresh.refresher import Refresher
from refresherd.refresh.storage import StorageWatch
from refresherd.store import StoreError, TokenStore

log = get_logger("refresherd.scheduler")

# How often the owners of other leases are checked for liveness (a dead daemon's rows must be
# taken over while an IdP grace window may still be open).
REAP_INTERVAL: Final = 2.0
# How long the longest per-set grace period, read from every row, is reused by the reaper.
SET_GRACE_TTL: Final = 60.0
# How often a sleeping scheduler looks for commits by other processes (e.g. `tokens add`).
CHANGE_CHECK_INTERVAL: Final = 0.1
STORAGE_RETRY: Final = 1.0
# A fall of wall time against monotonic time by more than this, between two ticks, is a step of
# the wall clock back (NTP); slewing moves it by milliseconds at most.
CLOCK_STEP: Final = 2.0


class Scheduler:
    def __init__(
        self,
        *,
        store: TokenStore,
        refresher: Refresher,
        leases: Leases,
        storage: StorageWatch,
        metrics: Metrics,
        providers: Providers,
        poll_interval: float,
        max_grace_period: float,
        clock: Clock,
    ) -> None:
        self.store = store
        self.refresher = refresher
        # This process's owner id and lease duration, for the batched claims.
        self.leases = leases
        # The storage pause: nothing is claimed while the database refuses writes.
        self.storage = storage
        self.metrics = metrics
        # The live provider set: each provider's adaptive limit (refresherd.concurrency), their
        # ceiling (``concurrency``, the whole process's) and the circuits (a provider whose
        # circuit is open is not claimed for). A reload updates them there.
        self.providers = providers
        self.poll_interval = poll_interval
        self.max_grace_period = max_grace_period
        self.clock = clock
        self._wake = anyio.Event()
        self._stopping = False
        self._running = 0
        # Refreshes started by the scheduler, per provider (see _room).
        self._running_of: dict[str, int] = {}
        # Refreshes handed over and not yet taken up by a runner, and the runners waiting for
        # one (see _start).
        self._queue: deque[tuple[str, TokenSet | None]] = deque()
        self._idle: list[anyio.Event] = []
        self._last_reap = float("-inf")
        # (when read, the longest per-set grace period): see _open_attempts.
        self._set_grace: tuple[float, float] | None = None
        self._reading_set_grace = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._clock_offset: float | None = None
        self.storage_ok = True

    def wake(self) -> None:
        """Look at the queue now (a token set was added, a slot freed, config reloaded)."""
        self._wake.set()

    def stop(self) -> None:
        """Claim nothing more; :meth:`run` returns once the refreshes in flight have ended."""
        self._stopping = True
        self._wake.set()
        # Idle runners end; busy ones end once the queue is empty.
        while self._idle:
            self._idle.pop().set()

    @property
    def running(self) -> int:
        return self._running

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            # Before "started" (and so before /readyz says ready): from then on a clock step
            # is measured against this first reading.
            try:
                await self._notice_clock_step_back()
            except StoreError as exc:
                log.error("cannot check the database for a clock step", error=str(exc))
            task_status.started()
            await self._reap_dead_owners(tg, force=True)
            await self._recover(tg)
            while not self._stopping:
                if self.storage.paused:
                    await self._probe_storage()
                    continue
                try:
                    await self._tick(tg)
                    self.storage_ok = True
                except StoreError as exc:
                    self.storage_ok = False
                    # Logged once, by the pause it starts.
                    self.storage.failed(exc, during="scheduling")
                    await self._wait(STORAGE_RETRY)

    async def _probe_storage(self) -> None:
        """Paused (storage refused a write): claim nothing, send nothing; probe with one
        harmless write when due, and wait for the next probe (or a stop, or a wake-up)."""
        health = self.storage.health
        if health.probe_due(self.clock.monotonic()) and await self.storage.probe():
            self.storage_ok = True
            return
        if health.paused:
            await self._wait(
                min(max(health.next_probe_at - self.clock.monotonic(), 0.05), self.poll_interval)
            )

    async def _recover(
        self,
        tg: anyio.abc.TaskGroup,
        *,
        dead: set[str] | None = None,
        attempts: list[tuple[str, str]] | None = None,
    ) -> None:
        """Crash recovery: journaled attempts whose grace window may still be open go first,
        ahead of every other due set (a backlog would keep them waiting past the window). At
        start, those of every process that is gone; after a takeover, those of ``dead``
        (among ``attempts``, when the caller has just read them)."""
        try:
            if attempts is None:
                attempts = await self._open_attempts()
            for token_set_id, owner in attempts:
                if dead is not None and owner not in dead:
                    continue
                if dead is None and await self.store.owner_alive(owner):
                    continue  # in flight at a live process: its own to resolve
                log.info("recovering unresolved attempt", token_set=token_set_id, owner=owner)
                self._start(tg, token_set_id)
        except StoreError as exc:
            log.error("cannot read the journal for crash recovery", error=str(exc))

    async def _open_attempts(self) -> list[tuple[str, str]]:
        """``(id, owner)`` of the journaled attempts whose grace window may still be open."""
        # A token set may carry a grace period longer than any provider's (per-set policy).
        # Finding the longest reads every row: the reaper asks every REAP_INTERVAL, so the
        # answer is kept for SET_GRACE_TTL (a set added meanwhile is covered after that), and
        # read again beside the scheduling, not in its way (a second at a million sets).
        mono = self.clock.monotonic()
        if self._set_grace is None or self._tg is None:
            self._set_grace = (mono, await self.store.max_set_grace_period())
        elif mono - self._set_grace[0] >= SET_GRACE_TTL and not self._reading_set_grace:
            self._reading_set_grace = True
            self._tg.start_soon(self._read_set_grace, name="longest grace period")
        window = max(self.max_grace_period, self._set_grace[1])
        return await self.store.unresolved_attempts(since=self.clock.wall() - window)

    async def _read_set_grace(self) -> None:
        mono = self.clock.monotonic()
        try:
            self._set_grace = (mono, await self.store.max_set_grace_period())
        except StoreError as exc:
            # The last answer stands; asked again at the next reap.
            log.error("cannot read the longest grace period", error=str(exc))
        finally:
            self._reading_set_grace = False

    async def _tick(self, tg: anyio.abc.TaskGroup) -> None:
        await self._reap_dead_owners(tg)
        await self._notice_clock_step_back()
        now = self.clock.wall()
        blocked = self.providers.circuits.blocked(now)
        free, full = self._room(blocked)
        if free > 0:
            # Each set as read under our new lease: the refresh starts from it, unclaimed again.
            claimed = await self.store.claim_due_sets(
                owner=self.leases.owner,
                now=now,
                lease_until=self.leases.until(now),
                limit=free,
                exclude_providers=blocked + full,
            )
            for ts in claimed:
                self._start(tg, ts.id, ts)
            if len(claimed) == free:
                # Saturated: more may be due; come back when slots free.
                await self._wait_for_slots(self.poll_interval)
                return
        else:
            await self._wait_for_slots(self.poll_interval)
            return
        # Not leaving out the providers at their limit: a look past all of a big backlog's
        # rows for another provider's would read the whole index. One of them due means:
        # wait for a refresh to end (it wakes us), as when saturated.
        next_at = await self.store.next_due_at(now=now, exclude_providers=blocked)
        delay = self.poll_interval if next_at is None else next_at - self.clock.wall()
        if full and delay <= 0:
            delay = self.poll_interval
        await self._wait(min(max(delay, 0.0), self.poll_interval))

    def _room(self, blocked: list[str]) -> tuple[int, list[str]]:
        """How many sets one claim may lease now, and the providers at their adaptive limit
        (left out of it, as those whose circuit is open are)."""
        free = self.providers.concurrency - self._running
        full: list[str] = []
        roomiest = 0
        open_providers = 0
        for name in self.providers:
            limit = self.providers.limit(name).limit
            self.metrics.concurrency_limit.labels(name).set(limit)
            if name in blocked:
                continue
            open_providers += 1
            room = limit - self._running_of.get(name, 0)
            if room <= 0:
                full.append(name)
            roomiest = max(roomiest, room)
        if open_providers and not roomiest:
            # Every provider that may be claimed for is at its limit: saturated. (A claim
            # leaving them all out would look through every due row for another provider's:
            # at a million sets, seconds with the store held.)
            return 0, full
        # A row of a provider no longer configured is claimed for its outcome; otherwise no
        # claim leases more than a provider below its limit has room for.
        return (min(free, roomiest) if roomiest else free), full

    async def _notice_clock_step_back(self) -> None:
        """After a step of the wall clock back (and at start: the daemon may have been down
        when it happened), sets planned on the old clock are due at once, each refreshed once.

        A step forward needs nothing: the sets planned before it are simply due, once each.
        Sleeps and timeouts use the monotonic clock, which no step moves.
        """
        offset = self.clock.wall() - self.clock.monotonic()
        previous, self._clock_offset = self._clock_offset, offset
        if previous is not None and previous - offset <= CLOCK_STEP:
            return
        now = self.clock.wall()
        moved = await self.store.make_due_written_after(now=now, limit=now + CLOCK_STEP)
        if moved:
            log.warning(
                "wall clock stepped back: token sets planned on the old clock are due now",
                token_sets=moved,
                step=round(previous - offset, 1) if previous is not None else None,
            )

    def _start(
        self, tg: anyio.abc.TaskGroup, token_set_id: str, claimed: TokenSet | None = None
    ) -> None:
        """Hand a refresh to a runner: an idle one, else a new one in ``tg``. Runners are
        tasks that take refresh after refresh from the queue and wait when it is empty, rather
        than a task per refresh: a task's start and end (anyio's task handle, cancel scope and
        event, asyncio's task) were a measurable share of the daemon's CPU per refresh. There
        are never more than the most refreshes that ran at once (the concurrency, unless
        crash recovery added some), and they end when the scheduler stops."""
        self._running += 1
        if claimed is not None:
            self._running_of[claimed.provider] = self._running_of.get(claimed.provider, 0) + 1
        self._queue.append((token_set_id, claimed))
        if self._idle:
            self._idle.pop().set()
        else:
            tg.start_soon(self._runner, name="refresh runner")

    async def _runner(self) -> None:
        while True:
            while self._queue:
                await self._run_one(*self._queue.popleft())
            if self._stopping:
                return
            idle = anyio.Event()
            self._idle.append(idle)
            await idle.wait()

    async def _run_one(self, token_set_id: str, claimed: TokenSet | None) -> None:
        try:
            # Our task group and the refresher's are the daemon's one work group, with one
            # shutdown deadline: the flight may as well fly in this task.
            await self.refresher.refresh(
                token_set_id, scheduled=True, claimed=claimed, in_this_task=True
            )
        except Exception:
            # A fault of one token set must never stop the others.
            log.exception("refresh crashed", token_set=token_set_id)
            with contextlib.suppress(StoreError):
                await self.store.release(token_set_id, owner=self.leases.owner)
        finally:
            self._running -= 1
            if claimed is not None:
                self._running_of[claimed.provider] -= 1
            self._wake.set()

    async def _wait(self, delay: float) -> None:
        """Sleep up to ``delay``; wake early on :meth:`wake` or a commit by another process."""
        if delay <= 0:
            self._wake = anyio.Event()
            return
        deadline = self.clock.monotonic() + delay
        try:
            seen = await self.store.data_version()
        except StoreError:
            seen = None
        while not self._stopping:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                break
            with anyio.move_on_after(min(CHANGE_CHECK_INTERVAL, remaining)):
                await self._wake.wait()
                break
            if seen is not None:
                try:
                    if await self.store.data_version() != seen:
                        break
                except StoreError:
                    break
        self._wake = anyio.Event()

    async def _wait_for_slots(self, delay: float) -> None:
        """Saturated: sleep up to ``delay`` until an eighth of the slots are free (at least
        one), so that one claim statement starts several refreshes rather than one each, and
        without watching for other processes' commits (a refresh ending wakes us anyway)."""
        blocked = self.providers.circuits.blocked(self.clock.wall())
        want = max(1, min(self.providers.concurrency, self._limits(blocked)) // 8)
        deadline = self.clock.monotonic() + delay
        while not self._stopping and self._room(blocked)[0] < want:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                break
            with anyio.move_on_after(remaining):
                await self._wake.wait()
            self._wake = anyio.Event()
        self._wake = anyio.Event()

    def _limits(self, blocked: list[str]) -> int:
        """The limits of the providers that may be claimed for, together (at least one)."""
        limits = (self.providers.limit(p).limit for p in self.providers if p not in blocked)
        return max(1, sum(limits))

    async def _reap_dead_owners(self, tg: anyio.abc.TaskGroup, *, force: bool = False) -> None:
        """Take over the leases of owners that are gone, and continue at once the attempts
        they left in flight (inside the IdP's grace window). Owners are those of live leases
        and of open attempts: a process paused past its lease and then killed holds none."""
        mono = self.clock.monotonic()
        if not force and mono - self._last_reap < REAP_INTERVAL:
            return
        self._last_reap = mono
        holders = await self.store.lease_holders(now=self.clock.wall())
        attempts = await self._open_attempts()
        holders |= {owner for _, owner in attempts if owner}
        holders.discard(self.leases.owner)
        dead = {o for o in holders if not await self.store.owner_alive(o)}
        if not dead:
            return
        released = await self.store.clear_leases_of(dead)
        if released:
            log.info("took over leases of dead owners", owners=sorted(dead), token_sets=released)
        if not force:  # at start, _recover follows and takes every gone owner's attempts
            await self._recover(tg, dead=dead, attempts=attempts)
