"""refresherd: keeps OAuth 2.0 token sets fresh, and never loses a rotated refresh token."""

__version__ = "0.1.0"
