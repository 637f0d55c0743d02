"""refresherd.logs: how lines reach the stream."""

from __future__ import annotations

import io
import json
import logging

from refresherd import logs


class _Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_log_line_is_one_write() -> None:
    """Worker processes share the primary's stderr: a line written in two pieces (text, then
    newline) interleaves with another process's line and breaks both JSON objects."""
    stream = _Writes()
    logs.configure("info", "json", stream=stream)
    try:
        logs.get_logger("t").info("refresh", outcome="refreshed", worker=1)
        logging.getLogger("asyncio").warning("from the standard library")
    finally:
        logs.configure("info", "json")
    assert len(stream.calls) == 2, stream.calls
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in stream.calls)
    assert [json.loads(call)["event"] for call in stream.calls] == [
        "refresh",
        "from the standard library",
    ]
