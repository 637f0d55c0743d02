"""Encryption at rest of the token columns: AES-256-GCM (``cryptography``'s AEAD), one key id
per value so that rows sealed under an earlier key stay readable while keys rotate.

A sealed value is ``enc:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>``. The associated
data binds it to its row and column, so a value copied to another row or column does not open.
A value without the prefix is plaintext (a row from before encryption was turned on) and is
read as it is; ``TokenStore.rekey`` seals such rows. Keys are 32 random bytes, base64 in a file or a
systemd credential (``[encryption]`` in the config). Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from refresherd.errors import RefresherdError
from refresherd.model import Secret

if TYPE_CHECKING:
    from refresherd.settings import EncryptionConfig

PREFIX: Final = "enc:v1:"
KEY_BYTES: Final = 32
KEY_ID_CHARS: Final = 16
_NONCE_BYTES: Final = 12


class EncryptionError(RefresherdError):
    """A value cannot be sealed or opened. Never carries a token or key value."""


def decode_key(text: str) -> bytes:
    """The raw key from its base64 text (standard or URL-safe alphabet); ValueError saying what
    is wrong, never repeating the text."""
    cleaned = "".join(text.split())
    try:
        raw = base64.b64decode(cleaned.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"expected {KEY_BYTES} random bytes in base64 (e.g. `head -c {KEY_BYTES} "
            "/dev/urandom | base64`), got text that is not base64"
        ) from None
    if len(raw) != KEY_BYTES:
        raise ValueError(
            f"expected {KEY_BYTES} random bytes in base64 (e.g. `head -c {KEY_BYTES} "
            f"/dev/urandom | base64`), got {len(raw)} bytes"
        )
    return raw


def key_id(raw: bytes) -> str:
    """A short public name for a key (stored with every value it seals): a hash, not the key."""
    return hashlib.sha256(b"refresherd token key\0" + raw).hexdigest()[:KEY_ID_CHARS]


def new_key_text() -> str:
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


def key_id_of(stored: str) -> str | None:
    """The key id a stored value is sealed under; None for plaintext."""
    if not is_sealed(stored):
        return None
    return stored[len(PREFIX) : len(PREFIX) + KEY_ID_CHARS]


def _aad(row_id: str, column: str) -> bytes:
    return b"refresherd\0" + row_id.encode() + b"\0" + column.encode()


class TokenCipher:
    """Seals with the current key; opens with the current or any previous key."""

    def __init__(self, current: Secret, previous: Iterable[Secret] = ()) -> None:
        raw = decode_key(current.reveal())
        self.current_id = key_id(raw)
        self._keys: dict[str, AESGCM] = {self.current_id: AESGCM(raw)}
        for secret in previous:
            old = decode_key(secret.reveal())
            self._keys.setdefault(key_id(old), AESGCM(old))

    def __repr__(self) -> str:
        return f"<TokenCipher current={self.current_id} keys={sorted(self._keys)}>"

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def seal(self, plaintext: str, *, row_id: str, column: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self.current_id].encrypt(
            nonce, plaintext.encode("utf-8"), _aad(row_id, column)
        )
        body = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{PREFIX}{self.current_id}:{body}"

    def open(self, stored: str, *, row_id: str, column: str) -> str:
        """The plaintext of a stored value (plaintext rows pass through)."""
        kid = key_id_of(stored)
        if kid is None:
            return stored
        aead = self._keys.get(kid)
        if aead is None:
            raise EncryptionError(
                f"token set {row_id!r}: {column} is sealed with key {kid}, which is not "
                "configured ([encryption] key_file or previous_key_files)"
            )
        body = stored[len(PREFIX) + KEY_ID_CHARS + 1 :]
        try:
            data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            plain = aead.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _aad(row_id, column))
        except (InvalidTag, ValueError, binascii.Error):
            raise EncryptionError(
                f"token set {row_id!r}: {column} does not open with key {kid} "
                "(damaged, or copied from another row)"
            ) from None
        return plain.decode("utf-8")

    def is_current(self, stored: str) -> bool:
        return key_id_of(stored) == self.current_id


def cipher_for(config: EncryptionConfig | None) -> TokenCipher | None:
    """The cipher the config's ``[encryption]`` asks for; None when it asks for none."""
    if config is None:
        return None
    return TokenCipher(config.key, config.previous_keys)
