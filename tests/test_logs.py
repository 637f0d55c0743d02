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


class _Shown:
    def __structlog__(self) -> dict[str, int]:
        return {"shown": 1}


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def test_a_json_line_is_what_structlogs_json_renderer_writes() -> None:
    """logs.render_json keeps one encoder for every line; what it writes is structlog's
    JSONRenderer's, byte for byte, for every kind of value a line holds."""
    import structlog

    event = {
        "event": "refresh",
        "token_set": "ts-é-1",
        "outcome": "refreshed",
        "duration": 0.0123,
        "attempt": 2,
        "ok": True,
        "detail": None,
        "nested": {"a": [1, 2.5, "x"]},
        "custom": _Shown(),
        "other": _Opaque(),
        "big": 10**30,
        "nan": float("nan"),
    }
    expected = structlog.processors.JSONRenderer()(None, "info", dict(event))
    assert logs.render_json(None, "info", dict(event)) == expected
    assert json.loads(expected.replace("NaN", "null"))["other"] == "<opaque>"
