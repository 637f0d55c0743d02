"""Test helpers that ship with refresherd: a fake OAuth 2.0 identity provider.

Use it in your own tests too::

    from refresherd.testing import FakeIdP, FaultKind, running_in_thread

    with running_in_thread(FakeIdP(grace_period=5)) as idp:
        tokens = idp.issue("alice")
        idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        ...  # point your client at idp.token_url
        assert idp.ledger.family_has_live_token(idp.ledger.family_of(tokens["refresh_token"]))

The package: ``server`` (the HTTP server and its handlers), ``ledger`` (what the IdP issued and
saw), ``faults`` (what it can do wrong, and when). Import from here: the modules' layout may
change, this list does not.
"""

from refresherd.testing.faults import Fault, FaultKind, FaultPlan
from refresherd.testing.ledger import GraceAnswer, Ledger, ReuseRevokes, RotationStats
from refresherd.testing.server import FakeIdP, running_in_thread

__all__ = [
    "FakeIdP",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "GraceAnswer",
    "Ledger",
    "ReuseRevokes",
    "RotationStats",
    "running_in_thread",
]
