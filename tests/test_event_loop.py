"""`refresherd run` picks uvloop where it is installed, asyncio's loop when told to."""

from __future__ import annotations

import importlib.util

from refresherd.cli.run import use_uvloop


def test_uvloop_where_installed_unless_asyncio_is_asked_for() -> None:
    installed = importlib.util.find_spec("uvloop") is not None
    assert use_uvloop({}) is installed
    assert use_uvloop({"REFRESHERD_EVENT_LOOP": "uvloop"}) is installed
    assert use_uvloop({"REFRESHERD_EVENT_LOOP": " AsyncIO "}) is False
