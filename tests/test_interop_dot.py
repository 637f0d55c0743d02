"""Interop: the real refresherd daemon against django-oauth-toolkit, an OAuth 2.0 server we did
not write.

DOT (PyPI ``django-oauth-toolkit``) runs as its own process (``django runserver``, threaded) on
loopback, with an SQLite database in the test's temporary directory. Its settings come from the
environment (tests/dot_server/settings.py), so one module serves every combination:

- rotating refresh tokens (ROTATE_REFRESH_TOKEN) with REFRESH_TOKEN_GRACE_PERIOD_SECONDS 10 and
  unset (0), each with REFRESH_TOKEN_REUSE_PROTECTION on and off (on, a consumed refresh token
  presented again revokes its whole family: a double spend cannot hide);
- refresherd's ``client_secret_post`` and ``client_secret_basic`` against DOT's hashed client
  secrets, with secrets holding characters that must be form-urlencoded for Basic;
- ``invalid_client`` after the application's secret changed, ``invalid_grant`` after DOT revoked
  a refresh token;
- SIGKILL of the daemon while refreshes are in flight, recovered through DOT's grace period.

Token sets come from DOT's password grant and reach refresherd through ``tokens import``. What
refresherd stored is judged by DOT itself: its database (is the refresh token live? is each
authorization's token family intact, with exactly one live token?) and, once the daemon has
stopped, a refresh of our own with every stored refresh token. Every token DOT mints (the ledger
of tests/dot_server/apps.py) and every client secret joins the suite's leak scan of refresherd's
output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest
from conftest import (
    DEADLINE,
    LEAKS,
    DaemonProcess,
    Daemons,
    free_port,
    import_tokens,
    metric,
    read_rows,
    run_cli,
    wait_until,
    write_config,
    write_secret,
)

pytest.importorskip(
    "django",
    reason="Django is not installed; it comes with the test extra: pip install -e '.[test]'",
)
# 3.0 brought REFRESH_TOKEN_REUSE_PROTECTION and refresh-token families.
pytest.importorskip(
    "oauth2_provider",
    minversion="3.0",
    reason="django-oauth-toolkit>=3.0 is not installed; it comes with the test extra",
)

TESTS_DIR = Path(__file__).resolve().parent
# DOT's ACCESS_TOKEN_EXPIRE_SECONDS: refresherd refreshes such a token about every 9-10 s.
ACCESS_TTL = 20
SOAK_SECONDS = 50.0
# Version 1 is the imported grant, each refresh adds one: at least three refreshes per set.
SOAK_MIN_VERSION = 4
USERS_PER_CLIENT = 5
KINDS = ("post", "basic")
# tests/dot_server/apps.py logs every token request DOT answered, with its grant type and status.
TOKEN_ANSWER = re.compile(r"token endpoint: grant_type=(\S+) status=(\d{3})")

# Run inside DOT's environment (``python -c``): users and confidential applications, from a JSON
# spec on stdin. Saving an application hashes its secret (DOT's default hash_client_secret=True);
# an existing application just gets the new secret.
SEED = """
import json, sys
import django
django.setup()
from django.contrib.auth import get_user_model
from oauth2_provider.models import get_application_model
spec = json.load(sys.stdin)
User = get_user_model()
Application = get_application_model()
for name, password in spec.get("users", {}).items():
    User.objects.create_user(name, password=password)
for client_id, secret in spec.get("applications", {}).items():
    app, _ = Application.objects.get_or_create(
        client_id=client_id,
        defaults={
            "name": client_id,
            "client_type": Application.CLIENT_CONFIDENTIAL,
            "authorization_grant_type": Application.GRANT_PASSWORD,
        },
    )
    app.client_secret = secret
    app.save()
    app.refresh_from_db()
    assert app.hash_client_secret and app.client_secret != secret, "secret not hashed"
