"""``refresherd migrate``: a whole database moved to another store (refresherd.migrate)."""

from __future__ import annotations

import argparse
from pathlib import Path

import anyio

from refresherd import logs
from refresherd.cli.common import EX_FAILURE, EX_NOINPUT, EX_TEMPFAIL, EX_USAGE, fail
from refresherd.migrate import MigrateRefused, migrate
from refresherd.model import Secret
from refresherd.store import Location, StoreError, has_password, parse_location


def command(args: argparse.Namespace) -> int:
    locations: list[Location] = []
    for flag, text, password_file in (
        ("--from", args.source, args.from_password_file),
        ("--to", args.target, args.to_password_file),
    ):
        if has_password(text):
            # argv is visible to every user of the machine (ps, /proc).
            return fail(
                f"migrate: {flag}: the URL holds a password, which must not be on the command "
                f"line: use {flag}-password-file, PGPASSWORD or ~/.pgpass",
                EX_USAGE,
            )
        password = None
        if password_file is not None:
            try:
                with open(password_file, encoding="utf-8") as f:
                    password = Secret(f.read().strip())
            except OSError as exc:
                return fail(
                    f"migrate: {flag}-password-file {password_file}: {exc.strerror}", EX_NOINPUT
                )
        try:
            locations.append(parse_location(text, base_dir=Path.cwd(), password=password))
        except ValueError as exc:
            return fail(f"migrate: {flag}: {exc}", EX_USAGE)
    source, target = locations
    if str(source) == str(target):
        return fail("migrate: --from and --to name the same database", EX_USAGE)
    logs.configure("warning", "auto")
    try:
        report = anyio.run(migrate, source, target)
    except MigrateRefused as exc:
        return fail(f"migrate: {exc}", EX_TEMPFAIL)
    except StoreError as exc:
        return fail(f"migrate: {exc}", EX_FAILURE)
    for table, count in report.moved.items():
        print(f"moved {count} row(s) of {table}")
    print(f"verified: {target} holds what {source} holds")
    return 0
