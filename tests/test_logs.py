"""refresherd.logs: how lines reach the stream."""

from __future__ import annotations

import io
import json
import logging

from refresherd import logs
from refresherd.web import app


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


def test_an_unexpected_exception_is_logged_without_the_request_values_it_quotes() -> None:
    """web.app.HandlerFailures' scrubbing: a message that quotes a value it choked on (int()'s
    does) loses every value the request carried, header, query and body, JSON or not."""
    bearer, token, code = "api_" + "b" * 30, "rt_" + "t" * 30, "code_" + "c" * 30
    scope = {
        "headers": [(b"authorization", f"Bearer {bearer}".encode()), (b"accept", b"*/*")],
        "query_string": f"x={code}".encode(),
    }
    escaped = json.dumps({"refresh_token": token}).replace("t", "\\u0074")
    for body in (escaped.encode(), f"not json {token}".encode()):
        secrets = app.request_values(scope, body)
        for value in (bearer, token, code):
            try:
                int(value)
            except ValueError as exc:
                fields = logs.exception_fields(exc, secrets)
            assert value not in json.dumps(fields), (value, body)
            expected = "ValueError: invalid literal for int() with base 10: '[redacted]'"
            assert fields["error"] == expected
            assert "Traceback" in fields["exception"]