"""


def dot_env(db: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env["DJANGO_SETTINGS_MODULE"] = "dot_server.settings"
    env["DOT_DB"] = str(db)
    env.update(extra)
    return env


def run_python(env: dict[str, str], *argv: str, stdin: str = "") -> None:
    proc = subprocess.run(
        [sys.executable, *argv],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )
    assert proc.returncode == 0, f"{argv[:3]} failed:\n{proc.stdout}\n{proc.stderr}"


def new_client_secret() -> str:
    # '+', '%', ':', '/', '=' and '&' must survive form-urlencoding (post) and RFC 6749 2.3.1's
    # urlencode-then-Basic (DOT decodes Basic credentials with unquote_plus).
    return f"dot+{os.urandom(10).hex()}%2B:/={os.urandom(6).hex()}&x"


def checksum(token: str) -> str:
    """DOT finds a token by the SHA-256 of its value (also when it stores no plaintext)."""
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------- DOT, seeded once


@dataclass
class DotClient:
    """One confidential DOT application, authenticating the way ``kind`` says."""

    kind: str  # "post" | "basic"
    client_id: str
    secret: str
    secret_file: Path

    @property
    def auth_method(self) -> str:
        return f"client_secret_{self.kind}"

    def authenticate(self, form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        if self.kind == "post":
            return {**form, "client_id": self.client_id, "client_secret": self.secret}, {}
        pair = f"{quote_plus(self.client_id)}:{quote_plus(self.secret)}"
        return form, {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


@dataclass
class DotBase:
    """A migrated, seeded DOT database that every server of this module starts from a copy of."""

    db: Path
    users: dict[str, str]
    clients: dict[str, DotClient]


@pytest.fixture(scope="module")
def dot_base(tmp_path_factory: pytest.TempPathFactory) -> DotBase:
    directory = tmp_path_factory.mktemp("dot-base")
    db = directory / "base.sqlite3"
    env = dot_env(db)
    run_python(env, "-m", "django", "migrate", "--noinput", "-v", "0")
    users = {f"customer-{i:02d}": "pw-" + os.urandom(8).hex() for i in range(USERS_PER_CLIENT)}
    clients: dict[str, DotClient] = {}
    for kind in KINDS:
        secret = new_client_secret()
        secret_file = write_secret(directory / f"{kind}.client-secret", secret)
        clients[kind] = DotClient(kind, f"refresherd-{kind}", secret, secret_file)
    spec = {"users": users, "applications": {c.client_id: c.secret for c in clients.values()}}
    run_python(env, "-c", SEED, stdin=json.dumps(spec))
    return DotBase(db, users, clients)


# --------------------------------------------------------------------------- one DOT server


class DotServer:
    """``python -m django runserver`` (threaded) serving DOT on loopback, on a copy of the base
    database, with its OAUTH2_PROVIDER settings from the environment."""

    def __init__(
        self,
        directory: Path,
        base: DotBase,
        *,
        grace: int,
        reuse_protection: bool,
        access_ttl: int = ACCESS_TTL,
        response_delay: float = 0.0,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.grace = grace
        self.db = directory / "dot.sqlite3"
        self.ledger = directory / "dot-ledger.txt"
        self.log_path = directory / "dot.log"
        source = sqlite3.connect(base.db)
        target = sqlite3.connect(self.db)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        self.env = dot_env(
            self.db,
            DOT_ACCESS_TOKEN_SECONDS=str(access_ttl),
            DOT_GRACE_SECONDS=str(grace),
            DOT_REUSE_PROTECTION="1" if reuse_protection else "0",
            DOT_LEDGER=str(self.ledger),
            DOT_RESPONSE_DELAY=str(response_delay),
        )
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def launch(self) -> None:
        self.port = free_port()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "django",
                    "runserver",
                    f"127.0.0.1:{self.port}",
                    "--noreload",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def wait_ready(self) -> bool:
        """True once DOT answers HTTP; False if the port was taken meanwhile (launch again)."""

        def state() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return "exited"
            try:
                httpx.get(self.url("/o/token/"), timeout=5)
            except httpx.TransportError:
                return None
            return "up"

        if wait_until(state, what="django-oauth-toolkit to answer") == "up":
            return True
        if "already in use" in self.log_text():
            return False
        pytest.fail(f"DOT's runserver exited:\n{self.log_text()}")

    def start(self) -> DotServer:
        for _ in range(3):
            self.launch()
            if self.wait_ready():
                return self
        pytest.fail(f"DOT could not bind a port:\n{self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.register_issued_tokens()

    def register_issued_tokens(self) -> None:
        """Every access and refresh token DOT minted joins the leak scan."""
        if self.ledger.exists():
            for token in self.ledger.read_text(encoding="utf-8").split():
                LEAKS.add_secret(token)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def refresh_answers(self) -> Counter[int]:
        """HTTP statuses of DOT's answers to grant_type=refresh_token, counted by status
        (including answers whose client was gone before they could be written)."""
        return Counter(
            int(status)
            for grant_type, status in TOKEN_ANSWER.findall(self.log_text())
            if grant_type == "refresh_token"
        )

    # -- HTTP ---------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def token_url(self) -> str:
        return self.url("/o/token/")

    def post(self, client: DotClient, path: str, form: dict[str, str]) -> httpx.Response:
        data, headers = client.authenticate(form)
        response = httpx.post(self.url(path), data=data, headers=headers, timeout=30)
        if response.headers.get("content-type", "").startswith("application/json"):
            body = response.json()
            for key in ("access_token", "refresh_token"):
                if isinstance(body.get(key), str):
                    LEAKS.add_secret(body[key])
        return response

    def password_grant(self, client: DotClient, user: str) -> dict[str, Any]:
        response = self.post(
            client,
            "/o/token/",
            {"grant_type": "password", "username": user, "password": self.base.users[user]},
        )
        assert response.status_code == 200, (response.status_code, response.text)
        body: dict[str, Any] = response.json()
        assert body["refresh_token"] and body["expires_in"] == int(
            self.env["DOT_ACCESS_TOKEN_SECONDS"]
        )
        return body

    def refresh(self, client: DotClient, refresh_token: str) -> httpx.Response:
        return self.post(
            client, "/o/token/", {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )

    def revoke(self, client: DotClient, refresh_token: str) -> None:
        """RFC 7009 revocation through DOT's own /o/revoke_token/."""
        response = self.post(
            client,
            "/o/revoke_token/",
            {"token": refresh_token, "token_type_hint": "refresh_token"},
        )
        assert response.status_code == 200, (response.status_code, response.text)

    def set_client_secret(self, client: DotClient, secret: str) -> None:
        """The operator changes the application's secret at DOT (its admin would do the same)."""
        spec = {"applications": {client.client_id: secret}}
        run_python(self.env, "-c", SEED, stdin=json.dumps(spec))

    # -- DOT's database -----------------------------------------------------------------------

    def refresh_tokens(self) -> list[dict[str, Any]]:
        """Every refresh token row, keyed by the SHA-256 of the token (``token_checksum``;
        older DOT releases lack that column for refresh tokens: then it is computed here)."""
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            columns = {
                row["name"]
                for row in conn.execute("PRAGMA table_info(oauth2_provider_refreshtoken)")
            }
            lookup = "rt.token_checksum" if "token_checksum" in columns else "rt.token"
            rows = conn.execute(
                f"""
                SELECT {lookup} AS lookup, rt.revoked, rt.token_family, rt.access_token_id,
                       app.client_id, u.username
                FROM oauth2_provider_refreshtoken rt
                JOIN oauth2_provider_application app ON app.id = rt.application_id
                JOIN auth_user u ON u.id = rt.user_id
                """
            ).fetchall()
        finally:
            conn.close()
        tokens = []
        for row in rows:
            token = dict(row)
            lookup_value = token.pop("lookup")
            token["token_checksum"] = (
                lookup_value if lookup == "rt.token_checksum" else checksum(lookup_value)
            )
            tokens.append(token)
        return tokens


