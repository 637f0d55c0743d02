"""`python -m refresherd.cli` is the `refresherd` command, as `python -m refresherd` is."""

from refresherd.cli import entrypoint

entrypoint()
