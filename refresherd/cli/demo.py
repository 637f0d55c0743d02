"""``refresherd demo``: the daemon against the built-in fake IdP on loopback (no config)."""

from __future__ import annotations

import argparse

import anyio

from refresherd import logs
from refresherd.demo import run_demo


def command(args: argparse.Namespace) -> int:
    logs.configure("info", "auto")
    return anyio.run(
        lambda: run_demo(
            token_sets=args.token_sets,
            lifetime=args.lifetime,
            listen=args.listen,
            duration=args.duration,
        )
    )