@dataclass
class TokenSetRef:
    """One token set of ours: which DOT application and user it was authorized for."""

    id: str
    client: DotClient
    user: str

    @property
    def provider(self) -> str:
        return f"dot-{self.client.kind}"


def authorize(
    server: DotServer, client: DotClient, *, users: list[str], with_access_token: bool = True
) -> tuple[list[TokenSetRef], list[dict[str, object]]]:
    """One password-grant authorization per user → refs and ``tokens import`` lines."""
    refs, lines = [], []
    for user in users:
        response = server.password_grant(client, user)
        if not with_access_token:  # due at once
            del response["access_token"], response["expires_in"]
        ref = TokenSetRef(f"{client.kind}-{user}", client, user)
        refs.append(ref)
        lines.append({"id": ref.id, "provider": ref.provider, **response})
    return refs, lines


def provider_tables(server: DotServer, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for kind in kinds:
        client = server.base.clients[kind]
        tables[f"dot-{kind}"] = {
            "token_url": server.token_url,
            "client_id": client.client_id,
            "client_secret_file": str(client.secret_file),
            "auth_method": client.auth_method,
            "refresh_token_usage": "one_time",
            "grace_period": f"{server.grace}s",
            "request_timeout": "10s",
        }
    return tables


def dot_verdict(
    server: DotServer, refs: list[TokenSetRef], rows: dict[str, dict[str, Any]]
) -> list[str]:
    """What DOT's database says of the refresh tokens refresherd stored; [] if all is well.

    For each token set: DOT knows the stored refresh token, it belongs to the right application
    and user, it is live (not revoked, bound to an access token), and it is the one live token
    of its family (the authorization): nothing lost, nothing spare, no family revoked by reuse
    protection. Also: the family holds exactly one refresh token per version refresherd stored
    (DOT minted no refresh token that refresherd then dropped).
    """
    problems: list[str] = []
    tokens = server.refresh_tokens()
    by_checksum = {t["token_checksum"]: t for t in tokens if t["revoked"] is None}
    by_checksum_any = {t["token_checksum"]: t for t in tokens}
    families: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in tokens:
        families[t["token_family"]].append(t)
    for ref in refs:
        row = rows[ref.id]
        stored = checksum(row["refresh_token"])
        dot = by_checksum.get(stored)
        if dot is None:
            known = by_checksum_any.get(stored)
            state = "unknown to DOT" if known is None else f"revoked at {known['revoked']}"
            problems.append(f"{ref.id}: the stored refresh token is {state}")
            continue
        if (dot["client_id"], dot["username"]) != (ref.client.client_id, ref.user):
            problems.append(
                f"{ref.id}: stored token belongs to {dot['client_id']}/{dot['username']}"
            )
        if dot["access_token_id"] is None:
            problems.append(f"{ref.id}: stored refresh token has no access token (orphaned)")
        family = families[dot["token_family"]]
        live = [t["token_checksum"] for t in family if t["revoked"] is None]
        if live != [stored]:
            problems.append(f"{ref.id}: family has {len(live)} live refresh tokens, not just ours")
        if len(family) != row["version"]:
            problems.append(
                f"{ref.id}: DOT minted {len(family)} refresh tokens in this authorization, "
                f"refresherd stored {row['version']} versions"
            )
    return problems


def assert_dot_accepts_stored_tokens(
    server: DotServer, refs: list[TokenSetRef], rows: dict[str, dict[str, Any]]
) -> None:
    """The final word is DOT's: a refresh of our own with every stored refresh token (only once
    no daemon runs any more) succeeds."""
    for ref in refs:
        response = server.refresh(ref.client, rows[ref.id]["refresh_token"])
        assert response.status_code == 200, (ref.id, response.status_code, response.text)
        assert response.json()["refresh_token"] != rows[ref.id]["refresh_token"]


def refreshed_counts(*daemons: DaemonProcess) -> Counter[str]:
    return Counter(
        str(e["token_set"]) for d in daemons for e in d.events("refresh", outcome="refreshed")
    )


def failure_lines(*daemons: DaemonProcess) -> list[dict[str, Any]]:
    return [line for d in daemons for line in d.events("refresh") if line["outcome"] != "refreshed"]


def metrics_matching_log(daemon: DaemonProcess, providers: list[str]) -> str:
    """/metrics at a moment when refresh_success_total equals the refreshed log lines for each
    provider (log read before and after: a refresh in progress shows as a mismatch)."""

    def counts() -> Counter[str]:
        return Counter(str(e["provider"]) for e in daemon.events("refresh", outcome="refreshed"))

    def quiet() -> str | None:
        before = counts()
        text = daemon.metrics()
        success = {
            p: metric(text, "refresherd_refresh_success_total", provider=p) for p in providers
        }
        same = before == counts() and all(success[p] == before[p] for p in providers)
        return text if same else None

    return wait_until(quiet, interval=0.1, what="refresh_success_total to match the log")


# --------------------------------------------------------------------------- the soak matrix


@dataclass
class Arm:
    """One DOT settings combination, its DOT server and the refresherd daemon keeping its token
    sets (client_secret_post and client_secret_basic) fresh."""

    name: str
    server: DotServer
    config: Path
    db: Path
    refs: list[TokenSetRef] = field(default_factory=list)
    daemon: DaemonProcess | None = None
    violations: list[str] = field(default_factory=list)
    metrics_text: str = ""
    exit_code: int | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


# name → (REFRESH_TOKEN_GRACE_PERIOD_SECONDS, REFRESH_TOKEN_REUSE_PROTECTION)
ARMS = {
    "grace10-reuse_protection": (10, True),
    "grace10-no_reuse_protection": (10, False),
    "grace0-reuse_protection": (0, True),
    "grace0-no_reuse_protection": (0, False),
}


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory, dot_base: DotBase) -> Iterator[dict[str, Arm]]:
    """All four DOT settings combinations side by side, each with its own DOT server and daemon,
    for SOAK_SECONDS and until every token set was refreshed at least three times. Violations
    seen while running (a token set not active, an access token past its expiry, a daemon gone)
    are recorded per arm and asserted by the tests below; the daemons are stopped (SIGTERM)
    before the tests look at DOT."""
    directory = tmp_path_factory.mktemp("dot-soak")
    arms: dict[str, Arm] = {}
    try:
        for name, (grace, reuse_protection) in ARMS.items():
            server = DotServer(
                directory / name, dot_base, grace=grace, reuse_protection=reuse_protection
            )
            arms[name] = Arm(
                name, server, directory / name / "refresherd.toml", directory / name / "tokens.db"
            )
            server.launch()
        for arm in arms.values():
            if not arm.server.wait_ready():
                arm.server.start()
        for arm in arms.values():
            lines: list[dict[str, object]] = []
            for kind in KINDS:
                refs, more = authorize(
                    arm.server, dot_base.clients[kind], users=sorted(dot_base.users)
                )
                arm.refs += refs
                lines += more
            write_config(arm.config, database=arm.db, providers=provider_tables(arm.server))
            import_tokens(arm.config, lines)
        for arm in arms.values():
            arm.daemon = DaemonProcess(arm.config, arm.config.parent / "daemon.log")
            arm.daemon.start(wait_listening=False)
        for arm in arms.values():
            assert arm.daemon is not None
            arm.daemon.address = arm.daemon.wait_for_address()

        def check(arm: Arm) -> None:
            assert arm.daemon is not None
            if not arm.daemon.running() and len(arm.violations) < 20:
                arm.violations.append(f"daemon exited: {arm.daemon.tail()}")
            now = time.time()
            for token_set_id, row in read_rows(arm.db).items():
                if len(arm.violations) >= 20:
                    return
                if row["state"] != "active":
                    arm.violations.append(f"{token_set_id}: {row['state']} ({row['last_error']})")
                elif row["expires_at"] is None or row["expires_at"] <= now:
                    arm.violations.append(f"{token_set_id}: access token expired")

        started = time.monotonic()
        while time.monotonic() - started < SOAK_SECONDS:
            for arm in arms.values():
                check(arm)
            time.sleep(1.0)

        def enough() -> bool:
            for arm in arms.values():
                check(arm)
            return all(
                min(row["version"] for row in read_rows(arm.db).values()) >= SOAK_MIN_VERSION
                for arm in arms.values()
            )

        wait_until(enough, interval=1.0, what=f"every token set at version {SOAK_MIN_VERSION}")
        for arm in arms.values():
            assert arm.daemon is not None
            arm.metrics_text = metrics_matching_log(arm.daemon, [f"dot-{k}" for k in KINDS])
            arm.exit_code = arm.daemon.stop()
            arm.rows = read_rows(arm.db)
        yield arms
    finally:
        for arm in arms.values():
            if arm.daemon is not None and arm.daemon.running():
                arm.daemon.kill()
            arm.server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS, ids=[f"client_secret_{k}" for k in KINDS])
