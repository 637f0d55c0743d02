"""Where the token sets live, as a config file or a command line names it: a SQLite file (a
path) or a PostgreSQL database (a libpq URL whose password is never shown). Imports the model
alone (no backend, not the contract), so that the configuration types (``settings``), the
config loader and ``check-config`` can use it without loading a database driver; what is wrong
with a SQLite path before SQLite is asked is the contract's ``location_problem``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from refresherd.model import Secret

__all__ = [
    "Location",
    "PostgresLocation",
    "has_password",
    "parse_location",
    "postgres_location",
]


@dataclass(frozen=True, slots=True)
class PostgresLocation:
    """A PostgreSQL database: ``dsn`` as libpq takes it (it may hold a password, so it is a
    Secret and never printed), ``display`` the same URL without the password."""

    dsn: Secret
    display: str

    def __str__(self) -> str:
        return self.display


# Where the token sets live: a SQLite file, or a PostgreSQL database.
Location = Path | PostgresLocation

_POSTGRES_SCHEMES = ("postgresql", "postgres")


def parse_location(text: str, *, base_dir: Path, password: Secret | None = None) -> Location:
    """A database location as written in a config file or on the command line.

    ``postgresql://user@host:port/dbname?sslmode=require`` (libpq's URL; ``postgres://`` too)
    names a PostgreSQL database; ``password``, when given, is put into it. ``sqlite:///abs/path``
    or a plain path (relative to ``base_dir``) names a SQLite file. ValueError says what is wrong.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        if not text.strip():
            raise ValueError("expected a SQLite file path or a postgresql:// URL, got nothing")
        return base_dir / text
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                "expected sqlite:// followed by an absolute path, such as "
                "sqlite:///var/lib/refresherd/tokens.db"
            )
        return Path(rest)
    if scheme not in _POSTGRES_SCHEMES:
        raise ValueError(
            f"unknown database scheme {scheme!r}: expected a SQLite path, sqlite:///path or "
            "postgresql://user@host/dbname"
        )
    userinfo, authority_on = _split_userinfo(rest)
    parts = urlsplit(f"{scheme}://{authority_on}")
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        raise ValueError("the postgresql:// URL has a port that is not a number") from None
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError("the postgresql:// URL names no host, such as postgresql://user@host/db")
    raw_user, colon, raw_password = (userinfo or "").partition(":")
    user = unquote(raw_user)
    if password is not None:
        userinfo_out = f"{quote(user, safe='')}:{quote(password.reveal(), safe='')}@"
    elif colon:
        userinfo_out = f"{quote(user, safe='')}:{quote(unquote(raw_password), safe='')}@"
    else:
        userinfo_out = f"{quote(user, safe='')}@" if user else ""
    dsn = urlunsplit((parts.scheme, userinfo_out + parts.netloc, parts.path, parts.query, ""))
    shown = f"{quote(user, safe='')}@" if user else ""
    display = urlunsplit((parts.scheme, shown + parts.netloc, parts.path, "", ""))
    return PostgresLocation(dsn=Secret(dsn), display=display)


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """Split what follows ``postgresql://`` into the user[:password] part and the rest.

    As libpq does, the user and password end at an '@' before the first '/', so a password
    may hold '?', '#' or '@' unencoded (urlsplit would cut it at '?' or '#' and put half of it
    into the host shown in logs). A '/' in it cannot be told from the database path: refused,
    without echoing the URL."""
    head = rest.split("/", 1)[0]
    userinfo, at, _ = head.rpartition("@")
    if at:
        return userinfo, rest[len(userinfo) + 1 :]
    if "@" in rest.split("?", 1)[0]:
        raise ValueError(
            "the postgresql:// URL has an '@' after a '/': a '/' in the user name or password "
            "must be written %2F (or put the password in database_password_file); "
            "the URL is not shown, it may hold a password"
        )
    return None, rest


def has_password(text: str) -> bool:
    """Does this database URL carry a password itself (rather than from a file)?"""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _POSTGRES_SCHEMES:
        return False
    try:
        userinfo, authority_on = _split_userinfo(rest)
    except ValueError:
        return False  # parse_location says what is wrong
    query = urlsplit(f"{scheme}://{authority_on}").query
    in_query = any(k.strip().lower() == "password" for k, _ in parse_qsl(query))
    return ":" in (userinfo or "") or in_query


def postgres_location(url: str) -> PostgresLocation:
    """A PostgreSQL location from a libpq URL (the password, if any, stays in the DSN)."""
    location = parse_location(url, base_dir=Path())
    if not isinstance(location, PostgresLocation):
        raise ValueError("expected a postgresql:// URL")
    return location
