"""The config loader under fuzzed input (hypothesis): any bytes, any TOML text, any values for
the known keys give a Config or a ConfigError that names the file (and the key where one is
to blame), never another exception, and never repeat an inline secret."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refresherd import config as config_module
from refresherd.config import ConfigError, load_config, parse_config
from refresherd.settings import Config

SOURCE = "fuzzed.toml"
# A value no generated text can contain by chance: if it shows up in an error, it leaked.
INLINE_SECRET = "cs_fuzz_5e1f0a9b7c3d4e2f8a6b"

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, the rest as is
    (JSON's escapes would spell astral characters as surrogate pairs, which TOML refuses)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    raise TypeError(value)


_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    # Plausible values, so that validation gets past the type checks and deeper.
    st.sampled_from(
        [
            "90s",
            "5m",
            "180d",
            "0s",
            "-1s",
            "1.5h",
            "",
            "127.0.0.1:0",
            "[::1]:9469",
            "localhost",
            "http://127.0.0.1:1/token",
            "https://idp.example/token",
            "ftp://x",
            "one_time",
            "reuse",
            "client_secret_basic",
            "client_secret_post",
            "info",
            "json",
            "visma-connect",
            "/nonexistent/secret",
            "tokens.db",
            "/",
            ".",
            "NO_SUCH_ENV_VAR",
            "a/b",
        ]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


_SECTIONS = {
    "daemon": config_module._DAEMON_KEYS,
    "server": config_module._SERVER_KEYS,
    "log": config_module._LOG_KEYS,
    "schedule": config_module._SCHEDULE_KEYS,
    "providers.idp": config_module._PROVIDER_KEYS,
    "encryption": config_module._ENCRYPTION_KEYS,
}


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A valid config with up to four keys set to fuzzed values (now and then an unknown key,
    a dropped required key or a second provider), so that every key's validation is reached."""
    doc: dict[str, dict[str, object]] = {
        "daemon": {"database": "tokens.db"},
        "providers.idp": {
            "token_url": "http://127.0.0.1:1/connect/token",
            "client_id": "client",
            "client_secret": INLINE_SECRET,
        },
    }
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(_SECTIONS)))
        key = draw(st.one_of(*[st.sampled_from(_SECTIONS[section])] * 9, st.text(max_size=12)))
        table = doc.setdefault(section, {})
        if draw(st.integers(0, 9)) == 0:
            table.pop(key, None)
        else:
            table[key] = draw(_values)
    if draw(st.integers(0, 9)) == 0:
        doc[f"providers.{_toml_string(draw(st.text(max_size=10)))}"] = dict(doc["providers.idp"])
    lines: list[str] = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _check(text: str, base_dir: Path) -> None:
    try:
        result = parse_config(text, source=SOURCE, base_dir=base_dir, env={})
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{SOURCE}"), message
        assert exc.message, "an error must say what was expected"
        if exc.key is not None:
            assert message.startswith(f"{SOURCE}: {exc.key}: "), message
        assert INLINE_SECRET not in message
        assert INLINE_SECRET not in repr(exc.args)
    else:
        assert isinstance(result, Config)
        assert INLINE_SECRET not in repr(result)


@FUZZ
@given(documents())
@example('[daemon]\ndatabase = "tokens.db"\n')
@example('[daemon]\ndatabase = "tokens.db"\nconcurrency = 1e400\n')
@example('[daemon]\ndatabase = "tokens.db"\n[providers.x]\ngrace_period = nan\n')
def test_any_values_for_the_known_keys_give_a_config_or_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        _check(text, Path(directory))


@FUZZ
@given(st.text(max_size=300))
@example("[providers.x]\nclient_secret = ")
@example("[[daemon]]\n")
@example("daemon = 3\n")
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        _check(text, Path(directory))


@FUZZ
@given(st.binary(max_size=300))
@example(b"\xff\xfe[daemon]")
@example(b"[daemon]\ndatabase = '\xc3'\n")
def test_any_bytes_in_the_file_give_a_config_or_a_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / SOURCE
        path.write_bytes(data)
        try:
            result = load_config(path, env={})
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), str(exc)
        else:
            assert isinstance(result, Config)