@pytest.mark.parametrize("arm_name", list(ARMS))
def test_rotation_keeps_every_token_set_alive_at_dot(
    soak: dict[str, Arm], arm_name: str, kind: str
) -> None:
    arm = soak[arm_name]
    provider = f"dot-{kind}"
    refs = [ref for ref in arm.refs if ref.client.kind == kind]
    assert arm.daemon is not None
    assert len(refs) == USERS_PER_CLIENT
    assert not arm.violations, arm.violations
    assert arm.exit_code == 0, arm.daemon.tail()

    # refresherd's side: several refreshes each, no failure of any kind, nothing invalidated.
    refreshed = refreshed_counts(arm.daemon)
    for ref in refs:
        row = arm.rows[ref.id]
        assert row["state"] == "active" and row["invalid_reason"] is None, (ref.id, row)
        assert row["version"] >= SOAK_MIN_VERSION, (ref.id, row["version"])
        assert refreshed[ref.id] == row["version"] - 1 >= 2, (ref.id, refreshed[ref.id])
        assert row["last_refresh_at"] is not None and row["attempt_started_at"] is None
    problems = [line for line in failure_lines(arm.daemon) if line.get("provider") == provider]
    assert not problems, problems[:10]
    text = arm.metrics_text
    assert metric(text, "refresherd_refresh_failures_total", provider=provider) == 0
    assert metric(text, "refresherd_invalidations_total", provider=provider) == 0
    # No send again after a failure. A hedge (a second send beside one answered late: DOT on a
    # loaded machine can take over 5x its median) is allowed; each one is a logged line, and
    # DOT's verdict below shows it cost nothing.
    retries = [e for e in arm.daemon.events("refresh retry") if e.get("provider") == provider]
    assert not retries, retries[:10]
    hedges = [e for e in arm.daemon.events("refresh hedge") if e.get("provider") == provider]
    assert metric(text, "refresherd_grace_retries_total", provider=provider) == len(hedges)
    assert metric(text, "refresherd_token_sets", provider=provider, state="active") == len(refs)
    assert metric(text, "refresherd_refresh_success_total", provider=provider) >= 2 * len(refs)

    # DOT's side: it never refused a token request, and holds exactly what refresherd stored.
    statuses = arm.server.refresh_answers()
    assert set(statuses) == {200}, statuses
    assert dot_verdict(arm.server, refs, arm.rows) == []
    assert_dot_accepts_stored_tokens(arm.server, refs, arm.rows)


