"""OpenID Connect discovery against real documents served on loopback."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Daemons, IdPFactory, IdPHandle, free_port, import_tokens, run_cli, write_config

from refresherd.idp import discovery
from refresherd.idp.discovery import DiscoveredEndpoints, DiscoveryError, resolve


@dataclass
class DocServer:
    """Serves whatever ``reply`` says at any path, and counts the requests."""

    url: str = ""
    reply: tuple[int, str, bytes] = (404, "text/plain", b"not found")
    requests: list[str] = field(default_factory=list)

    def document(self, **fields: Any) -> None:
        self.reply = (200, "application/json", json.dumps(fields).encode())


@pytest.fixture
def doc_server() -> Iterator[DocServer]:
    state = DocServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            status, ctype, body = state.reply
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    discovery.clear_cache()
    yield
    discovery.clear_cache()


def run_resolve(issuer: str, **kw: Any) -> DiscoveredEndpoints:
    async def go() -> DiscoveredEndpoints:
        return await resolve(issuer, timeout=5.0, **kw)

    return anyio.run(go)


def resolve_error(issuer: str) -> DiscoveryError:
    with pytest.raises(DiscoveryError) as info:
        run_resolve(issuer)
    return info.value


def test_fake_idp_document_gives_its_endpoints(idp_factory: IdPFactory) -> None:
    idp = idp_factory()
    found = run_resolve(idp.idp.url)
    assert found.issuer == idp.idp.url
    assert found.token_endpoint == idp.idp.token_url
    assert found.revocation_endpoint == idp.idp.revocation_url


def test_resolved_once_then_cached(doc_server: DocServer) -> None:
    doc_server.document(issuer=doc_server.url, token_endpoint="https://idp.example/token")
    first = run_resolve(doc_server.url)
    second = run_resolve(doc_server.url)
    assert first == second
    assert first.revocation_endpoint is None
    assert doc_server.requests == ["/.well-known/openid-configuration"]
    run_resolve(doc_server.url, fresh=True)
    assert len(doc_server.requests) == 2


def test_trailing_slash_issuer_is_fetched_without_it(doc_server: DocServer) -> None:
    issuer = doc_server.url + "/realms/x/"
    doc_server.document(issuer=issuer, token_endpoint="https://idp.example/token")
    assert run_resolve(issuer).token_endpoint == "https://idp.example/token"
    assert doc_server.requests == ["/realms/x/.well-known/openid-configuration"]


def test_issuer_mismatch(idp_factory: IdPFactory) -> None:
    idp = idp_factory()
    # Same document (the trailing "/" is dropped to find it), but not the same issuer (4.3).
    exc = resolve_error(idp.idp.url + "/")
    assert exc.url == idp.idp.url + "/.well-known/openid-configuration"
    assert f'the document\'s issuer is "{idp.idp.url}"' in exc.message
    assert "4.3" in exc.message


def test_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    exc = resolve_error(url)
    assert exc.url == url + "/.well-known/openid-configuration"
    assert "cannot be reached" in exc.message
    assert str(exc).startswith(f"discovery {exc.url}: cannot be reached")


def test_not_json(doc_server: DocServer) -> None:
    doc_server.reply = (200, "text/html", b"<html>login</html>")
    exc = resolve_error(doc_server.url)
    assert "expected a JSON document" in exc.message
    assert "text/html" in exc.message


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ((404, "text/plain", b"no"), "expected HTTP 200, got 404"),
        ((200, "application/json", b"[1, 2]"), "expected a JSON object"),
    ],
)
def test_bad_replies(doc_server: DocServer, reply: tuple[int, str, bytes], expected: str) -> None:
    doc_server.reply = reply
    assert expected in resolve_error(doc_server.url).message


def test_missing_or_insecure_token_endpoint(doc_server: DocServer) -> None:
    doc_server.document(issuer=doc_server.url)
    assert "no token_endpoint" in resolve_error(doc_server.url).message
    doc_server.document(issuer=doc_server.url, token_endpoint="http://idp.example/token")
    assert "is not an https URL" in resolve_error(doc_server.url).message


def test_insecure_revocation_endpoint_is_dropped(doc_server: DocServer) -> None:
    doc_server.document(
        issuer=doc_server.url,
        token_endpoint="https://idp.example/token",
        revocation_endpoint="http://idp.example/revoke",
    )
    assert run_resolve(doc_server.url).revocation_endpoint is None


# --- the real process -------------------------------------------------------------------------


def issuer_provider(idp: IdPHandle, issuer: str) -> dict[str, object]:
    table = idp.provider()
    del table["token_url"]
    table["issuer"] = issuer
    return table


def test_daemon_refreshes_through_the_discovered_endpoint(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(access_token_lifetime=6, grace_period=5)
    path = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": issuer_provider(idp, idp.idp.url)},
    )
    import_tokens(path, idp.token_lines("p", 2, with_access_token=False))
    daemon = daemons(path)
    daemon.wait_for_event("refresh", outcome="refreshed", count=2)
    assert idp.ledger.refreshes >= 2
    assert daemon.stop() == 0


def test_daemon_exits_69_when_the_issuer_cannot_be_reached(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(serve=False)
    issuer = f"http://127.0.0.1:{free_port()}"
    path = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": issuer_provider(idp, issuer)},
    )
    # check-config only checks the shape: no network.
    checked = run_cli(path, "check-config")
    assert checked.returncode == 0, checked.stderr
    daemon = daemons(path, start=False)
    daemon.start(wait_listening=False)
    assert daemon.wait_exit() == 69
    [line] = daemon.events("cannot discover the token endpoint")
    assert line["provider"] == "p"
    assert line["url"] == issuer + "/.well-known/openid-configuration"
    assert "cannot be reached" in line["error"]
    # A one-shot refresh says the same and exits alike.
    proc = run_cli(path, "refresh", "ts-0000")
    assert proc.returncode == 69
    assert f"providers.p: discovery {issuer}/.well-known/openid-configuration" in proc.stderr
