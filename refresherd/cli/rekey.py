"""``refresherd rekey``: every stored token sealed with ``[encryption]``'s current key."""

from __future__ import annotations

import argparse

from refresherd.cli.common import configured, fail, one_shot
from refresherd.encryption import cipher_for
from refresherd.settings import EX_CONFIG, Config
from refresherd.store import open_store


def command(args: argparse.Namespace) -> int:
    loaded = configured(args)
    if isinstance(loaded, int):
        return loaded
    _, config = loaded
    return one_shot(config, _rekey, config)


async def _rekey(config: Config) -> int:
    cipher = cipher_for(config.encryption)
    if cipher is None:
        return fail("rekey: the config has no [encryption] key_file or key_credential", EX_CONFIG)
    store = await open_store(config.daemon.database, create=False, cipher=cipher)
    try:
        changed = await store.rekey()
        left = await store.sealed_key_ids()
    finally:
        await store.close()
    print(f"sealed {changed} token set(s) with key {cipher.current_id}")
    print(f"keys in use now: {', '.join(sorted(left)) or 'none'}")
    return 0
