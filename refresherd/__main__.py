"""`python -m refresherd` is the `refresherd` command."""

from refresherd.cli import entrypoint

entrypoint()
