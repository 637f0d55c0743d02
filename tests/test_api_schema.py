"""Schemathesis against the live daemon: every operation of the served OpenAPI document, with
generated valid and invalid requests, answers as the document says (status codes, content
types, response schemas, auth) and never with a 5xx it does not document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from api_daemon import PROVIDER, api_config
from conftest import DaemonProcess, Daemons, IdPFactory, import_tokens
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance


@pytest.fixture
def live_api(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> tuple[DaemonProcess, str]:
    handle = idp_factory(grace_period=5.0)
    config, bearer = api_config(tmp_path, handle, revocation_url=handle.idp.revocation_url)
    daemon = daemons(config)
    import_tokens(config, handle.token_lines(PROVIDER, 3))
    return daemon, bearer


def excluded(operation: Any) -> list[Any]:
    # A schema-valid POST may still name a provider that is not configured, or carry an
    # expiry the intake refuses (more than ten years ahead): validity that depends on the
    # configuration, not expressible in the document. Every other check runs on it.
    if operation.method.upper() == "POST":
        return [positive_data_acceptance]
    return []


def test_api_conforms_to_its_openapi_document(live_api: tuple[DaemonProcess, str]) -> None:
    daemon, bearer = live_api
    # Loaded from the daemon itself: what is tested is what is served.
    schema = schemathesis.openapi.from_url(daemon.url("/openapi.json"))
    headers = {"Authorization": f"Bearer {bearer}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "GET /v1/tokens/{id}",
        "DELETE /v1/tokens/{id}",
        "POST /v1/tokens",
        "POST /v1/tokens/{id}/exchange",
    } <= labels, labels
    for operation in operations:
        check_operation(operation, daemon.url(""), headers)


def check_operation(operation: Any, base_url: str, headers: dict[str, str]) -> None:
    skip = excluded(operation)

    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    def conforms(case: Any) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, excluded_checks=skip)

    conforms()