# --------------------------------------------------------------------------- one server each


@pytest.fixture
def dot_servers(tmp_path: Path, dot_base: DotBase) -> Iterator[Callable[..., DotServer]]:
    """``dot_servers(name, grace=…, reuse_protection=…, …)`` → a started DOT server that never
    outlives the test (its ledger of issued tokens joins the leak scan when it stops)."""
    made: list[DotServer] = []

    def make(name: str = "dot", **settings: Any) -> DotServer:
        server = DotServer(tmp_path / name, dot_base, **settings)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()


def authorize_all(
    server: DotServer, *, users: int, with_access_token: bool = True
) -> tuple[list[TokenSetRef], list[dict[str, object]]]:
    """``users`` authorizations through each of the post and basic applications."""
    refs: list[TokenSetRef] = []
    lines: list[dict[str, object]] = []
    for kind in KINDS:
        more_refs, more_lines = authorize(
            server,
            server.base.clients[kind],
            users=sorted(server.base.users)[:users],
            with_access_token=with_access_token,
        )
        refs += more_refs
        lines += more_lines
    return refs, lines


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_while_refreshing_is_recovered_through_dot_grace_period(
    tmp_path: Path, dot_servers: Callable[..., DotServer], daemons: Daemons
) -> None:
    # Short access tokens (a refresh every ~4 s per set), and DOT holds each answer 1.5 s after
    # it has rotated and committed: the window in which a crash loses a rotated token unless
    # the grace period recovers it. Reuse protection is on, so a replay outside DOT's grace
    # window would revoke the family.
    server = dot_servers(grace=10, reuse_protection=True, access_ttl=8, response_delay=1.5)
    refs, lines = authorize_all(server, users=3)
    db = tmp_path / "tokens.db"
    config = write_config(tmp_path / "c.toml", database=db, providers=provider_tables(server))
    import_tokens(config, lines)

    def rotated_but_unsaved() -> list[str]:
        """Token sets whose refresh is journaled and whose stored refresh token DOT has already
        rotated (revoked): the new one exists only in DOT's answer, not yet in our database."""
        rows = read_rows(db)
        live = {t["token_checksum"] for t in server.refresh_tokens() if t["revoked"] is None}
        return [
            i
            for i, row in rows.items()
            if row["attempt_started_at"] is not None and checksum(row["refresh_token"]) not in live
        ]

    generation = [daemons(config, "daemon-0")]
    kills_after_rotation = 0
    for _ in range(5):  # about 35 s
        # A restarted daemon first gets 4 s to finish its grace resend (about 3 s with start-up),
        # so that no chain of kills outlasts the 10 s window; then it dies at the worst moment.
        time.sleep(4.0)
        wait_until(rotated_but_unsaved, timeout=30, interval=0.05, what="a rotated, unsaved token")
        generation[-1].kill()
        kills_after_rotation += bool(rotated_but_unsaved())
        generation.append(daemons(config, f"daemon-{len(generation)}"))

    # The last daemon runs on until it has refreshed every token set and none is pending.
    last = generation[-1]
    at_start = {i: row["version"] for i, row in read_rows(db).items()}

    def settled() -> bool:
        return all(
            row["version"] > at_start[i] and row["attempt_started_at"] is None
            for i, row in read_rows(db).items()
        )

    wait_until(settled, what="every token set refreshed by the last daemon")
    text = last.metrics()
    assert last.stop() == 0
    rows = read_rows(db)

    assert len(generation) == 6
    assert kills_after_rotation >= 4, f"only {kills_after_rotation} kills after a rotation"
    recovered = [e for d in generation for e in d.events("recovering unresolved attempt")]
    assert recovered, "no restarted daemon recovered a journaled attempt"
    for ref in refs:
        row = rows[ref.id]
        assert row["state"] == "active" and row["invalid_reason"] is None, (ref.id, row)
    invalidated = [
        e for d in generation for e in d.events("refresh") if e.get("outcome") == "invalidated"
    ]
    assert not invalidated, invalidated
    assert metric(text, "refresherd_invalidations_total") == 0
    # DOT answered every refresh with 200: each recovery send landed inside its grace window,
    # none outside it. Requests beyond the rotations are such resends of a token DOT had
    # already rotated, answered with the pair it had minted then: the grace path was used.
    statuses = server.refresh_answers()
    assert set(statuses) == {200}, statuses
    rotations = sum(row["version"] - 1 for row in rows.values())
    assert statuses[200] - rotations >= kills_after_rotation, (statuses, rotations)
    assert dot_verdict(server, refs, rows) == []
    assert_dot_accepts_stored_tokens(server, refs, rows)


