"""``refresherd run``: the daemon (and, with ``--worker``, one of its worker processes)."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
from collections.abc import Mapping
from typing import Final

import anyio

from refresherd import logs
from refresherd.cli.common import configured, fail
from refresherd.daemon import Daemon
from refresherd.settings import EX_CONFIG
from refresherd.workers import PRIMARY_DATABASE_ENV, worker_config

# Objects the cyclic garbage collector lets the youngest generation grow by before it runs.
YOUNG_COLLECTION: Final = 50_000


def command(args: argparse.Namespace) -> int:
    loaded = configured(args)
    if isinstance(loaded, int):
        return loaded
    path, config = loaded
    logs.configure(config.log.level, config.log.format)
    worker = None
    if args.worker is not None:
        try:
            worker, config = worker_config(
                config, args.worker, os.environ.get(PRIMARY_DATABASE_ENV)
            )
        except ValueError as exc:
            return fail(f"{path}: {exc}", EX_CONFIG)
    # What start-up made (modules, config) lives as long as the process: out of the
    # collector's sight, so that its full collections, which walk every object it tracks,
    # do not walk them too. Measured at 1,500 refreshes/s: the collector's share of the
    # daemon's CPU from 19 % to 14 % (docs/benchmarks.md, "The garbage collector").
    gc.freeze()
    # A successful refresh leaves nothing for the collector (tests/test_refresher.py; a failed
    # connection leaves about 14 objects, its closed transport and socket), yet with hundreds
    # in flight its objects outlive Python's young collections (every 700 objects), are
    # promoted and walked again and again. A collection every YOUNG_COLLECTION objects
    # instead: over 20,000 refreshes, 2,490 collections and 14 % of the daemon's CPU before,
    # fewer than five after (docs/benchmarks.md; Python 3.11, the image's: 3.14's incremental
    # collector reads the threshold differently, and was not measured).
    gc.set_threshold(YOUNG_COLLECTION)
    return anyio.run(
        Daemon(config, config_path=path, worker=worker).run,
        backend_options={"use_uvloop": use_uvloop(os.environ)},
    )


def use_uvloop(env: Mapping[str, str]) -> bool:
    """uvloop where it is installed (the ``uvloop`` extra): in alternating pairs it cost about
    5 % less CPU per refresh than asyncio's loop (docs/benchmarks.md). REFRESHERD_EVENT_LOOP
    = "asyncio" keeps asyncio's (a comparison, or a platform where uvloop misbehaves)."""
    if env.get("REFRESHERD_EVENT_LOOP", "").strip().lower() == "asyncio":
        return False
    return importlib.util.find_spec("uvloop") is not None
