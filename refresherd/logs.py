"""structlog setup: JSON lines off a TTY, readable lines on one; secrets redacted on the way out."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from refresherd.model import Secret

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Keys whose value is a secret whatever its type: redacted even if a str slipped through.
_SECRET_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "token",
        "password",
        "authorization",
        "secret",
        "code",
        "code_verifier",
    }
)
REDACTED = "[redacted]"


# Whether a key names a secret (lowercased, in _SECRET_KEYS), per key seen: a line's keys are
# few and recur, and the lookup is cheaper than lowering each key of every line.
_secret_key: dict[str, bool] = {}


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: no Secret, and nothing under a secret-sounding key, is rendered."""
    secret_key = _secret_key
    redact = None
    for key, value in event.items():
        is_secret = secret_key.get(key)
        if is_secret is None:
            is_secret = secret_key[key] = key.lower() in _SECRET_KEYS
            if len(secret_key) > 10_000:  # keys made from data: never grow without bound
                secret_key.clear()
        if is_secret or isinstance(value, Secret):
            redact = [key] if redact is None else [*redact, key]
    if redact is not None:
        for key in redact:
            event[key] = REDACTED
    return event


# (second, its ISO 8601 text): the timestamp's date and time are formatted once a second.
_this_second: tuple[int, str] = (-1, "")


def add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``timestamp``, as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``2026-12-06T05:59:25.431543Z``, no fraction at a whole second) at a sixth of the cost:
    it was a third of a log line's."""
    global _this_second
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    if second != _this_second[0]:
        _this_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    micros = nanos // 1000
    text = _this_second[1]
    event["timestamp"] = f"{text}.{micros:06d}Z" if micros else f"{text}Z"
    return event


def _json_fallback(value: Any) -> Any:
    """A value JSON has no form for, as structlog's JSONRenderer writes it: its
    ``__structlog__()`` where it has one, else its repr."""
    render = getattr(value, "__structlog__", None)
    return render() if callable(render) else repr(value)


# One encoder for every line: json.dumps with a ``default`` (what structlog's JSONRenderer
# passes) builds a new JSONEncoder per call, a measurable part of the line every refresh logs.
_ENCODER = json.JSONEncoder(default=_json_fallback)


def render_json(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    """The event as one line of JSON, as ``structlog.processors.JSONRenderer()`` renders it."""
    return _ENCODER.encode(event)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` replaced, longest first."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def exception_fields(exc: BaseException, secrets: Iterable[str]) -> dict[str, str]:
    """``error`` (type and message) and ``exception`` (the traceback) of an unexpected
    exception, for a log line, with ``secrets`` scrubbed out: a message may quote the value
    it choked on (``int()``'s does), and for an exception nobody expected, no value was
    vetted. Frames show source lines, never local values."""
    secrets = list(secrets)
    message = "".join(traceback.format_exception_only(exc)).strip()
    return {
        "error": scrub(message, secrets),
        "exception": scrub("".join(traceback.format_exception(exc)), secrets),
    }


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = render_json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_timestamp,
        redact_secrets,
        structlog.processors.format_exc_info,
    ]
    global _generation
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        # One write per line (PrintLogger's print() makes two: the text, then the newline), so
        # that processes sharing stderr ([daemon] workers) never interleave inside a line.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _generation += 1
    # Libraries that use stdlib logging (uvicorn, asyncio) are rendered the same way, so that
    # a JSON log stays one JSON object per line.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root.addHandler(handler)
    root.setLevel(max(LEVELS.get(level, logging.INFO), logging.WARNING))


# Bumped by configure() and reset(): a _Logger rebuilds its bound logger when it changes.
_generation = 0


class _Logger:
    """A module's logger. structlog's lazy proxy builds a new bound logger on every call (so
    that a later configure() reaches loggers made at import); this one builds it once per
    configure(): at a log line per refresh, the rebuild was a measurable share of the
    daemon's CPU."""

    __slots__ = ("_bound", "_built_for", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._built_for = -1

    def __getattr__(self, attr: str) -> Any:
        if self._built_for != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._built_for = _generation
        return getattr(self._bound, attr)


def reset() -> None:
    """structlog's defaults again (tests), for loggers already made too."""
    global _generation
    structlog.reset_defaults()
    _generation += 1


def get_logger(name: str = "refresherd") -> Any:
    return _Logger(name)