# --------------------------------------------------------------------------- failure rows


def test_invalid_client_after_the_secret_changed_opens_the_circuit(
    tmp_path: Path, dot_servers: Callable[..., DotServer], daemons: Daemons
) -> None:
    server = dot_servers(grace=10, reuse_protection=True)
    post = server.base.clients["post"]
    refs, lines = authorize_all(server, users=3, with_access_token=False)  # due at once
    post_refs = [r for r in refs if r.client is post]
    basic_refs = [r for r in refs if r.client is not post]
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "c.toml",
        database=db,
        providers=provider_tables(server),
        schedule={"circuit_backoff_initial": "1s", "circuit_backoff_max": "2s"},
    )
    import_tokens(config, lines)
    before = read_rows(db)
    # The post application's secret changes at DOT; refresherd still has the old one.
    new_secret = new_client_secret()
    LEAKS.add_secret(new_secret)
    server.set_client_secret(post, new_secret)
    daemon = daemons(config)

    def circuit(provider: str) -> float:
        return metric(daemon.metrics(), "refresherd_provider_circuit_open", provider=provider)

    wait_until(lambda: circuit("dot-post") == 1, what="the dot-post circuit to open")
    # The other application (client_secret_basic) is not affected.
    wait_until(
        lambda: all(read_rows(db)[r.id]["version"] >= 2 for r in basic_refs),
        what="dot-basic token sets refreshed",
    )
    assert circuit("dot-basic") == 0
    assert daemon.events("provider circuit open: the IdP refused our client credentials")
    time.sleep(2.0)  # a few probes later
    after = read_rows(db)
    for ref in post_refs:
        for column in ("state", "version", "refresh_token", "access_token", "failures"):
            assert after[ref.id][column] == before[ref.id][column], (ref.id, column)
        assert after[ref.id]["invalid_reason"] is None
        error = after[ref.id]["last_error"]
        assert error is None or error.startswith("invalid_client"), error
    text = daemon.metrics()
    assert metric(text, "refresherd_invalidations_total") == 0
    failures = metric(
        text, "refresherd_refresh_failures_total", provider="dot-post", reason="invalid_client"
    )
    assert failures >= 1
    assert server.refresh_answers()[401] >= 1  # DOT: 401 {"error": "invalid_client"}
    # DOT never accepted one of the post tokens: each is still its family's only token.
    assert dot_verdict(server, post_refs, after) == []

    # The operator puts back the secret refresherd has: the next probe closes the circuit.
    server.set_client_secret(post, post.secret)
    wait_until(
        lambda: all(read_rows(db)[r.id]["version"] >= 2 for r in post_refs),
        what="dot-post token sets refreshed after the fix",
    )
    wait_until(lambda: circuit("dot-post") == 0, what="the dot-post circuit to close")
    assert metric(daemon.metrics(), "refresherd_invalidations_total") == 0
    assert daemon.stop() == 0
    rows = read_rows(db)
    assert {row["state"] for row in rows.values()} == {"active"}
    assert dot_verdict(server, refs, rows) == []
    assert_dot_accepts_stored_tokens(server, refs, rows)


