"""What the command handlers share: exit codes, the one error line, the config, and the run of a
one-shot command against the store (a database problem is an exit code, not a traceback)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVarTuple

import anyio

from refresherd import logs
from refresherd.config import ConfigProblems, load_config, resolve_config_path
from refresherd.settings import EX_CONFIG, Config, ConfigError
from refresherd.store import DatabaseMisconfigured, StoreError

EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOINPUT: Final = 66
EX_TEMPFAIL: Final = 75
EX_FAILURE: Final = 1

Ts = TypeVarTuple("Ts")


def fail(message: str, code: int) -> int:
    print(f"refresherd: {message}", file=sys.stderr)
    return code


def configured(args: argparse.Namespace) -> tuple[Path, Config] | int:
    """The config file's path and its config, or the exit code of a configuration error
    (already reported)."""
    try:
        path = resolve_config_path(args.config, os.environ)
        return path, load_config(path)
    except ConfigProblems as many:
        # One line each, as one problem is reported, so that each names file and key.
        for problem in many.problems:
            fail(str(problem), EX_CONFIG)
        return EX_CONFIG
    except ConfigError as exc:
        return fail(str(exc), EX_CONFIG)


def one_shot(
    config: Config,
    func: Callable[[*Ts], Awaitable[int]],
    *args: *Ts,
    level: str = "warning",
) -> int:
    """Run ``func`` as a one-shot command: logs at ``level`` to stderr, results to stdout; a
    database the config misplaces exits 78, any other storage failure 1."""
    logs.configure(level, config.log.format)
    try:
        return anyio.run(func, *args)
    except DatabaseMisconfigured as exc:
        return fail(str(exc), EX_CONFIG)
    except StoreError as exc:
        return fail(str(exc), EX_FAILURE)
