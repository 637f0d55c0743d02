"""One refresh of one token set, end to end, in the modules of its steps.

In the order the data flows:

- :mod:`.outcome`: what became of a refresh (:class:`~.outcome.RefreshResult`, its
  :class:`~.outcome.Outcome`).
- :mod:`.providers` and :mod:`.circuits`: the providers' live set (settings, endpoints,
  throttles, circuits, answer times, hedge budgets, the schedule), replaced on reload.
- :mod:`.storage`: is the database taking writes (the pause, its probes, the grants held).
- :mod:`.leases`: this process's leases on rows, claimed, renewed and released.
- :mod:`.flights`: single-flight: one refresh of a set in the air, joined by later callers.
- :mod:`.series`: the attempt loop: the sends of one refresh token, journaled, hedged.
- :mod:`.grants`: a received grant stored, held in memory while the database refuses it.
- :mod:`.record`: what became of a refresh, in the database, metrics, log and events.
- :mod:`.refresher`: the :class:`~.refresher.Refresher` that composes them.

The daemon (the composition root) builds the shared pieces (the providers' live set, the
storage pause, the leases, the grants) and hands them to the refresher, the scheduler and the
token API; nothing outside this package reads the refresher's state.
"""
