"""Token sets imported together must not come due together (issue #4: no thundering herd).

10,000 one-hour token sets go through ``tokens import``'s parser at one instant with seeded
draws; their planned refreshes are counted per minute. Pure: no clock, no network.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import replace

from refresherd import policy
from refresherd.intake import parse_lines
from refresherd.settings import ScheduleConfig

NOW = 1_700_000_000.0
SETS = 10_000
LIFETIME = 3600.0
MINUTES = 48  # one-hour tokens are due at 80 %: within 2,880 s of the import


def import_plans(schedule: ScheduleConfig) -> list[float]:
    text = "".join(
        json.dumps(
            {
                "id": f"ts-{i}",
                "provider": "p",
                "refresh_token": f"rt-{i}",
                "access_token": f"at-{i}",
                "expires_in": LIFETIME,
            }
        )
        + "\n"
        for i in range(SETS)
    )
    rng = random.Random(7)
    draws = iter(rng.random, None)
    items = parse_lines(
        io.StringIO(text),
        source="bulk.jsonl",
        providers={"p": object()},
        now=NOW,
        schedule=schedule,
        rand=draws,
    )
    return [item.next_refresh_at for item in items]


def busiest_minute_over_mean(plans: list[float], start: float) -> float:
    per_minute = Counter(int((t - start) // 60) for t in plans)
    return max(per_minute.values()) / (len(plans) / MINUTES)


def test_a_bulk_import_is_spread_over_the_whole_first_cycle() -> None:
    plans = import_plans(ScheduleConfig())
    assert min(plans) >= NOW
    assert max(plans) <= NOW + 2880
    assert max(plans) - min(plans) > 2850
    # Uniform: 10,000 over 48 minutes is ~208 a minute; no minute has more than 1.3x that.
    assert busiest_minute_over_mean(plans, NOW) < 1.3


def test_with_jitter_alone_a_bulk_import_comes_due_in_one_burst() -> None:
    # What import_spread = 0 gives (the plan of a single `tokens add`): 10 % jitter of a
    # 2,880 s lead is a 288 s window, so the busiest minute carries ~10x the mean.
    plans = import_plans(replace(ScheduleConfig(), import_spread=0.0))
    assert min(plans) >= NOW + 2592 and max(plans) <= NOW + 2880
    assert busiest_minute_over_mean(plans, NOW) > 5


def test_the_spread_survives_later_refreshes() -> None:
    # Each refresh plans the next one lifetime on (with its own jitter): three cycles later the
    # sets are still spread, not bunched back together.
    cfg = ScheduleConfig()
    rng = random.Random(11)
    plans = import_plans(cfg)
    for _ in range(3):
        plans = [
            policy.plan_next_refresh(
                now=t, expires_at=t + LIFETIME, lifetime=LIFETIME, cfg=cfg, rand=rng.random()
            )
            for t in plans
        ]
    start = min(plans)
    assert max(plans) - start > 2850
    assert busiest_minute_over_mean(plans, start) < 1.3


def test_a_single_token_set_is_not_moved_earlier() -> None:
    # Spreading is for imports; one `tokens add` keeps the jitter-only plan.
    plan = policy.plan_next_refresh(
        now=NOW, expires_at=NOW + LIFETIME, lifetime=LIFETIME, cfg=ScheduleConfig(), rand=0.99
    )
    assert plan >= NOW + 2592
    imported = policy.plan_imported_refresh(
        now=NOW, expires_at=NOW + LIFETIME, lifetime=LIFETIME, cfg=ScheduleConfig(), rand=0.99
    )
    assert NOW <= imported < NOW + 60
