"""``refresherd check-config``: the config as the daemon would load it, and whether its
database can work where the config puts it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refresherd.cli.common import configured, fail
from refresherd.settings import EX_CONFIG
from refresherd.store import location_problem


def command(args: argparse.Namespace) -> int:
    loaded = configured(args)
    if isinstance(loaded, int):
        return loaded
    path, config = loaded
    warnings = list(config.warnings)
    if isinstance(config.daemon.database, Path):
        problem = location_problem(config.daemon.database)
        if problem is not None and problem.for_everyone:
            return fail(f"{path}: daemon.database: {problem}", EX_CONFIG)
        if problem is not None:
            # Perhaps this user's alone: the daemon may run as another one.
            warnings.append(f"daemon.database: {problem} (as the user running check-config)")
    for warning in warnings:
        print(f"refresherd: warning: {warning}", file=sys.stderr)
    print(f"{path}: ok ({len(config.providers)} provider(s))")
    return 0
