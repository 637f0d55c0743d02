"""The providers' live set: what a refresh needs of its provider, replaced as a whole on reload.

Per provider: its settings (``ProviderConfig``), its :class:`TokenEndpoint`, its throttle
(politeness), its circuit, its recent answer times (the pace a grace window is planned with)
and its budget of hedged sends; and the schedule every refresh is planned by. The daemon builds
one from the config and hands it to the refresher, the scheduler (the circuits: which providers
not to claim for) and the token API (which providers exist, their endpoints for an exchange or a
revocation); a reload (SIGHUP) replaces the settings and endpoints here, in one place. A refresh
in flight keeps the settings and the endpoint it started with. What is learned per provider
(circuits, answer times, hedge budgets, a throttle whose limits did not change) outlives a
reload.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

from refresherd.concurrency import GradientLimit
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.latency import AnswerTimes, HedgeBudget
from refresherd.refresh.circuits import ProviderCircuits
from refresherd.settings import AUTO_CONCURRENCY, ProviderConfig, ScheduleConfig
from refresherd.throttle import ProviderThrottle, Throttles


class Providers:
    """The providers' live set; see the module docstring."""

    def __init__(
        self,
        providers: Mapping[str, ProviderConfig],
        endpoints: Mapping[str, TokenEndpoint],
        schedule: ScheduleConfig,
        *,
        concurrency: int = AUTO_CONCURRENCY,
        far_concurrency: int | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configs = dict(providers)
        self._endpoints = dict(endpoints)
        self.schedule = schedule
        # [daemon] concurrency (its ceiling): each provider's adaptive limit stays below it;
        # with "auto", a distant provider's may rise up to far_concurrency (see concurrency).
        self._concurrency = concurrency
        self._far_concurrency = far_concurrency
        self._monotonic = monotonic
        self._limits: dict[str, GradientLimit] = {}
        # Refreshes of each provider past its throttle, sending or about to (the limit's
        # "in use").
        self.sending: defaultdict[str, int] = defaultdict(int)
        self.circuits = ProviderCircuits()
        self._throttles = Throttles()
        # Per provider, made at its first refresh.
        self._answer_times: defaultdict[str, AnswerTimes] = defaultdict(AnswerTimes)
        self._hedge_budgets: defaultdict[str, HedgeBudget] = defaultdict(HedgeBudget)

    def reconfigure(
        self,
        *,
        providers: Mapping[str, ProviderConfig],
        endpoints: Mapping[str, TokenEndpoint],
        schedule: ScheduleConfig,
        concurrency: int | None = None,
        far_concurrency: int | None = None,
    ) -> None:
        """Take a reloaded config. In-flight refreshes keep what they started with; the
        adaptive limits keep what they learned, within their new ceilings."""
        self._configs = dict(providers)
        self._endpoints = dict(endpoints)
        self.schedule = schedule
        if concurrency is not None:
            self._concurrency = concurrency
            self._far_concurrency = far_concurrency
        for name in list(self._limits):
            if name in self._configs:
                self._limits[name].set_ceiling(self._ceiling(name), self._far_ceiling(name))
            else:
                del self._limits[name]

    @property
    def concurrency(self) -> int:
        """The most refreshes in flight in this process: [daemon] concurrency, or with "auto"
        the limit of a distant provider that has grown past it (GradientLimit.reach) while
        that provider has refreshes out: one gone quiet gives the room back."""
        if self._far_concurrency is None:
            return self._concurrency
        sending = self.sending
        return max(
            [
                self._concurrency,
                *(
                    limit.limit
                    for name, limit in self._limits.items()
                    if limit.limit > limit.ceiling and sending.get(name)
                ),
            ]
        )

    def __contains__(self, name: object) -> bool:
        return name in self._configs

    def __iter__(self) -> Iterator[str]:
        return iter(self._configs)

    def config(self, name: str) -> ProviderConfig | None:
        return self._configs.get(name)

    def endpoint(self, name: str) -> TokenEndpoint | None:
        return self._endpoints.get(name)

    @property
    def endpoints(self) -> Mapping[str, TokenEndpoint]:
        """Every provider's endpoint by name (the daemon closes the ones a reload retires)."""
        return self._endpoints

    def throttle(self, provider: ProviderConfig) -> ProviderThrottle | None:
        """The provider's throttle, None when it sets no limit (refresherd.throttle)."""
        return self._throttles.of(provider)

    def limit(self, provider: str) -> GradientLimit:
        """The provider's adaptive limit on refreshes in flight (refresherd.concurrency)."""
        limit = self._limits.get(provider)
        if limit is None:
            limit = GradientLimit(
                ceiling=self._ceiling(provider),
                far_ceiling=self._far_ceiling(provider),
                now=self._monotonic(),
            )
            self._limits[provider] = limit
        return limit

    def _ceiling(self, provider: str) -> int:
        return self._capped(provider, self._concurrency)

    def _far_ceiling(self, provider: str) -> int | None:
        if self._far_concurrency is None or provider not in self._configs:
            return None
        return self._capped(provider, self._far_concurrency)

    def _capped(self, provider: str, ceiling: int) -> int:
        """``ceiling``, under the provider's ``max_concurrent_refreshes`` where it has one."""
        config = self._configs.get(provider)
        if config is None or config.max_concurrent_refreshes is None:
            return ceiling
        return min(ceiling, config.max_concurrent_refreshes)

    def answer_times(self, provider: str) -> AnswerTimes:
        """The provider's recent answer times (its pace, for planning grace-window sends)."""
        return self._answer_times[provider]

    def hedge_budget(self, provider: str) -> HedgeBudget:
        """The provider's budget of hedged sends (a share of its sends)."""
        return self._hedge_budgets[provider]
