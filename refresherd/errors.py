"""The tree of refresherd's errors: every exception it raises on purpose derives from
:class:`RefresherdError`, by the branch that says what went wrong.

::

    RefresherdError               errors          anything refresherd raises on purpose
    ├── InvalidInput              errors          what was handed in is wrong, and where
    │   ├── ConfigError           settings        the configuration: file, key, expectation
    │   │   └── ConfigProblems    config          more than one, in one file: each listed
    │   ├── InputError            intake          a token response handed in; a ValueError too
    │   └── LinkRefused           connect         an authorization link that cannot be made
    ├── IdPError                  errors          the identity provider could not be used
    │   ├── DiscoveryError        idp.discovery   an issuer's discovery document
    │   └── EndpointError         idp.failures    a token request that yielded no grant
    │       ├── NotSent           idp.failures    the IdP never saw the request
    │       ├── Ambiguous         idp.failures    sent; the IdP may have acted on it
    │       ├── RateLimited       idp.failures    429, 503: not processed, come back later
    │       ├── InvalidGrant      idp.failures    the refresh token or code was refused
    │       ├── ClientRejected    idp.failures    our client credentials were refused
    │       └── OAuthError        idp.failures    any other refusal
    ├── StoreError                store.contract  the database could not do what was asked
    │   ├── TokenSetExists        store.contract  the token-set id is taken
    │   └── DatabaseMisconfigured store.contract  it cannot work where the config puts it
    ├── EncryptionError           encryption      a token value cannot be sealed or opened
    ├── MigrateRefused            migrate         moving the database would not be safe now
    └── DeliveryFailed            hooks           one attempt to deliver a hook event

The branches are defined here; each error lives in the module that raises it (the second
column, under ``refresherd.``), beside the values it carries: an ``EndpointError``'s
``failure``, a ``StoreError``'s ``reason``. This module imports nothing of refresherd, so any
module, however low, can derive from it. ``tests/test_errors.py`` checks that the tree above
names every exception class of the package with its module and its base, so it cannot rot.

Not in the tree: the few underscored exceptions that never leave their module (a signal from
a JSON hook or an input iterator to the code that called it), and the packages that stand
apart from the daemon and import nothing of it (``refresherd.testing``). No message of any of
them carries a token or a secret.
"""

from __future__ import annotations


class RefresherdError(Exception):
    """Anything refresherd raises on purpose: ``except RefresherdError`` catches every error
    the tree above names, and no bug (a ``TypeError``, a ``KeyError``...)."""


class InvalidInput(RefresherdError):
    """What was handed to refresherd (a configuration, a token response) is wrong; the
    message names where (a file and key, a line) and what was expected."""


class IdPError(RefresherdError):
    """The identity provider could not be used: its discovery document, or a token request
    that yielded no grant."""