def test_invalid_grant_after_revocation_invalidates_only_that_token_set(
    tmp_path: Path, dot_servers: Callable[..., DotServer], daemons: Daemons
) -> None:
    # No grace period: older DOT releases honoured a refresh token revoked through
    # /revoke_token/ during the grace period too, which would make this depend on timing.
    server = dot_servers(grace=0, reuse_protection=True)
    # Due at once: refresherd learns of the revocation with its first refresh.
    refs, lines = authorize_all(server, users=2, with_access_token=False)
    revoked, others = refs[0], refs[1:]
    db = tmp_path / "tokens.db"
    config = write_config(tmp_path / "c.toml", database=db, providers=provider_tables(server))
    import_tokens(config, lines)
    # The customer withdraws the authorization: DOT revokes the refresh token (RFC 7009).
    server.revoke(revoked.client, str(lines[0]["refresh_token"]))
    daemon = daemons(config)

    wait_until(
        lambda: read_rows(db)[revoked.id]["state"] == "invalidated",
        what="the revoked token set to be invalidated",
    )
    shown = run_cli(config, "tokens", "show", revoked.id, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "invalidated"
    assert data["invalid_reason"] == "invalid_grant"
    assert "invalid_grant" in data["last_error"]
    # The others stay fresh: refreshed twice while the invalidated one is left alone.
    wait_until(
        lambda: all(read_rows(db)[r.id]["version"] >= 3 for r in others),
        what="the other token sets refreshed twice",
    )
    text = daemon.metrics()
    invalidations = metric(
        text, "refresherd_invalidations_total", provider=revoked.provider, reason="invalid_grant"
    )
    assert invalidations == 1
    assert metric(text, "refresherd_invalidations_total") == 1

    def gauges() -> bool:  # refreshed every 10 s
        text = daemon.metrics()
        return metric(text, "refresherd_token_sets", state="invalidated") == 1 and metric(
            text, "refresherd_token_sets", state="active"
        ) == len(others)

    wait_until(gauges, what="refresherd_token_sets: 1 invalidated, the others active")
    assert daemon.stop() == 0
    rows = read_rows(db)

    # Exactly one refused request: the revoked token was sent once and never again.
    statuses = server.refresh_answers()
    assert statuses[400] == 1 and set(statuses) == {200, 400}, statuses
    invalidated = [e for e in daemon.events("refresh") if e.get("outcome") == "invalidated"]
    assert [e["token_set"] for e in invalidated] == [revoked.id]
    for ref in others:
        assert rows[ref.id]["state"] == "active", (ref.id, rows[ref.id])
    assert dot_verdict(server, others, rows) == []
    assert_dot_accepts_stored_tokens(server, others, rows)
